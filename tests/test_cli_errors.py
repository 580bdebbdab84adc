"""Bad input fails early and in one line: the shared error reporting of the CLIs, unknown config
keys, the path and split checks of bridgejax.checks, and prompts too long for the LM's context."""

import json
import os
import subprocess
import sys
import time
import types

import pytest

from bridgejax import checks, cli
from bridgejax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_GEMMA = os.path.join(ROOT, "bridgejax", "toy", "assets", "gemma")


def _run(*args):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


# --- reporting ----------------------------------------------------------------------------------

def _raise(e):
  def fn():
    raise e
  return fn


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
  assert cli.call(_raise(UserError("--config.x='y' does not exist;\n  set it to z"))) == 2
  assert capsys.readouterr().err == "error: --config.x='y' does not exist; set it to z\n"
  assert cli.call(_raise(FileNotFoundError("no such file"))) == 2
  assert capsys.readouterr().err == "error: no such file\n"
  assert cli.call(_raise(UserError("bad")), debug=True) == 2
  err = capsys.readouterr().err
  assert "Traceback" in err and err.endswith("error: bad\n")
  assert cli.call(_raise(KeyError("oops"))) == 1  # a bug: the traceback and a request to report it
  err = capsys.readouterr().err
  assert "Traceback" in err and "KeyError" in err and "report it" in err.splitlines()[-1]
  assert cli.call(_raise(KeyboardInterrupt())) == 130
  assert cli.call(lambda: None) == 0


def test_only_bridgejax_errors_and_path_or_disk_errors_are_the_users():
  """A plain ValueError or OSError from deep inside a library is a bug (status 1, traceback), not `error:`."""
  import errno

  from bridgejax.data.records import RecordError
  from bridgejax.train.loop import NonFiniteLossError
  for e in (UserError("x"), RecordError("x"), NonFiniteLossError("x"), FileNotFoundError("x"), PermissionError("x"),
            OSError(errno.ENOSPC, "No space left on device")):
    assert cli.is_user_error(e), e
  for e in (ValueError("x"), OSError(errno.EBADF, "bad fd"), RuntimeError("x"), TypeError("x")):
    assert not cli.is_user_error(e), e


def test_urls_with_a_slash_missing_or_without_their_package_are_refused(monkeypatch):
  from bridgejax import paths
  for bad, fixed in (("gs:/bucket/run", "gs://bucket/run"), ("gs:bucket", "gs://bucket"), ("s3:/b/k", "s3://b/k")):
    with pytest.raises(UserError, match=f"looks like a .*:// URL with a slash missing; write {fixed} "):
      paths.path(bad)
  assert str(paths.path("./gs:/x")).endswith("/gs:/x") and str(paths.path("runs/a")).endswith("/runs/a")
  monkeypatch.setattr(paths, "_has_filesystem", lambda scheme: False)
  with pytest.raises(UserError, match=r"^'gs://b/run': gs:// paths need the gcsfs package; pip install gcsfs$"):
    paths.path("gs://b/run")


def test_unknown_config_keys_name_the_near_matches():
  argv = ["train.py", "--config", "configs/demo.py", "--workdir", "w"]
  e = cli.config_override_error(argv + ["--config.bridge.kk=3"])
  assert str(e) == "unknown config key --config.bridge.kk; did you mean --config.bridge.k?"
  e = cli.config_override_error(argv + ["--config.batch_size=8", "--config.batchsize=8"])
  assert str(e) == "unknown config key --config.batchsize; did you mean --config.batch_size?"
  e = cli.config_override_error(argv + ["--config.data.cut_rule=first"])  # under another parent
  assert str(e) == "unknown config key --config.data.cut_rule; did you mean --config.evals.caption.cut_rule?"
  e = cli.config_override_error(argv + ["--config.bridge.zzz=1"])
  assert str(e) == "unknown config key --config.bridge.zzz; the keys under bridge are: k, layer, name, num_heads"
  assert cli.config_override_error(argv + ["--config.bridge.k=3"]) is None
  e = cli.config_override_error(["train.py", "--config=configs/nope.py", "--config.x=1"])
  assert "config file 'configs/nope.py' does not exist" in str(e)


def test_train_py_unknown_key_is_one_line_with_debug_for_the_traceback(tmp_path):
  result = _run("train.py", "--config", "configs/demo.py", "--workdir", str(tmp_path), "--config.bridge.kk=3")
  assert result.returncode == 2
  assert result.stderr == "error: unknown config key --config.bridge.kk; did you mean --config.bridge.k?\n"
  result = _run("train.py", "--config", "configs/demo.py", "--workdir", str(tmp_path), "--config.batchsize=8",
                "--debug")
  assert result.returncode == 2 and "Traceback" in result.stderr
  assert result.stderr.splitlines()[-1] == ("error: unknown config key --config.batchsize; "
                                             "did you mean --config.batch_size?")


def test_a_batch_the_mesh_cannot_split_names_the_nearest_sizes_before_loading(tmp_path):
  from bridgejax.mesh import batch_size_problem
  assert batch_size_problem(176, 8, even=True) is None
  assert batch_size_problem(180, 8, even=True) == (
      "batch_size=180 does not split evenly over mesh.data=8, pairs for the concat trick (concat_prob > 0): it "
      "must be a multiple of 8; the nearest that do are 176 and 184 (--config.batch_size=176)")
  assert batch_size_problem(4, 6, processes=4) == (
      "batch_size=4 does not split evenly over mesh.data=6, 4 processes: it must be a multiple of 12; the nearest "
      "that do are 12 (--config.batch_size=12)")
  # train.py on 4 devices: refused before the toy world is generated or any weight loads
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  result = subprocess.run([sys.executable, "train.py", "--config", "configs/demo.py", "--workdir", str(tmp_path / "w"),
                           "--config.batch_size=30", f"--config.data.dir={tmp_path / 'toy'}",
                           f"--config.data.toy.dir={tmp_path / 'toy'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
  assert result.returncode == 2, result.stderr
  assert result.stderr == ("error: batch_size=30 does not split evenly over mesh.data=4, pairs for the concat trick "
                           "(concat_prob > 0): it must be a multiple of 4; the nearest that do are 28 and 32 "
                           "(--config.batch_size=28)\n")
  assert not (tmp_path / "toy").exists()


def test_eval_py_checks_the_workdir_before_loading(tmp_path):
  start = time.time()
  result = _run("eval.py", "--config", "configs/demo.py", "--workdir", str(tmp_path))
  assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
  assert result.stderr.startswith(f"error: --workdir '{tmp_path}' has no checkpoint")
  assert time.time() - start < 60, time.time() - start


# --- path and split checks ----------------------------------------------------------------------

def _dataset(path, splits):
  path.mkdir(parents=True)
  (path / "dataset_info.json").write_text(json.dumps({
      "format": "bridgejax-records", "version": 1, "source": "test", "skipped": {}, "notes": {},
      "splits": {name: {"kind": kind, "files": [], "num_examples": 3, "image_table": None}
                 for name, kind in splits.items()}}))
  return str(path)


@pytest.fixture
def config(tmp_path):
  from configs import base
  c = base.get_config()
  for name in ("clip", "gemma"):
    (tmp_path / name).mkdir()
  c.vision.path, c.llm.path = str(tmp_path / "clip"), str(tmp_path / "gemma")
  c.data.dir = _dataset(tmp_path / "data", {"train": "image_text", "val": "image_text", "vqa_val": "vqa",
                                            "visdial_val": "visdial"})
  for name, split in {"caption": "val", "retrieval": "val", "vqa": "vqa_val", "visdial": "visdial_val"}.items():
    c.evals[name].update(data=c.data.dir, split=split)
  return c


def test_config_paths_and_splits_are_checked_with_key_value_and_what_exists(config, tmp_path):
  checks.check_config_paths(config, for_training=True)
  checks.check_config_paths(config, for_training=False)

  config.vision.path = str(tmp_path / "clpi")
  with pytest.raises(UserError, match=r"--config.vision.path='.*clpi' does not exist \(.* holds clip"):
    checks.check_config_paths(config, for_training=True)
  config.vision.path = str(tmp_path / "clip")

  config.llm.tokenizer = "/nowhere/gemma-2b-it"
  with pytest.raises(UserError, match="--config.llm.tokenizer='/nowhere/gemma-2b-it' does not exist"):
    checks.check_config_paths(config, for_training=False)
  config.llm.tokenizer = ""

  config.data.train_split = "trian"
  with pytest.raises(UserError) as e:
    checks.check_config_paths(config, for_training=True)
  assert str(e.value) == (f"--config.data.train_split='trian': {config.data.dir} has no image_text split of that "
                          "name (did you mean 'train'?); its image_text splits are: train (3 examples), "
                          "val (3 examples)")
  config.data.train_split = "train"

  config.data.val_split = "vqa_val"
  with pytest.raises(UserError, match=r"--config.data.val_split='vqa_val'.*no image_text split"):
    checks.check_config_paths(config, for_training=True)
  config.data.val_split = ""  # no validation: nothing to check
  checks.check_config_paths(config, for_training=True)

  config.evals.retrieval.split = "tset"
  checks.check_config_paths(config, for_training=True)  # eval data is not read by training ...
  config.eval_after_training = True  # ... unless it evaluates at the end
  with pytest.raises(UserError) as e:
    checks.check_config_paths(config, for_training=True)
  assert str(e.value) == (f"--config.evals.retrieval.split='tset': {config.data.dir} has no image_text split of "
                          "that name; its image_text splits are: train (3 examples), val (3 examples)")
  config.evals.retrieval.split = "val"

  config.evals.vqa.data = str(tmp_path / "vqa")
  with pytest.raises(UserError, match=r"--config.evals.vqa.data='.*vqa' does not exist"):
    checks.check_config_paths(config, for_training=False)
  checks.check_config_paths(config, for_training=False, tasks=["caption", "visdial"])  # only the tasks run
  config.evals.vqa.data = ""  # no fallback to data.dir
  with pytest.raises(UserError, match=r"^--config.evals.vqa.data is empty; set it to a prepared dataset folder"):
    checks.check_config_paths(config, for_training=False)


def test_eval_tasks_are_separate_dicts_and_bad_ones_fail_in_one_line(capsys):
  """--config.evals.caption.max_new_tokens=16 changes the caption task alone (and makes its protocol
  custom); an unknown task name, type or key is one error line (exit status 2)."""
  from bridgejax.evaluation import evaluators
  config = _parsed_config("configs/fromage.py:eval=thesis", "--config.evals.caption.max_new_tokens=16")
  base_config = __import__("configs.fromage", fromlist=["get_config"]).get_config("eval=thesis")
  assert config.evals.caption.max_new_tokens == 16 and base_config.evals.caption.max_new_tokens == 32
  changed = {f"{t}.{k}" for t in config.evals for k in config.evals[t] if config.evals[t][k] != base_config.evals[t][k]}
  assert changed == {"caption.max_new_tokens"}
  assert config.evals.vqa.max_new_tokens == 10  # the vqa task's own key of the same name
  assert evaluators.protocol_of(config.evals.caption) == "custom"
  assert [evaluators.protocol_of(config.evals[t]) for t in ("retrieval", "vqa", "visdial")] == ["thesis"] * 3

  def status_and_error(fn):
    status = cli.call(fn)
    return status, capsys.readouterr().err

  assert status_and_error(lambda: evaluators.eval_tasks(base_config, "caption,captioning")) == (
      2, "error: unknown eval task(s) ['captioning']; config.evals has ['caption', 'retrieval', 'visdial', 'vqa'] "
      "(eval.py --tasks=NAME,...)\n")
  base_config.evals.vqa.type = "vqa2"
  assert status_and_error(lambda: checks.check_eval_data(base_config)) == (
      2, "error: --config.evals.vqa.type='vqa2' is unknown; choose from ['caption', 'compose', 'retrieval', 'visdial', 'vqa']\n")
  base_config.evals.vqa.type = "caption"  # a vqa dict under the caption type: its keys do not fit
  status, err = status_and_error(lambda: evaluators.eval_tasks(base_config))
  assert status == 2 and err.count("\n") == 1 and err.startswith(
      "error: --config.evals.vqa (type 'caption') lacks ['caption_prompt', 'cut_rule', 'num_beams'] and has "
      "unknown key(s) ['processing']")
  with pytest.raises(ValueError, match=r"eval task type 'vqa' has no key\(s\) \['num_beams'\]"):
    evaluators.eval_task("vqa", num_beams=2)
  # The demo's eval data follows data.dir; setting one task's moves neither the other's nor data.dir.
  demo = _parsed_config("configs/demo.py", "--config.data.dir=/d", "--config.evals.caption.data=/e")
  assert (demo.data.dir, demo.evals.caption.data, demo.evals.retrieval.data) == ("/d", "/e", "/d")


def _parsed_config(spec: str, *overrides: str):
  """The config as eval.py's absl flags parse it from the command line."""
  from absl import flags
  from ml_collections import config_flags
  argv = ["eval.py", f"--config={spec}", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def test_data_dir_hints(config, tmp_path):
  config.data.dir = str(tmp_path)  # the folder above the dataset
  with pytest.raises(UserError, match="no dataset_info.json.*it holds the datasets data: point at one of them"):
    checks.check_config_paths(config, for_training=True)
  config.data.dir = ""
  with pytest.raises(UserError, match="--config.data.dir is empty"):
    checks.check_config_paths(config, for_training=True)
  config.data.dir = str(tmp_path / "toy")  # the demo's toy world: generated on first use, so not checked
  config.data.toy = {"num_train": 1}
  checks.check_config_paths(config, for_training=True)


def test_checkpoint_check(tmp_path):
  with pytest.raises(UserError, match="has no checkpoint in checkpoints/"):
    checks.check_checkpoint(str(tmp_path))
  (tmp_path / "checkpoints" / "200").mkdir(parents=True)
  (tmp_path / "checkpoints" / "400.orbax-checkpoint-tmp-1").mkdir()
  checks.check_checkpoint(str(tmp_path))
  checks.check_checkpoint(str(tmp_path), 200)
  with pytest.raises(UserError, match=r"no checkpoint for step 400; available steps: \[200\]"):
    checks.check_checkpoint(str(tmp_path), 400)


# --- prompts and the LM's context ---------------------------------------------------------------

def _pipeline(context=512):
  from bridgejax import weights
  from bridgejax.inference import Pipeline
  pipe = object.__new__(Pipeline)  # only what prompt_ids reads
  pipe.tokenizer = weights.load_tokenizer(TOY_GEMMA)
  llm_config = types.SimpleNamespace(max_position_embeddings=context)
  pipe.model = types.SimpleNamespace(ret_id=pipe.tokenizer.ret_id, llm=types.SimpleNamespace(config=llm_config))
  return pipe


def test_prompts_longer_than_the_context_are_refused_fast():
  pipe = _pipeline()
  ids = pipe.prompt_ids("what colour is the square?", reserve=4 + 10)
  assert ids[0] == pipe.tokenizer.bos_id and len(ids) < 20
  assert pipe.prompt_ids("a red circle", append_ret=True)[-1] == pipe.model.ret_id
  start = time.time()
  with pytest.raises(UserError) as e:
    pipe.prompt_ids("what colour is the square? " * 40_000, reserve=4 + 10)  # 1 MB
  assert time.time() - start < 2
  assert "LM's context holds 512 positions (max_position_embeddings)" in str(e.value)
  assert "shorten the prompt to at most 498 tokens" in str(e.value)
  n = len(pipe.tokenizer.encode("x " * 300))
  pipe.prompt_ids("x " * 300, reserve=512 - n)  # exactly full
  with pytest.raises(UserError, match=r"at most 0 tokens \(or ask for fewer new tokens\)"):
    pipe.prompt_ids("x", reserve=512)


def test_new_tokens_must_be_a_positive_integer_that_fits_the_context():
  from bridgejax.inference import check_new_tokens
  assert check_new_tokens("32", name="--max-new-tokens") == 32 and check_new_tokens(7) == 7
  for bad in ("1e5", "0", "-3", "2.5", "", "ten"):
    with pytest.raises(UserError, match=rf"^--max-new-tokens '{bad}' is not a positive integer: pass how many"):
      check_new_tokens(bad, name="--max-new-tokens")
  for bad in (0, -1, True, 2.0):
    with pytest.raises(UserError, match="is not a positive integer"):
      check_new_tokens(bad)
  pipe = _pipeline()  # context 512: with 4 visual tokens and BOS, 507 new tokens at most
  assert pipe.prompt_ids("", reserve=4, new_tokens=507) == [pipe.tokenizer.bos_id]
  with pytest.raises(UserError) as e:
    pipe.prompt_ids("a red circle", reserve=4, new_tokens=100_000)
  assert str(e.value) == ("max_new_tokens=100,000 does not fit: the LM's context holds 512 positions "
                          "(max_position_embeddings), 4 of them for the image's visual tokens and at least 1 for "
                          "the prompt; ask for at most 507 new tokens")
  with pytest.raises(UserError, match="at least 2 for the prompt; ask for at most 506 new tokens"):
    pipe.prompt_ids("", reserve=4, new_tokens=507, append_ret=True)
  n = len(pipe.tokenizer.encode("x " * 300))  # the new tokens fit, the prompt does not: the prompt's message
  with pytest.raises(UserError, match=rf"shorten the prompt to at most {512 - 4 - 200} tokens \(or ask for fewer"):
    pipe.prompt_ids("x " * 300, reserve=4, new_tokens=200)
  assert n > 512 - 4 - 200

