"""The ablation runner at a tiny size: 2 configs x 2 seeds on the tiny world, a handful of steps and
a few eval examples. The table has a row per config over both seeds, its cells are the mean ± std
of the seeds' own eval JSONs, the parameters are inspect's at real size, and a second run skips all."""

import json
import os
import statistics

import pytest
from PIL import Image

import tiny_world
from bridgejax import ablate, inspect
from bridgejax.errors import UserError

CONFIGS = ["fromage", "crossatt_k12"]


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


def test_unknown_config_is_one_line_listing_the_known_ones():
  with pytest.raises(UserError, match="unknown config 'nope'; known: .*crossatt_k12.*fromage"):
    ablate.parse_configs("fromage,nope")
  assert ablate.parse_configs("all") == ablate.known_configs() and "demo" not in ablate.known_configs()


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
    assert row["trainable_params"] == inspect.count(ablate.experiment_config(row["config"]))["trainable_params"]
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
