"""A gs:// workdir: a whole tiny training, a restore and eval outputs land in the bucket, and none in
a local folder named `gs:` (what the loop, the metric writer and eval did with os and open).

Offline, gs:// is served by a fake: an fsspec filesystem registered for gs that keeps the bucket
in a local folder (what epath, our path layer and Orbax's metadata use), Orbax's TensorStore GCS
driver pointed at the same folder, and its bucket query (google-cloud-storage) answered "flat". Everything above those two seams is the real gs:// code.
"""

import json
import logging
import os

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

import tiny_world
from bridgejax import experiment, paths
from bridgejax.train import loop


class FakeGCS(LocalFileSystem):
  """gs://bucket/key -> ./bucket/key under the test's working directory, with gcsfs's naming
  (paths without the scheme, no leading slash)."""

  protocol = ("gs", "gcs")
  root_marker = ""

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    for prefix in ("gs://", "gcs://"):
      path = path.removeprefix(prefix)
    return path.rstrip("/")


@pytest.fixture
def bucket_root(tmp_path, monkeypatch):
  from etils.epath import backend
  from orbax.checkpoint._src.path import gcs_utils
  root = tmp_path / "gcs"
  root.mkdir()
  monkeypatch.chdir(root)
  fsspec.register_implementation("gs", FakeGCS, clobber=True)
  fsspec.register_implementation("gcs", FakeGCS, clobber=True)
  backend.fsspec_backend._get_filesystem.cache_clear()

  def kvstore(path):
    bucket, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
    return {"driver": "file", "path": str(root / bucket / key)}

  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)  # a flat bucket
  yield root
  backend.fsspec_backend._get_filesystem.cache_clear()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return tiny_world.make(str(tmp_path_factory.mktemp("tiny_world")))


def test_gs_workdir_trains_restores_and_evaluates(world, bucket_root, caplog):
  from bridgejax.evaluation import run as eval_run
  from bridgejax.inference import load_config
  workdir = "gs://bucket/run"
  local = bucket_root / "bucket" / "run"
  config = tiny_world.config(world, total_steps=2, checkpoint_every_steps=2, tensorboard=True,
                             **{"evals.retrieval.batch_size": 8})
  setup = experiment.build(config)
  with caplog.at_level(logging.WARNING):
    loop.train(config, workdir, loop.train_iterator(config, setup), setup=setup)
  assert "no TensorBoard logs: tensorboardX cannot write to gs://bucket/run/tensorboard" in caplog.text

  again = loop.train(config, workdir, loop.train_iterator(config, setup), setup=setup)  # restores from gs://
  assert again["already_trained"] and again["step"] == 2 and "loss" in again["train"]
  eval_run.evaluate(config, workdir, setup=setup, tasks="retrieval", quiet=True)

  assert not os.path.exists("gs:") and not os.path.exists(os.path.join(os.path.dirname(loop.__file__), "gs:"))
  assert sorted(os.listdir(local)) == ["checkpoints", "config.json", "eval", "metrics.jsonl", "train_summary.json"]
  assert sorted(os.listdir(local / "eval")) == ["report.html", "retrieval.json", "retrieval_predictions.json"]
  assert [json.loads(l)["step"] for l in open(local / "metrics.jsonl")] == [1, 2]
  assert json.load(open(local / "train_summary.json"))["step"] == 2
  assert sorted(os.listdir(local / "checkpoints")) == ["1", "2"]
  result = json.load(open(local / "eval" / "retrieval.json"))
  assert result["checkpoint_step"] == 2 and result["workdir"] == workdir
  assert load_config(None, workdir).bridge.k == 4  # predict --workdir gs://... reads the run's config
  assert paths.path(workdir) / "eval" == paths.path("gs://bucket/run/eval")


def test_path_layer_on_gs(bucket_root):
  """What the run does to a gs:// workdir besides training: whole-object writes, metrics.jsonl
  rewritten (no appends on object stores), a damaged step moved aside, the best-effort lock."""
  run = paths.path("gs://bucket/run")
  paths.write_json(run / "a.json", {"x": 1})
  assert paths.read_json("gs://bucket/run/a.json") == {"x": 1}
  metrics = paths.AppendFile(run / "metrics.jsonl", flush_every_s=3600)
  metrics.write("1\n")  # the first line goes out at once, later ones every flush_every_s and on close
  metrics.write("2\n")
  assert (bucket_root / "bucket/run/metrics.jsonl").read_text() == "1\n"
  metrics.close()
  metrics = paths.AppendFile(run / "metrics.jsonl")  # a resumed run keeps the lines
  metrics.write("3\n")
  metrics.close()
  assert (bucket_root / "bucket/run/metrics.jsonl").read_text() == "1\n2\n3\n"
  paths.write_text(run / "checkpoints/4/state/d/x", "data")
  paths.move(run / "checkpoints/4", run / "checkpoints/damaged_step_4")
  assert (bucket_root / "bucket/run/checkpoints/damaged_step_4/state/d/x").read_text() == "data"
  assert not (bucket_root / "bucket/run/checkpoints/4").exists()
  with paths.WorkdirLock("gs://bucket/run"):
    assert json.loads((bucket_root / "bucket/run/lock").read_text())["pid"] == os.getpid()
    with pytest.raises(paths.WorkdirLockedError, match="gs://bucket/run is in use by another training"):
      paths.WorkdirLock("gs://bucket/run").acquire()
  assert not (bucket_root / "bucket/run/lock").exists()
