"""Checkpoint selection and seed means, as the thesis reports them: the best validation checkpoint
survives the keep-last-N rotation and a resume, and `--checkpoint best` loads it; the table puts
runs that differ only in `seed` in one row, mean ± std; the sweep trains and evaluates each seed
once and resumes where it stopped."""

import json
import os
import re
import shutil
import statistics

import jax
import ml_collections
import numpy as np
import pytest

import tiny_world
from bridgejax import checks, experiment, sweep
from bridgejax.errors import UserError
from bridgejax.evaluation import run as eval_run, table
from bridgejax.train import loop
from bridgejax.train.checkpoint import CheckpointError, Checkpointer


SCORES = {1: 10.0, 2: 30.0, 3: 20.0, 4: 25.0}  # t2i_R@1 peaks at step 2 of 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return tiny_world.make(str(tmp_path_factory.mktemp("tiny_world")))


def _config(world, **overrides):
  """4 steps validated at each, only the last checkpoint kept; evaluated on retrieval (the cheaper task)."""
  config = tiny_world.config(world, **{"total_steps": 4, "eval_every_steps": 1, "checkpoint_every_steps": 1,
                                       "keep_checkpoints": 1, **overrides})
  config.evals = ml_collections.ConfigDict({"retrieval": config.evals.retrieval})
  return config


def _scripted(scores: dict, seen: dict):
  """A validation callback whose t2i_R@1 at each step is scores[step]; keeps the params it saw."""
  def evaluate(setup, params, step):
    seen[step] = jax.tree.map(np.array, jax.device_get(params))
    return {"t2i_R@1": scores[step], "i2t_R@1": 0.0, "caption_loss": 1.0}
  return evaluate


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
  """(workdir, summary, params seen at each validation, setup) of a run scored by SCORES."""
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  config = _config(world)
  setup = experiment.build(config)
  seen = {}
  summary = loop.train(config, workdir, loop.train_iterator(config, setup), setup=setup,
                       evaluate=_scripted(SCORES, seen))
  return workdir, summary, seen, setup


def _assert_same(a, b):
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b))


def test_best_checkpoint_survives_rotation_and_resume_and_loads_as_best(world, trained, tmp_path):
  """t2i_R@1 peaks at step 2 of 4 while only the last checkpoint is kept: step 2 is in
  checkpoints/best, eval's load_params("best") returns its params; a resume whose scores stay
  below the peak keeps it (a best value reset on resume would take step 5)."""
  workdir, summary, seen, setup = trained
  assert _config(world).best_metric == "t2i_R@1"  # FROMAGe's choice, the default
  best = {"metric": "t2i_R@1", "value": 30.0, "step": 2}
  assert summary["best"] == best
  assert json.load(open(os.path.join(workdir, "train_summary.json")))["best"] == best
  assert "best  t2i_R@1" in loop.format_summary(summary, workdir) and "at step 2" in loop.format_summary(summary, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints", "best"))) == ["2"]

  checkpointer = Checkpointer(workdir)
  assert checkpointer.all_steps() == [4]  # step 2 rotated out of the last N, kept as the best
  step, params = checkpointer.load_params("best")
  assert step == 2
  _assert_same(params, seen[2])
  assert checkpointer.load_params()[0] == 4
  checkpointer.close()
  checks.check_checkpoint(workdir, "best")  # what eval.py --checkpoint best checks first
  step, full = eval_run.load_params(setup, workdir, "best")  # ... and then loads
  assert step == 2
  _assert_same({k: full[k] for k in seen[2]}, seen[2])

  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  config = _config(world, total_steps=6)
  summary = loop.train(config, resumed, loop.train_iterator(config, setup), setup=setup,
                       evaluate=_scripted({5: 28.0, 6: 29.0}, {}))
  assert summary["step"] == 6 and summary["best"] == best
  assert sorted(os.listdir(os.path.join(resumed, "checkpoints", "best"))) == ["2"]

  result = eval_run.evaluate(config, resumed, "best", setup=setup, report=False, quiet=True)
  assert result["retrieval"]["checkpoint_step"] == 2
  assert json.load(open(os.path.join(resumed, "eval", "retrieval.json")))["checkpoint_step"] == 2


def test_best_metric_direction_and_names():
  val = {"i2t_R@1": 10.0, "t2i_R@1": 30.0, "caption_loss": 2.0}
  assert loop.validation_score(val, "R@1_mean") == 20.0
  assert loop.is_better(1.5, {"value": 2.0}, "caption_loss") and not loop.is_better(2.5, {"value": 2.0}, "caption_loss")
  assert loop.is_better(31.0, {"value": 30.0}, "t2i_R@1") and not loop.is_better(30.0, {"value": 30.0}, "t2i_R@1")
  with pytest.raises(UserError, match=r"--config.best_metric='t2i_r1' is not a validation metric; use one of t2i_R@1"):
    loop.check_best_metric("t2i_r1")


def test_asking_for_a_best_checkpoint_that_was_never_kept_is_one_line(tmp_path):
  (tmp_path / "checkpoints" / "200").mkdir(parents=True)
  with pytest.raises(UserError, match=r"has no best checkpoint \(checkpoints/best/\): training keeps one while it "
                     r"validates .* or a step of \[200\]$"):
    checks.check_checkpoint(str(tmp_path), "best")
  with pytest.raises(UserError, match=r"checkpoint 'last': expected a step number or 'best'"):
    checks.check_checkpoint(str(tmp_path), "last")
  checks.check_checkpoint(str(tmp_path), "200")  # eval.py's flag is a string now
  checkpointer = Checkpointer(str(tmp_path))
  with pytest.raises(CheckpointError, match="has no best checkpoint"):
    checkpointer.load_params("best")
  checkpointer.close()
  assert not (tmp_path / "checkpoints" / "best").exists()  # looking does not create it


# --------------------------------------------------------------------------- the table


def _fake_run(root, name, seed, metrics, *, k=4, step=100, protocol="standard"):
  """A run directory as training and eval.py leave it: config.json and eval/retrieval.json."""
  workdir = os.path.join(root, name)
  os.makedirs(os.path.join(workdir, "eval"))
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"name": "cls", "seed": seed, "bridge": {"name": "cls_linear", "k": k}, "total_steps": step}, f)
  with open(os.path.join(workdir, "eval", "retrieval.json"), "w") as f:
    json.dump({"task": "retrieval", "protocol": protocol, "metrics": metrics, "config": "cls",
               "checkpoint_step": step}, f)
  return workdir


def test_table_groups_seeds_into_mean_and_std(tmp_path):
  values = [(12.0, 40.0), (15.0, 43.0), (16.5, 41.5)]  # (t2i_R@1, i2t_R@1) of seeds 0, 1, 2
  seeds = [_fake_run(tmp_path, f"seed_{s}", s, {"t2i_R@1": t, "i2t_R@1": i}) for s, (t, i) in enumerate(values)]
  other = _fake_run(tmp_path, "k8", 0, {"t2i_R@1": 20.0, "i2t_R@1": 50.0}, k=8)
  thesis = _fake_run(tmp_path, "thesis", 3, {"t2i_R@1": 9.0, "i2t_R@1": 30.0}, protocol="thesis")

  rows = json.loads(table.table(seeds + [other, thesis], as_json=True))
  assert [r["seeds"] for r in rows] == [3, 1, 1]  # a different k, or protocol, is another experiment
  t2i = [t for t, _ in values]
  assert rows[0]["retrieval/t2i_R@1"] == pytest.approx(statistics.mean(t2i))
  assert rows[0]["retrieval/t2i_R@1 std"] == pytest.approx(np.std(t2i, ddof=1))
  assert rows[1]["retrieval/t2i_R@1"] == 20.0 and rows[1]["retrieval/t2i_R@1 std"] is None
  assert [r["protocol"] for r in rows] == ["standard", "standard", "thesis"]

  lines = [re.split(r"\s{2,}", line) for line in table.table(seeds + [other, thesis]).splitlines()]
  assert lines[0][:3] == ["run", "protocol", "seeds"] and len(lines) == 5
  mean, std = statistics.mean(t2i), statistics.stdev(t2i)
  assert lines[2][1:3] == ["standard", "3"] and f"{mean:.2f} ± {std:.2f}" in lines[2]
  assert lines[3][2] == "1" and "20.00" in lines[3] and not any("±" in c for c in lines[3])
  md = table.table(seeds, markdown=True, metrics=["t2i_R@1"]).splitlines()
  assert md[0] == "| run | protocol | seeds | t2i R@1 |" and md[2] == f"| cls @100 | standard | 3 | {mean:.2f} ± {std:.2f} |"


def test_eval_jsons_without_protocol_or_config_still_tabulate(tmp_path):
  workdir = _fake_run(tmp_path, "old", 0, {"t2i_R@1": 5.0})
  os.remove(os.path.join(workdir, "config.json"))
  data = json.load(open(os.path.join(workdir, "eval", "retrieval.json")))
  del data["protocol"]
  json.dump(data, open(os.path.join(workdir, "eval", "retrieval.json"), "w"))
  lines = table.table([workdir, workdir]).splitlines()  # no config.json: each run its own row
  assert len(lines) == 4 and re.split(r"\s{2,}", lines[2])[1:] == ["-", "1", "5.00"]


# --------------------------------------------------------------------------- the sweep


def test_sweep_trains_and_evaluates_each_seed_once(world, trained, tmp_path, capsys):
  """Seed 1 is trained already (the `trained` run): only evaluated, on its best step; seed 0 is
  trained (no validation: no best) and evaluated on its last. A second sweep does nothing."""
  workdir = str(tmp_path / "sweep")
  seed_1 = os.path.join(workdir, "seed_1")
  shutil.copytree(trained[0], seed_1)
  with open(os.path.join(seed_1, "config.json")) as f:
    saved = json.load(f)
  with open(os.path.join(seed_1, "config.json"), "w") as f:
    json.dump({**saved, "seed": 1}, f)

  done = sweep.sweep(_config(world), workdir, [0, 1])
  assert done == [os.path.join(workdir, "seed_0"), seed_1]
  out = capsys.readouterr().out
  assert "[1/2] seed 0 in" in out and "seed 0: trained to step 4, evaluated step 4\n" in out
  assert "[2/2] seed 1 in" in out and "seed 1: evaluated step 2 (best)" in out
  assert json.load(open(os.path.join(workdir, "seed_0", "config.json")))["seed"] == 0
  evals = [json.load(open(os.path.join(w, "eval", "retrieval.json"))) for w in done]
  assert [e["checkpoint_step"] for e in evals] == [4, 2]
  t2i = [e["metrics"]["t2i_R@1"] for e in evals]
  row = re.split(r"\s{2,}", out.strip().splitlines()[-1])  # the table's one row: both seeds, mean ± std
  assert row[0] == "demo @2/4" and row[2] == "2"
  assert f"{statistics.mean(t2i):.2f} ± {statistics.stdev(t2i):.2f}" in row

  before = {w: os.path.getmtime(os.path.join(w, "eval", "retrieval.json")) for w in done}
  assert sweep.sweep(_config(world), workdir, [0, 1]) == done  # resumed: nothing left to do
  out = capsys.readouterr().out
  assert "seed 0: done already (step 4 evaluated)" in out and "seed 1: done already (step 2 evaluated)" in out
  assert before == {w: os.path.getmtime(os.path.join(w, "eval", "retrieval.json")) for w in done}


def test_sweep_seeds_flag():
  assert sweep.parse_seeds("0, 1,2") == [0, 1, 2]
  with pytest.raises(UserError, match=r"--seeds '0,a': expected comma-separated integers"):
    sweep.parse_seeds("0,a")
  with pytest.raises(UserError, match="names a seed twice"):
    sweep.parse_seeds("1,1")
