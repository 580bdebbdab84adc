"""`python -m bridgejax.export` and Pipeline.from_pretrained: a run's checkpoint as a Hub-ready
folder, loaded back from the folder and from a Hub id in a local HF cache (offline)."""

import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import tiny_eval_world as tw  # noqa: E402

from bridgejax import export  # noqa: E402
from bridgejax.data.records import open_split  # noqa: E402
from bridgejax.inference import Pipeline  # noqa: E402
from bridgejax.train.checkpoint import Checkpointer  # noqa: E402
from bridgejax.weights.safetensors_io import read_safetensors_file  # noqa: E402

BEST_STEP = 2
RETRIEVAL = {"i2t_R@1": 40.0, "t2i_R@1": 20.0, "t2i_R@5": 60.0}
CAPTION = {"BLEU-4": 0.0123, "CIDEr": 0.25}


def _eval_json(workdir, task, kind, metrics, protocol, step):
  """An eval/<task>.json in eval.py's layout (bridgejax.evaluation.run.evaluate)."""
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  with open(os.path.join(workdir, "eval", f"{task}.json"), "w") as f:
    json.dump({"task": task, "type": kind, "protocol": protocol, "metrics": metrics, "config": "tiny",
               "checkpoint_step": step, "dataset": {"dir": "/data/toy", "split": "val"}}, f)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny run: the latest checkpoint (step 3) and a best one (step 2, other params), evaluated."""
  workdir = str(tmp_path_factory.mktemp("export") / "run")
  shutil.copytree(tw.workdir_with_checkpoint(), workdir)
  _, trainable = tw.setup_and_params()
  best = jax.tree.map(lambda x: np.asarray(x) * 0.5 + 0.01, trainable)
  checkpointer = Checkpointer(workdir)
  checkpointer.save_best(BEST_STEP, best, {"metric": "t2i_R@1", "value": 20.0, "step": BEST_STEP})
  checkpointer.wait()
  checkpointer.close()
  _eval_json(workdir, "retrieval", "retrieval", RETRIEVAL, "standard", 3)
  _eval_json(workdir, "caption", "caption", CAPTION, "fromage", 3)
  return workdir, trainable, best


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
  workdir, _, _ = run
  out = str(tmp_path_factory.mktemp("export") / "bridge")
  assert export.main(["--workdir", workdir, "--out", out, "--llm-id", "google/gemma-tiny"]) == 0
  return out


def _flat(tree):
  return {"/".join(str(k.key) for k in path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_export_writes_the_trainable_params_config_and_card(run, exported):
  workdir, trainable, _ = run
  assert sorted(os.listdir(exported)) == ["README.md", "bridgejax.json", "config.json", "eval", "model.safetensors"]
  tensors = read_safetensors_file(os.path.join(exported, "model.safetensors"))
  want = _flat(trainable)
  assert sorted(tensors) == sorted(want) and all(n.split("/")[0] in ("bridge", "ret") for n in tensors)
  for name, value in want.items():
    assert tensors[name].dtype == np.float32 and tensors[name].shape == value.shape
    np.testing.assert_array_equal(tensors[name], value)
  assert open(os.path.join(exported, "config.json")).read() == open(os.path.join(workdir, "config.json")).read()
  record = json.load(open(os.path.join(exported, "bridgejax.json")))
  count = sum(v.size for v in want.values())
  assert record["step"] == 3 and record["trainable_parameters"] == count and record["checkpoint"] == "latest"
  assert record["backbones"]["vision"]["path"] == tw.world()["clip"]
  assert record["backbones"]["llm"] == {"path": tw.world()["gemma"], "arch": "gemma-2b", "hub_id": "google/gemma-tiny"}
  card = open(os.path.join(exported, "README.md")).read()
  assert card.startswith("---\nlibrary_name: bridgejax\n")
  assert f"| trainable parameters | {count:,} |" in card and "| config | `tiny` |" in card
  assert "cls_linear (k=2," in card and "step 3 of " in card and "hub: `google/gemma-tiny`" in card
  assert "Pipeline.from_pretrained(" in card
  # the metrics per task with their protocol, scaled as the results table does (rates x100, R@k as is)
  assert "### retrieval (retrieval)" in card and "Protocol: standard;" in card and "| t2i R@5 | 60.00 |" in card
  assert "Protocol: fromage;" in card and "| B-4 | 1.23 |" in card and "| CIDEr | 25.00 |" in card
  assert json.load(open(os.path.join(exported, "eval", "caption.json")))["metrics"] == CAPTION


def test_export_best_checkpoint_and_one_line_errors(run, exported, tmp_path, capsys):
  workdir, _, best = run
  out = str(tmp_path / "best")
  record = export.export(workdir, out, "best")
  assert record["step"] == BEST_STEP and record["checkpoint"] == "best"
  tensors = read_safetensors_file(os.path.join(out, "model.safetensors"))
  for name, value in _flat(best).items():
    np.testing.assert_allclose(tensors[name], value, rtol=1e-6)
  capsys.readouterr()
  for argv, message in [
      (["--workdir", workdir, "--out", exported], "is not empty; pass --overwrite"),
      (["--workdir", str(tmp_path / "nowhere"), "--out", out + "2"], "does not exist"),
      (["--workdir", workdir, "--out", out + "2", "--checkpoint", "9"], "no checkpoint for step 9"),
      (["--workdir", workdir, "--out", out + "2", "--push", "no-slash"], "expected a Hub repo id"),
  ]:
    assert export.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err, err
  assert not os.path.exists(out + "2")
  assert export.main(["--workdir", workdir, "--out", out, "--overwrite"]) == 0  # now the latest step
  assert json.load(open(os.path.join(out, "bridgejax.json")))["step"] == 3


def test_from_pretrained_matches_from_workdir(run, exported):
  workdir, _, _ = run
  ours = Pipeline.from_workdir(workdir, max_new_tokens=5, batch_size=4)
  theirs = Pipeline.from_pretrained(exported, max_new_tokens=5, batch_size=4)
  assert theirs.name == ours.name == "tiny@3"
  split = open_split(tw.world()["data"], "val")
  images = [split[i]["image"] for i in range(3)]
  assert theirs.captions(images) == ours.captions(images)
  np.testing.assert_array_equal(theirs._encode(images)[1], ours._encode(images)[1])
  np.testing.assert_array_equal(theirs.text_query("a red circle"), ours.text_query("a red circle"))


@pytest.fixture
def hub_offline(monkeypatch):
  """No network for the Hub path: huggingface_hub refuses any request (its flag is read at import)."""
  import huggingface_hub.constants
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_from_pretrained_backbone_overrides_and_errors(exported, tmp_path, hub_offline):
  with pytest.raises(ValueError, match="llm backbone folder .* does not exist.*hub id google/gemma-tiny.*llm=FOLDER"):
    Pipeline.from_pretrained(exported, llm=str(tmp_path / "moved_gemma"))
  with pytest.raises(ValueError, match="neither a folder nor a Hub repo id"):
    Pipeline.from_pretrained(str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="cannot fetch 'org/absent' in the local Hugging Face cache"):
    Pipeline.from_pretrained("org/absent", local_files_only=True, cache_dir=str(tmp_path / "empty_cache"))


def test_from_pretrained_hub_id_from_the_local_cache(exported, tmp_path, monkeypatch, hub_offline):
  """The Hub path, offline: the export in the hub cache layout, found through HF_HUB_CACHE."""
  import huggingface_hub.constants
  cache = tmp_path / "hub"
  revision = "0123456789abcdef0123456789abcdef01234567"
  repo = cache / "models--org--tiny-bridge"
  shutil.copytree(exported, repo / "snapshots" / revision)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(revision)
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read once, at import
  pipe = Pipeline.from_pretrained("org/tiny-bridge", local_files_only=True)
  local = Pipeline.from_pretrained(exported)
  assert pipe.name == local.name == "tiny@3"
  trainable = lambda p: _flat({k: p.params[k] for k in ("bridge", "ret")})  # noqa: E731
  mine, want = trainable(pipe), trainable(local)
  assert sorted(mine) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(mine[name], want[name])


@pytest.fixture
def hub_login(monkeypatch, tmp_path):
  """No Hub login but what a test sets: HF_TOKEN unset, no token file (get_token reads both)."""
  import huggingface_hub.constants
  for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
  return lambda token: monkeypatch.setenv("HF_TOKEN", token)


def test_push_uploads_the_folder(exported, monkeypatch, capsys, run, tmp_path, hub_offline, hub_login):
  import huggingface_hub
  hub_login("hf_test_token")
  calls = []
  monkeypatch.setattr(huggingface_hub.HfApi, "create_repo",
                      lambda self, repo_id, **kw: calls.append(("create", repo_id, kw, self.token)))
  monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw)))
  assert export.push(exported, "org/tiny-bridge", private=True) == "https://huggingface.co/org/tiny-bridge"
  assert calls[0][:3] == ("create", "org/tiny-bridge", {"repo_type": "model", "private": True, "exist_ok": True})
  upload = calls[1][1]
  assert upload["folder_path"] == exported and upload["repo_id"] == "org/tiny-bridge" and upload["repo_type"] == "model"
  calls.clear()
  workdir, _, _ = run
  out = str(tmp_path / "pushed")
  assert export.main(["--workdir", workdir, "--out", out, "--push", "org/other"]) == 0
  assert [c[0] for c in calls] == ["create", "upload"] and calls[1][1]["folder_path"] == out
  assert calls[0][3] == "hf_test_token"  # the token the check found
  assert "pushed to https://huggingface.co/org/other" in capsys.readouterr().out
  with pytest.raises(ValueError, match="is not an exported bridge"):
    export.push(str(tmp_path), "org/x")


def test_push_checks_the_repo_id_and_the_login_before_any_work(run, tmp_path, capsys, hub_offline, hub_login):
  workdir, _, _ = run
  out = str(tmp_path / "pushed")
  hub_login("hf_test_token")
  for bad in ("no-slash", "org/name/extra", "org/", "org/bad..name", "org/-name", "org/na me", "org/" + "x" * 100):
    assert export.main(["--workdir", workdir, "--out", out, "--push", bad]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --push {bad!r}: expected a Hub repo id, org/name (letters, digits, '-', '_', '.'; " \
                  "no '--' or '..'; at most 96 characters)\n"
  hub_login("")
  assert export.main(["--workdir", workdir, "--out", out, "--push", "org/fine-name"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: --push needs a Hugging Face login") and "hf auth login" in err and "HF_TOKEN" in err
  assert len(err.splitlines()) == 1
  assert not os.path.exists(out)  # nothing exported


def _tree(path):
  return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
          for d, _, files in os.walk(path) for f in files}


def test_overwrite_replaces_only_a_previous_export(run, exported, tmp_path, capsys):
  workdir, _, _ = run
  before = _tree(workdir)
  outside = tmp_path / "other"
  outside.mkdir()
  (outside / "notes.txt").write_text("mine")
  (outside / "data").mkdir()
  not_export = tmp_path / "card_only"
  not_export.mkdir()
  (not_export / "README.md").write_text("# a model card, but no bridgejax.json")
  stray = tmp_path / "stray_eval"
  shutil.copytree(exported, stray)
  (stray / "eval" / "plots").mkdir()
  for out, message in [
      (workdir, f"--out {workdir!r} is --workdir {workdir!r}; pass a folder outside the training run"),
      (os.path.dirname(workdir), "contains --workdir"),  # `--out runs/`: every run in it was wiped
      (os.path.join(workdir, "export"), "is inside --workdir"),
      (str(outside), "holds data/, notes.txt, which export did not write; --overwrite replaces only a previous export"),
      (str(not_export), "is not a previous export (no bridgejax.json with an export's \"format\")"),
      (str(stray), "holds eval/plots/, which export did not write"),
  ]:
    assert export.main(["--workdir", workdir, "--out", out, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err, err
  assert _tree(workdir) == before
  assert sorted(os.listdir(outside)) == ["data", "notes.txt"] and os.listdir(not_export) == ["README.md"]
  # a previous export is replaced, in one rename: nothing is left beside it
  out = tmp_path / "again"
  shutil.copytree(exported, out)
  assert export.main(["--workdir", workdir, "--out", str(out), "--checkpoint", "best", "--overwrite"]) == 0
  assert json.load(open(out / "bridgejax.json"))["step"] == BEST_STEP
  assert sorted(os.listdir(tmp_path)) == ["again", "card_only", "other", "stray_eval"]


def test_a_failed_export_leaves_the_old_one(run, exported, tmp_path, monkeypatch):
  workdir, _, _ = run
  out = tmp_path / "bridge"
  shutil.copytree(exported, out)
  before = _tree(out)

  def card_fails(*args):
    raise OSError("disk full")

  monkeypatch.setattr(export, "model_card", card_fails)  # the last file: the others are written by then
  with pytest.raises(OSError, match="disk full"):
    export.export(workdir, str(out), "best", overwrite=True)
  assert _tree(out) == before
  with pytest.raises(OSError, match="disk full"):
    export.export(workdir, str(tmp_path / "new"))
  assert sorted(os.listdir(tmp_path)) == ["bridge"]  # no new folder, no temporary one
