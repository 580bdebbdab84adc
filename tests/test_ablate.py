"""The ablation runner at a tiny size: 2 configs x 2 seeds on the tiny world, a handful of steps and
a few eval examples. The table has a row per config over both seeds, its cells are the mean ± std
of the seeds' own eval JSONs, the parameters are param_count's at real size, and a second run skips all."""

import dataclasses
import json
import os
import shutil
import signal
import statistics

import pytest
from PIL import Image

import tiny_world
from bridgejax import ablate, param_count
from bridgejax.errors import UserError

CONFIGS = ["fromage", "crossatt_k12"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return tiny_world.make(str(tmp_path_factory.mktemp("tiny_world")))


def test_toy_config_transplants_the_bridge_and_keeps_the_toy_setup(world):
  toy = tiny_world.config(world)
  config = ablate.toy_config("tte", 7, toy=toy, max_examples=3, max_new_tokens=4)
  thesis = ablate.experiment_config("tte")
  assert config.bridge.to_dict() == thesis.bridge.to_dict() and config.token_type_embeddings
  assert config.loss.to_dict() == thesis.loss.to_dict()
  assert (config.vision.path, config.llm.path, config.data.dir, config.optim.lr) == (
      toy.vision.path, toy.llm.path, toy.data.dir, toy.optim.lr)
  assert config.total_steps == 7 and config.name == "tte"
  assert {t: (c.split, c.max_examples, c.data) for t, c in config.evals.items()} == {
      t: (s, 3, toy.data.dir) for t, s in ablate.TOY_SPLITS.items()}
  assert config.evals.caption.max_new_tokens == config.evals.vqa.max_new_tokens == 4
  assert "siglip" in ablate.unrunnable("siglip_crossatt", ablate.toy_config("siglip_crossatt", toy=toy))
  assert ablate.unrunnable("fromage", ablate.toy_config("fromage", toy=toy)) is None
  blip2 = ablate.toy_config("blip2", toy=toy)  # both stages; BLIP-2's 768 in proportion to the 32-wide tower
  assert (blip2.stage, blip2.representation_share, blip2.bridge.num_layers) == ("generative", 0.5, 12)
  assert blip2.bridge.width == 24 == 768 * 32 // 1024 and ablate.unrunnable("blip2", blip2) is None


def test_unknown_config_is_one_line_listing_the_known_ones():
  with pytest.raises(UserError, match="unknown config 'nope'; known: .*crossatt_k12.*fromage"):
    ablate.parse_configs("fromage,nope")
  assert ablate.parse_configs("all") == ablate.known_configs() and "demo" not in ablate.known_configs()


def test_configs_are_files_in_configs_dir(world, tmp_path, monkeypatch, capsys):
  """--configs_dir: a folder of config files anywhere (an installed wheel has no configs/), each
  loaded as `--config FILE` loads it; by default configs/ here, else the checkout's."""
  folder = tmp_path / "my_configs"
  folder.mkdir()
  shutil.copy(os.path.join(REPO, "configs", "fromage.py"), folder / "myfromage.py")  # only found there
  directory = str(folder)
  assert ablate.known_configs(directory) == ablate.parse_configs("all", directory) == ["myfromage"]
  with pytest.raises(UserError, match=r"unknown config 'fromage'; known: myfromage \(or 'all'\) in --configs_dir .*my_"):
    ablate.parse_configs("fromage", directory)
  # the run the ablation would make of it: fromage's recipe on the toy setup (the next test trains such runs)
  toy = tiny_world.config(world, batch_size=4)
  mine = ablate.toy_config("myfromage", 2, toy=toy, directory=directory)
  theirs = ablate.toy_config("fromage", 2, toy=toy)
  assert mine.to_dict() == {**theirs.to_dict(), "name": "myfromage"}
  assert ablate.unrunnable("myfromage", mine, directory) is None
  assert param_count.count(ablate.experiment_config("myfromage", directory)) == param_count.count(
      ablate.experiment_config("fromage"))

  monkeypatch.chdir(tmp_path)  # no configs/ here: the checkout's (an editable install)
  assert ablate.default_configs_dir() == os.path.join(REPO, "configs") and "fromage" in ablate.known_configs()
  missing = str(tmp_path / "nowhere")
  assert ablate.main(["--configs", "all", "--workdir", str(tmp_path / "w"), "--configs_dir", missing]) == 2
  assert capsys.readouterr().err.splitlines() == [
      f"error: --configs_dir {missing!r} is not a folder: run from the repository root (where configs/ is) "
      "or pass --configs_dir path/to/configs"]


def test_ablation_trains_tabulates_plots_and_resumes(world, tmp_path, capsys):
  workdir = str(tmp_path / "ablate")
  toy = tiny_world.config(world, batch_size=4)
  result = ablate.ablate(CONFIGS, [0, 1], workdir, steps=2, max_examples=2, max_new_tokens=4, toy=toy)
  assert result["complete"] and not result["skipped"]
  out = capsys.readouterr().out
  assert "[1/2] fromage" in out and "[2/2] crossatt_k12" in out and "ablation of 2 config(s) x 2 seed(s)" in out

  rows = json.load(open(os.path.join(workdir, "ablation.json")))
  assert [r["config"] for r in rows] == CONFIGS and [r["seeds"] for r in rows] == [2, 2]
  for row in rows:
    assert row["trainable_params"] == param_count.count(ablate.experiment_config(row["config"]))["trainable_params"]
    evals = [json.load(open(os.path.join(workdir, row["config"], f"seed_{s}", "eval", "vqa.json"))) for s in (0, 1)]
    values = [e["metrics"]["overall"] for e in evals]
    assert row["vqa/overall"] == pytest.approx(statistics.mean(values))
    assert row["vqa/overall std"] == pytest.approx(statistics.stdev(values))
    for task, metric in ablate.HEADLINE:
      assert f"{task}/{metric}" in row
  assert rows[0]["trainable_params"] < rows[1]["trainable_params"]  # one Linear against cross-attention

  lines = open(os.path.join(workdir, "ablation.md")).read().splitlines()
  assert lines[0].startswith("| config | trainable (real) | trainable (toy) | seeds | B-4 | CIDEr |")
  assert len(lines) == 4 and all(line.split(" | ")[3] == "2" for line in lines[2:])
  with Image.open(os.path.join(workdir, "ablation.png")) as image:
    image.verify()
    assert image.format == "PNG" and image.size[0] > 500

  evals = [os.path.join(workdir, c, f"seed_{s}", "eval", "caption.json") for c in CONFIGS for s in (0, 1)]
  before = [os.path.getmtime(p) for p in evals]
  ablate.ablate(CONFIGS, [0, 1], workdir, steps=2, max_examples=2, max_new_tokens=4, toy=toy)
  assert capsys.readouterr().out.count("done already") == 4
  assert before == [os.path.getmtime(p) for p in evals]


def test_sigterm_stops_the_ablation_between_tasks_and_between_runs_and_it_resumes(world, tmp_path, monkeypatch,
                                                                                     capsys):
  """A SIGTERM while a run is evaluated used to kill the process (the trainer's handler was gone);
  now the evaluation stops after the task in flight, or, at the last task, the sweep stops before
  the next seed's training. Either way exit is 'incomplete' and the same call resumes. The config comes
  from a --configs_dir of its own (fromage's recipe as `myfromage`, a name only that folder has)."""
  from bridgejax.evaluation.evaluators import REGISTRY
  toy = tiny_world.config(world, batch_size=4)
  folder = tmp_path / "my_configs"
  folder.mkdir()
  shutil.copy(os.path.join(REPO, "configs", "fromage.py"), folder / "myfromage.py")
  workdir = str(tmp_path / "ablate")
  run0 = os.path.join(workdir, "myfromage", "seed_0")
  calls, kill_at = [], {"n": 1}

  def signalling(name, fn):
    def task(*args, **kwargs):
      result = fn(*args, **kwargs)
      calls.append(name)
      if len(calls) == kill_at["n"]:
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill PID` or a cluster's time limit would
      return result
    return task
  for name in ablate.TOY_SPLITS:
    monkeypatch.setitem(REGISTRY, name, dataclasses.replace(REGISTRY[name], run=signalling(name, REGISTRY[name].run)))
  before = signal.getsignal(signal.SIGTERM)
  run = lambda seeds=(0, 1): ablate.ablate(["myfromage"], list(seeds), workdir, steps=2, max_examples=2,
                                         max_new_tokens=4, toy=toy, directory=str(folder))

  result = run()  # SIGTERM during seed 0's first task: that task is kept, the others wait
  assert not result["complete"] and signal.getsignal(signal.SIGTERM) is before
  assert sorted(os.listdir(os.path.join(run0, "eval"))) == ["caption.json", "caption_predictions.json", "report.html"]
  assert not os.path.exists(os.path.join(workdir, "myfromage", "seed_1"))
  assert "evaluation stopped (SIGTERM)" in capsys.readouterr().out

  kill_at["n"] = len(calls) + len(ablate.TOY_SPLITS)  # now at seed 0's last task
  result = run()
  out = capsys.readouterr().out
  assert not result["complete"] and "stopped after seed 0 (SIGTERM)" in out and "stopped early (SIGTERM)" in out
  assert {f for f in os.listdir(os.path.join(run0, "eval")) if not f.endswith("_predictions.json")} >= {
      f"{t}.json" for t in ablate.TOY_SPLITS}
  assert not os.path.exists(os.path.join(workdir, "myfromage", "seed_1"))

  kill_at["n"] = 0  # no more signals: seed 0 is done, nothing is redone
  result = run(seeds=[0])
  assert result["complete"] and "seed 0: done already" in capsys.readouterr().out
  assert [r["config"] for r in result["rows"]] == ["myfromage"] and result["rows"][0]["trainable_params"] == \
      param_count.count(ablate.experiment_config("fromage"))["trainable_params"]
