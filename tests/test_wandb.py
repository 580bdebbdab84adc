"""config.wandb: a tiny run logs to Weights & Biases (WANDB_MODE=offline) the metrics of
metrics.jsonl at the same steps, and the sample captions as a table; a resumed run goes on in the
same W&B run; without wandb installed, one clear error before anything loads."""

import glob
import json
import os
import struct
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import tiny_eval_world as tw  # noqa: E402

from bridgejax import cli  # noqa: E402
from bridgejax.main import caption_samples, run  # noqa: E402
from bridgejax.train.metric_writer import WANDB_ID_FILE  # noqa: E402

_BLOCK, _HEADER = 32768, 7  # the .wandb file: LevelDB's log format, after a 7-byte file header


def _records(path: str):
  """The protobuf Records of an offline run's .wandb file (its transaction log)."""
  from wandb.proto import wandb_internal_pb2
  data = open(path, "rb").read()
  assert data[:4] == b":W&B", path
  position, pending = _HEADER, b""
  while position + _HEADER <= len(data):
    left = _BLOCK - position % _BLOCK
    _, length, kind = struct.unpack("<IHB", data[position:position + _HEADER])
    if left < _HEADER or (kind == 0 and length == 0):  # the rest of a block is padding
      position += left
      continue
    pending += data[position + _HEADER:position + _HEADER + length]
    position += _HEADER + length
    if kind in (1, 4):  # a full record, or the last fragment of one
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      pending = b""
      yield record


def _history(run_dir: str) -> dict[int, dict]:
  """{step: the values logged at it} of an offline run directory (W&B's own keys, _*, left out)."""
  import wandb
  wandb.teardown()  # run.finish() may return before W&B's service has written the whole file
  out = {}
  for record in _records(glob.glob(os.path.join(run_dir, "run-*.wandb"))[0]):
    if record.WhichOneof("record_type") == "history":
      values = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
      out.setdefault(record.history.step.num, {}).update({k: v for k, v in values.items() if not k.startswith("_")})
  return out


def _config(**keys):
  config = tw.config(max_examples=3)
  config.evals = {"caption": config.evals.caption}  # the sample captions; the other tasks add nothing here
  config.update(total_steps=2, log_every_steps=1, eval_after_training=True, tensorboard=False)
  config.data.val_split = ""  # validation logs through the same writer.write, under val/: its compile is saved
  config.wandb.update(project="bridgejax-test", name="tiny")
  config.update(keys)
  return config


@pytest.fixture
def offline(monkeypatch):
  pytest.importorskip("wandb", reason="wandb is not installed (pip install -e '.[wandb]')")
  for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}.items():
    monkeypatch.setenv(key, value)


def test_offline_run_holds_the_metrics_of_metrics_jsonl_and_the_sample_captions(offline, tmp_path):
  workdir = str(tmp_path / "run")
  run(_config(), workdir)
  logged = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    row = json.loads(line)
    logged.setdefault(row.pop("step"), {}).update(row)
  assert sorted(logged) == [1, 2] and "train/loss" in logged[1] and "train/samples_per_s" in logged[2]

  run_dirs = glob.glob(os.path.join(workdir, "wandb", "offline-run-*"))
  assert len(run_dirs) == 1
  history = _history(run_dirs[0])
  table = {k.partition("/")[2]: v for k, v in history[2].items() if k.startswith("sample_captions/")}
  scalars = {step: {k: v for k, v in values.items() if not k.startswith("sample_captions/")}
             for step, values in history.items()}
  assert sorted(scalars) == sorted(logged)
  for step, values in logged.items():
    assert scalars[step].keys() == values.keys()
    for key, value in values.items():
      assert scalars[step][key] == pytest.approx(value, rel=1e-6), (step, key)

  assert table["_type"] == "table-file" and table["nrows"] == 3
  saved = json.load(open(os.path.join(run_dirs[0], "files", table["path"])))
  assert saved["columns"] == ["id", "generated", "true"] and saved["data"] == caption_samples(workdir, 50)

  # A resumed run logs on into the same W&B run (its id is kept in the workdir).
  run_id = open(os.path.join(workdir, WANDB_ID_FILE)).read().strip()
  run(_config(total_steps=3, eval_after_training=False), workdir)
  resumed = [d for d in glob.glob(os.path.join(workdir, "wandb", "offline-run-*")) if d not in run_dirs]
  assert len(resumed) == 1 and resumed[0].endswith(run_id)
  assert sorted(_history(resumed[0])) == [3]


def test_wandb_set_but_not_installed_is_one_line_before_anything_loads(monkeypatch, tmp_path, capsys):
  monkeypatch.setitem(sys.modules, "wandb", None)  # importlib.util.find_spec("wandb") -> None
  workdir = str(tmp_path / "run")
  assert cli.call(lambda: run(_config(), workdir)) == 2
  error = capsys.readouterr().err.strip().splitlines()
  assert error == ["error: --config.wandb.project='bridgejax-test' logs to Weights & Biases, but wandb is not "
                   "installed: pip install -e '.[wandb]' (or unset --config.wandb.project)"]
  assert not os.path.exists(os.path.join(workdir, "checkpoints")) and not os.path.exists(os.path.join(workdir, "wandb"))
