"""BLIP-2's two stages (configs/qformer.py:blip2): stage 1's ITC, ITM and ITG train the Q-Former's query
branch, and stage 2 starts from stage 1's checkpoint (config.init_from), on the tiny CLIP + Gemma."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bridgejax.model import BridgeModel
from model_helper import caption_batch

QFORMER = dict(name="qformer", k=3, num_layers=2, cross_attention_every=2, num_heads=2, width=16, mlp_ratio=2,
               layer=-1, layer_norm_eps=1e-12)


def _model(tiny_model, stage):
  config, vision_config, llm_config, frozen, _ = tiny_model
  config = config.copy_and_resolve_references()
  config.bridge = ml_collections.ConfigDict(QFORMER)
  config.stage = stage
  return BridgeModel.create(config, vision_config, llm_config), frozen


def test_stage1_losses_train_the_query_branch(tiny_model):
  model, frozen = _model(tiny_model, "representation")
  trainable = model.init_trainable(jax.random.key(0), frozen)
  assert "proj" not in trainable["bridge"] and "word_embeddings" in trainable["bridge"]
  assert "text_ffn" in trainable["bridge"]["layer_0"]
  batch = caption_batch()

  def term(bridge, name):
    return model.loss({**trainable, "bridge": bridge}, frozen, batch, jax.random.key(1))[1][name]

  total, metrics = jax.jit(model.loss)(trainable, frozen, batch, jax.random.key(1))
  assert np.isfinite(float(total)) and float(total) == pytest.approx(
      float(metrics["itc_loss"] + metrics["itm_loss"] + metrics["itg_loss"]), rel=1e-6)
  for name in ("itc_loss", "itm_loss", "itg_loss"):
    grads = jax.jit(jax.grad(term), static_argnums=1)(trainable["bridge"], name)
    for part in ("queries", "layer_0"):  # layer_0 holds the cross-attention to the image
      assert sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(grads[part])) > 0, (name, part)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  import tiny_world
  return tiny_world.make(str(tmp_path_factory.mktemp("blip2_world")))


def test_both_stages_in_one_run_stage2_starts_from_stage1(world, tmp_path, capsys):
  """representation_share=0.5 of 6 steps: 3 steps of stage 1 in WORKDIR/representation, then 3 of
  stage 2 starting from its query branch (LL_O fresh, the text branch left behind); rerunning resumes
  nothing and changes nothing; eval refuses the stage-1 run."""
  import tiny_world
  from bridgejax.evaluation.run import evaluate
  from bridgejax.errors import UserError
  from bridgejax.main import run
  from bridgejax.train.checkpoint import Checkpointer, warm_start
  config = tiny_world.config(world, **{"bridge": ml_collections.ConfigDict(QFORMER), "representation_share": 0.5})
  summary = run(config, str(tmp_path))
  out = capsys.readouterr().out
  assert "trained to step 3 in " + str(tmp_path / "representation") in out
  assert "bridge initialised from " + str(tmp_path / "representation") + " (step 3)" in out and "fresh: proj/" in out and "not used: " in out
  assert summary["step"] == 3
  stage1 = Checkpointer(str(tmp_path / "representation"))
  step, first = stage1.load_params()
  stage1.close()
  assert step == 3 and "word_embeddings" in first["bridge"] and "proj" not in first["bridge"]
  metrics = [line for line in open(tmp_path / "representation" / "metrics.jsonl")]
  assert all('"train/itc_loss"' in line and '"train/itg_loss"' in line for line in metrics)
  # what stage 2 started from: stage 1's query branch, exactly; LL_O fresh; the text branch left behind
  fresh = BridgeModel.create(config, *_configs(world)).init_trainable(jax.random.key(1), _frozen(world))
  started, report = warm_start(fresh, str(tmp_path / "representation"))
  assert report in out
  for name in ("queries", "query_norm", "vision_norm", "layer_0", "layer_1"):
    jax.tree.map(np.testing.assert_array_equal, started["bridge"][name],
                 {k: v for k, v in first["bridge"][name].items() if "text_ffn" not in k} if name.startswith("layer")
                 else first["bridge"][name])
  jax.tree.map(np.testing.assert_array_equal, started["bridge"]["proj"], fresh["bridge"]["proj"])
  with pytest.raises(UserError, match="stage-1 run"):
    evaluate(json_config(tmp_path / "representation"), str(tmp_path / "representation"))
  again = run(config, str(tmp_path))
  assert again.get("already_trained") and again["step"] == 3


def _configs(world):
  from bridgejax import weights
  return (weights.load_vision_tower(world["vision.path"]).config, weights.load_language_model(world["llm.path"]).config)


def _frozen(world):
  from bridgejax import weights
  return {"vision": weights.load_vision_tower(world["vision.path"]).params,
          "llm": weights.load_language_model(world["llm.path"]).params}


def json_config(workdir):
  import json
  return ml_collections.ConfigDict(json.load(open(workdir / "config.json")))


def test_init_from_refuses_what_it_cannot_use(tiny_model, tmp_path):
  from bridgejax.errors import UserError
  from bridgejax.train.checkpoint import warm_start
  model, frozen = _model(tiny_model, "generative")
  params = model.init_trainable(jax.random.key(0), frozen)
  with pytest.raises(UserError, match="has no checkpoints/ folder"):
    warm_start(params, str(tmp_path / "nowhere"))
  assert not (tmp_path / "nowhere").exists()


def test_a_sweep_counts_a_two_stage_run_done_at_stage_2s_last_step(tmp_path):
  """sweep/ablate read WORKDIR's train_summary.json, stage 2's: 3 of 6 steps when stage 1 took the other 3."""
  import json
  from bridgejax.main import stages
  from bridgejax.sweep import trained_step
  from configs import blip2
  config = blip2.get_config()
  config.total_steps = 6
  first, second = stages(config, str(tmp_path))
  assert (first.total_steps, first.stage, second.total_steps, second.init_from) == (
      3, "representation", 3, str(tmp_path / "representation"))
  (tmp_path / "train_summary.json").write_text(json.dumps({"step": 3, "preempted": False}))
  assert trained_step(str(tmp_path), second, "last") == (3, 3)
  assert trained_step(str(tmp_path), config, "last") is None  # the whole run's 6 steps: never done
