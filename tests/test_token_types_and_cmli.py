"""Token-type embeddings with LayerScale (the TTE report, eq. 4-5) and CMLI / Target-CMLI (the CMLI
report, eq. 1-10): the heads' shapes and parameter formulas, identity at initialisation, each loss
against an independent computation (numpy loops), the options off leaving every program as it was,
and a run with every option on that trains, saves and loads."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_eval_world
from bridgejax import config_schema, losses, terms
from bridgejax.param_count import count
from bridgejax.heads import TOKEN_TYPE_SCALE_INIT, RetrievalHeads
from bridgejax.model import BridgeModel
from configs import cmli, crossatt_k12, target_cmli, tte
from model_helper import caption_batch, np_cmli

RET_KEYS = {"ret_embedding", "text_proj", "image_proj", "logit_scale"}
TYPE_KEYS = {"token_type_image", "token_type_text", "token_type_scale"}


def _size(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# ------------------------------------------------------------------ heads and counts

def test_heads_shapes_and_parameter_formulas():
  d_llm, e, w, d = 24, 16, 12, 8
  dims = terms.Dims(d_llm, w, 1.0)
  on = lambda name, **options: terms.Active(terms.REGISTRY[name], {**terms.REGISTRY[name].defaults(), **options})
  active = (on("cmli", dim=d, image_tokens="bridge"), on("target_cmli", dim=d))  # every CMLI-space head
  heads = RetrievalHeads(d_llm, e, token_types=True, extra=terms.heads(active, dims))
  params = heads.init(jax.random.key(0), jnp.zeros((1, d_llm)), jnp.zeros((1, w)), jnp.zeros((1, 1, w)))["params"]
  assert {k: _size(params[k]) for k in set(params) - RET_KEYS} == {
      "token_type_image": d_llm, "token_type_text": d_llm, "token_type_scale": d_llm,  # 3·D
      "cmli_image_proj": w * d + d, "cmli_text_proj": d_llm * d + d, "cmli_logit_scale": 1,
      "cmli_visual_proj": d_llm * d + d,
      "target_image_proj": d_llm * w + w, "target_text_proj": d_llm * w + w}
  np.testing.assert_array_equal(params["token_type_scale"], np.full((d_llm,), TOKEN_TYPE_SCALE_INIT, np.float32))
  apply = lambda method, *x: heads.apply({"params": params}, *x, method=method)
  image_type, text_type = apply(RetrievalHeads.type_offsets)
  np.testing.assert_allclose(image_type, 1e-5 * params["token_type_image"], rtol=1e-6)
  np.testing.assert_allclose(text_type, 1e-5 * params["token_type_text"], rtol=1e-6)
  head = lambda name, x=None: apply(RetrievalHeads.apply_head, name, x)
  assert head("cmli_image_proj", jnp.ones((2, 5, w))).shape == (2, 5, d)
  assert head("cmli_text_proj", jnp.ones((2, 7, d_llm))).shape == (2, 7, d)
  assert head("cmli_visual_proj", jnp.ones((2, 3, d_llm))).shape == (2, 3, d)
  assert head("target_image_proj", jnp.ones((2, 3, d_llm))).shape == (2, 3, w)
  assert head("target_text_proj", jnp.ones((2, 7, d_llm))).shape == (2, 7, w)
  assert float(head("cmli_logit_scale")) == 1.0  # the logit scale's init, from Dims
  plain = RetrievalHeads(d_llm, e).init(jax.random.key(0), jnp.zeros((1, d_llm)), jnp.zeros((1, w)), None)
  assert set(plain["params"]) == RET_KEYS


D, W = 2048, 1024  # Gemma-2B, CLIP ViT-L/14
CMLI_HEADS = W * 256 + 256 + D * 256 + 256 + 1  # on the tower's patches (configs/target_cmli.py)
CMLI_BRIDGE_HEADS = 2 * (D * 256 + 256) + 1  # on the bridge's visual tokens (configs/cmli.py)


@pytest.mark.parametrize("module,extra,total", [
    (tte, 3 * D, 9_203_201),
    (cmli, CMLI_BRIDGE_HEADS, 9_984_002 - CMLI_HEADS + CMLI_BRIDGE_HEADS),
    (target_cmli, CMLI_HEADS + 2 * (D * W + W), 14_180_354),
])
def test_inspect_counts_the_new_heads_at_real_size(module, extra, total):
  result = count(module.get_config())  # what `python -m bridgejax.param_count --config ... --json` prints
  assert result["trainable_params"] == count(crossatt_k12.get_config())["trainable_params"] + extra == total
  new = {k: v for k, v in result["by_module"].items() if k.startswith(("ret/token_type", "ret/cmli", "ret/target"))}
  assert sum(new.values()) == extra


# ------------------------------------------------------------------ options off: nothing changes

def test_options_off_keep_the_parameter_tree_and_the_program(tiny_model):
  """A config from before the options (no token_type_embeddings, cmli, loss.cmli/target_cmli keys),
  completed as every config read is (config_schema.complete), and today's base config with them off
  give the same tree and the same compiled program."""
  config, vision_config, llm_config, frozen, _ = tiny_model
  old = config.copy_and_resolve_references()
  del old["token_type_embeddings"], old["cmli"], old.loss["cmli"], old.loss["target_cmli"]
  old = config_schema.complete(old)
  runs = []
  for c in (old, config):
    model = BridgeModel.create(c, vision_config, llm_config)
    trainable = model.init_trainable(jax.random.key(0), frozen)
    assert set(trainable["ret"]) == RET_KEYS
    loss_fn = jax.jit(model.loss)
    args = (trainable, frozen, caption_batch(), jax.random.key(1))
    runs.append((jax.tree.structure(trainable), loss_fn.lower(*args).as_text(), np.asarray(loss_fn(*args)[0])))
  assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
  assert runs[0][2].tobytes() == runs[1][2].tobytes()


# ------------------------------------------------------------------ token-type embeddings

def _tte_model(tiny_fixture, **overrides):
  config, vision_config, llm_config, frozen, _ = tiny_fixture
  config = config.copy_and_resolve_references()
  config.token_type_embeddings = True
  config.update(overrides)
  return BridgeModel.create(config, vision_config, llm_config), frozen


def test_token_types_start_as_identity_and_enter_as_eq_4_5(tiny_model):
  on, frozen = _tte_model(tiny_model)
  off = BridgeModel.create(tiny_model[0], tiny_model[1], tiny_model[2])
  trainable = on.init_trainable(jax.random.key(0), frozen)
  plain = {**trainable, "ret": {k: v for k, v in trainable["ret"].items() if k not in TYPE_KEYS}}
  batch = caption_batch()
  row_norm = np.mean(np.linalg.norm(np.asarray(frozen["llm"]["embedding"]), axis=-1))
  for name in ("token_type_image", "token_type_text"):  # they start at the frozen rows' norm, as [RET]
    np.testing.assert_allclose(np.linalg.norm(trainable["ret"][name]), row_norm, rtol=1e-5)

  def caption_pass(model):
    def run(t):
      params = {**frozen, **t}
      tokens = model.encode_images(params, jnp.asarray(batch["image"])).tokens
      embeds, mask, _, _ = model.caption_inputs(params, tokens, jnp.asarray(batch["text_ids"]), batch["text_mask"])
      return model.run_llm(params, embeds, mask)[0], embeds, mask, tokens.shape[1]
    return jax.jit(run)

  passes = {"on": caption_pass(on), "off": caption_pass(off)}
  caption_logits = lambda model, t: tuple(np.asarray(x) for x in passes[model](t))

  ref, ref_embeds, mask, k = caption_logits("off", plain)
  got, embeds = caption_logits("on", trainable)[:2]
  real = mask.astype(bool)
  input_change = np.linalg.norm(embeds - ref_embeds, axis=-1)[real] / np.linalg.norm(ref_embeds, axis=-1)[real]
  logit_change = np.max(np.abs(got - ref)[real]) / np.max(np.abs(ref)[real])
  assert 0 < np.median(input_change) < 3e-5 and 0 < logit_change < 3e-5, (np.median(input_change), logit_change)

  # λ = 0: exactly the model without TTE; λ = 1: every input moves by its type's embedding (eq. 4-5)
  zero = {**trainable, "ret": {**trainable["ret"], "token_type_scale": jnp.zeros_like(trainable["ret"]["token_type_scale"])}}
  np.testing.assert_array_equal(caption_logits("on", zero)[0], ref)
  one = {**trainable, "ret": {**trainable["ret"], "token_type_scale": jnp.ones_like(trainable["ret"]["token_type_scale"])}}
  scale = on.llm.embed_scale
  shifted = caption_logits("on", one)[1]
  np.testing.assert_allclose(shifted[:, :k] - ref_embeds[:, :k],
                             np.broadcast_to(scale * trainable["ret"]["token_type_image"], (4, k, 32)), atol=1e-5)
  np.testing.assert_allclose(shifted[:, k:] - ref_embeds[:, k:],  # BOS, caption, padding alike
                             np.broadcast_to(scale * trainable["ret"]["token_type_text"], (4, 8, 32)), atol=1e-5)

  grads = jax.jit(jax.grad(lambda t: on.loss(t, frozen, batch, jax.random.key(0))[0]))(trainable)["ret"]
  assert all(np.any(grads[name] != 0) for name in TYPE_KEYS)


def test_generation_adds_the_text_type_to_every_token_it_embeds(tiny_model):
  """Sampling with embed_offset equals recomputing the whole sequence through embed_text (which
  adds the text type) at every step, with the same keys; without the offset it samples otherwise."""
  from bridgejax.generate import Sampler, generate
  model, frozen = _tte_model(tiny_model)
  trainable = model.init_trainable(jax.random.key(0), frozen)
  trainable["ret"]["token_type_scale"] = jnp.ones_like(trainable["ret"]["token_type_scale"])
  params = {**frozen, **trainable}
  ids = jnp.asarray([[2, 5, 9], [2, 7, 11]], jnp.int32)
  rng, steps = jax.random.key(0), 6
  run = lambda offset: np.asarray(generate(
      model.llm, params["llm"], inputs_embeds=model.embed_text(params, ids), attention_mask=np.ones(ids.shape, np.int32),
      extra_embeddings=params["ret"]["ret_embedding"], embed_offset=offset, max_new_tokens=steps, method="sample",
      rng=rng, eos_token_ids=()))
  forward = jax.jit(lambda seq: model.run_llm(params, model.embed_text(params, seq), jnp.ones(seq.shape, jnp.int32))[0])
  seq = ids
  for step in range(steps):
    token = Sampler("sample").choose(forward(seq)[:, -1], jax.random.fold_in(rng, step))
    seq = jnp.concatenate([seq, token[:, None]], axis=1)
  np.testing.assert_array_equal(run(model.text_type_offset(params)), np.asarray(seq[:, 3:]))
  assert not np.array_equal(run(None), np.asarray(seq[:, 3:]))


# ------------------------------------------------------------------ CMLI and Target-CMLI losses

def test_cmli_in_chunks_equals_the_loop_reference_and_all_at_once():
  rng = np.random.default_rng(3)
  n, patches, tokens, d = 6, 5, 4, 8
  v = rng.standard_normal((n, patches, d)).astype(np.float32)
  w = rng.standard_normal((n, tokens, d)).astype(np.float32)
  vm = rng.random((n, patches)) < 0.8
  vm[:, 0] = True
  tm = np.arange(tokens)[None, :] < rng.integers(1, tokens + 1, n)[:, None]
  ref_i2t, ref_t2i = np_cmli(v.astype(np.float64), w.astype(np.float64), vm, tm, 10.0)
  runs = {}
  for chunk in (0, 4, 1):  # 4 -> chunks of 3 (the largest divisor of 6 not above 4)
    fn = lambda a, b, c=chunk: losses.cmli_contrastive_loss(a, b, np.log(10.0), image_mask=vm, text_mask=tm, chunk=c)
    runs[chunk] = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(jnp.asarray(v), jnp.asarray(w))
    (loss, parts), _ = runs[chunk]
    np.testing.assert_allclose([parts["loss_i2t"], parts["loss_t2i"]], [ref_i2t, ref_t2i], rtol=1e-5)
  for chunk in (4, 1):
    for g, r in zip(runs[chunk][1], runs[0][1]):
      np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)


def _np_target_cmli(student_image, teacher, student_text, text_mask, text_match, patch_match, image_match=None):
  """eq. 5-10 with loops: every text token (and, with image_match, every visual token) regresses the
  teacher patch of highest cosine in the matching space; else visual token k regresses patch k."""
  unit = lambda x: x / np.linalg.norm(x)
  i2t, t2i = [], []
  for b in range(len(teacher)):
    def target(query):
      return teacher[b][int(np.argmax([unit(query) @ unit(p) for p in patch_match[b]]))]
    for k, token in enumerate(student_image[b]):
      goal = teacher[b][k] if image_match is None else target(image_match[b][k])
      i2t.append(np.mean((token - goal) ** 2))
    per_token = [np.mean((student_text[b][j] - target(text_match[b][j])) ** 2)
                 for j in range(len(student_text[b])) if text_mask[b][j]]
    t2i.append(np.mean(per_token))
  return np.mean(i2t), np.mean(t2i)


@pytest.mark.parametrize("visual_tokens", [6, 3])  # K = N: position-wise (eq. 7); K != N: matched
def test_target_cmli_equals_the_loop_reference(visual_tokens):
  rng = np.random.default_rng(4)
  b, n, m, width, d = 3, 6, 5, 7, 4
  x = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  student_image, teacher, student_text = x(b, visual_tokens, width), x(b, n, width), x(b, m, width)
  text_match, patch_match = x(b, m, d), x(b, n, d)
  image_match = None if visual_tokens == n else x(b, visual_tokens, d)
  text_mask = np.arange(m)[None, :] < np.array([5, 2, 3])[:, None]
  ref_i2t, ref_t2i = _np_target_cmli(student_image, teacher, student_text, text_mask, text_match, patch_match,
                                     image_match)
  (loss, parts), grads = jax.value_and_grad(
      lambda s_img, s_txt, t: losses.target_cmli_loss(s_img, t, s_txt, text_mask, text_match, patch_match,
                                                      image_match), argnums=(0, 1, 2), has_aux=True)(
      jnp.asarray(student_image), jnp.asarray(student_text), jnp.asarray(teacher))
  np.testing.assert_allclose([parts["loss_i2t"], parts["loss_t2i"]], [ref_i2t, ref_t2i], rtol=1e-5)
  np.testing.assert_allclose(loss, (ref_i2t + ref_t2i) / 2, rtol=1e-5)  # eq. 10
  assert np.all(grads[2] == 0)  # the teacher is a constant
  assert np.all(grads[1][1, 2:] == 0) and np.any(grads[1][1, :2] != 0)  # padding out
  if image_match is None:
    with pytest.raises(ValueError, match="3 student image tokens against 6 teacher patches: pass image_match"):
      losses.target_cmli_loss(student_image[:, :3], teacher, student_text, text_mask, text_match, patch_match)


@pytest.mark.parametrize("image_tokens", ["tower", "bridge", "llm"])
def test_model_wires_cmli_and_target_cmli_into_the_loss(tiny_model, image_tokens):
  """The model's terms equal the loss functions on independently taken pieces: the tower's layer-L
  patches through the post-LayerNorm without CLS, the bridge's visual tokens, the captioning pass's
  states at the visual and caption positions, the text pass's states of the caption tokens (BOS,
  [RET], padding out), the heads as plain matrix products."""
  config, vision_config, llm_config, frozen, _ = tiny_model
  config = config.copy_and_resolve_references()
  config.loss.cmli, config.loss.target_cmli, config.cmli.chunk = 0.5, 0.25, 2
  config.cmli.image_tokens, config.concat_prob = image_tokens, 0.0  # one row per example: a plain reference
  model = BridgeModel.create(config, vision_config, llm_config)
  trainable = model.init_trainable(jax.random.key(0), frozen)
  batch = caption_batch()
  (total, metrics), grads = jax.jit(jax.value_and_grad(model.loss, has_aux=True))(trainable, frozen, batch,
                                                                                  jax.random.key(1))
  assert {"cmli_loss", "target_cmli_loss", "cmli_i2t_loss", "target_cmli_t2i_loss"} <= set(metrics)
  np.testing.assert_allclose(total, metrics["caption_loss"] + metrics["text_loss"] + metrics["contrastive_loss"]
                             + 0.5 * metrics["cmli_loss"] + 0.25 * metrics["target_cmli_loss"], rtol=1e-6)

  params = {**frozen, **trainable}
  ret = jax.tree.map(lambda a: np.asarray(a, np.float64), trainable["ret"])
  dense = lambda name, x: x @ ret[name]["kernel"] + ret[name]["bias"]
  last = np.asarray(jax.jit(model.vision.apply)({"params": frozen["vision"]}, batch["image"]).hidden_states[-1],
                    np.float64)[:, 1:]
  norm = frozen["vision"]["post_norm"]
  patches = ((last - last.mean(-1, keepdims=True)) / np.sqrt(last.var(-1, keepdims=True) + vision_config.layer_norm_eps)
             * np.asarray(norm["scale"]) + np.asarray(norm["bias"]))
  hidden = np.asarray(jax.jit(model._text_pass)(params, batch["text_ids"], batch["text_mask"])[0], np.float64)
  visual = np.asarray(jax.jit(model.encode_images)(params, batch["image"]).tokens, np.float64)  # K = 3 != N = 16

  def caption_pass(params, tokens):
    embeds, full_mask, _, _ = model.caption_inputs(params, tokens, batch["text_ids"], batch["text_mask"])
    return model.llm_hidden(params, embeds, full_mask)
  states = np.asarray(jax.jit(caption_pass)(params, jnp.asarray(visual, jnp.float32)), np.float64)
  visual_states, caption_states = states[:, :3], states[:, 3:]
  lengths = batch["text_mask"].sum(1)
  caption = (np.arange(8)[None, :] >= 1) & (np.arange(8)[None, :] < lengths[:, None] - 1)
  patch_match, text_match = dense("cmli_image_proj", patches), dense("cmli_text_proj", hidden)
  image_side = {"tower": patch_match, "bridge": dense("cmli_visual_proj", visual) if image_tokens != "tower" else None,
                "llm": dense("cmli_visual_proj", visual_states) if image_tokens != "tower" else None}[image_tokens]
  ref_i2t, ref_t2i = np_cmli(image_side, text_match, np.ones(image_side.shape[:2], bool), caption,
                              np.exp(ret["cmli_logit_scale"]))
  np.testing.assert_allclose(metrics["cmli_loss"], (ref_i2t + ref_t2i) / 2, rtol=2e-5)

  ref_i2t, ref_t2i = _np_target_cmli(dense("target_image_proj", visual), patches,
                                     dense("target_text_proj", caption_states), caption,
                                     dense("cmli_text_proj", caption_states), patch_match, dense("cmli_text_proj", visual))
  np.testing.assert_allclose([metrics["target_cmli_i2t_loss"], metrics["target_cmli_t2i_loss"]], [ref_i2t, ref_t2i],
                             rtol=2e-5)
  used = {"tower": "cmli_image_proj", "bridge": "cmli_visual_proj", "llm": "cmli_visual_proj"}[image_tokens]
  assert all(np.any(grads["ret"][name]["kernel"] != 0) for name in
             (used, "cmli_text_proj", "target_image_proj", "target_text_proj"))


# ------------------------------------------------------------------ a run: train, save, load

def test_a_run_with_every_option_trains_saves_and_loads(tmp_path):
  """One train step with TTE, CMLI and Target-CMLI on the tiny world; the checkpoint and its
  config.json load back through Pipeline.from_workdir with the new heads, and it captions."""
  from bridgejax.experiment import build
  from bridgejax.inference import Pipeline
  from bridgejax.train.checkpoint import Checkpointer
  from bridgejax.train.optimizer import make_optimizer
  from bridgejax.train.step import TrainState, make_train_step

  config = tiny_eval_world.config()
  config.token_type_embeddings, config.loss.cmli, config.loss.target_cmli = True, 1.0, 1.0
  setup = build(config)
  trainable = setup.model.init_trainable(jax.random.key(1), setup.frozen)
  optimizer = make_optimizer(config.optim)
  step = jax.jit(make_train_step(setup.model, optimizer, seed=0))
  rng = np.random.default_rng(0)
  batch = {"image": rng.standard_normal((4, 3, 28, 28)).astype(np.float32),
           "text_ids": np.array([[2, 5, 6, 7, 8, setup.model.ret_id]] * 4, np.int32),
           "text_mask": np.ones((4, 6), np.int32)}
  norm = jnp.mean(jnp.linalg.norm(setup.frozen["llm"]["embedding"], axis=-1))
  state, metrics = step(TrainState.create(trainable, optimizer), setup.frozen, batch, norm)
  assert float(metrics["skipped"]) == 0 and np.isfinite(float(metrics["target_cmli_loss"]))

  workdir = str(tmp_path)
  checkpointer = Checkpointer(workdir)
  checkpointer.save(1, state, force=True)
  checkpointer.wait()
  checkpointer.close()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  pipe = Pipeline.from_workdir(workdir, max_new_tokens=3, batch_size=4)
  assert TYPE_KEYS | {"cmli_text_proj", "target_image_proj"} <= set(pipe.params["ret"])
  for name in TYPE_KEYS:
    np.testing.assert_array_equal(pipe.params["ret"][name], state.params["ret"][name])
  assert isinstance(pipe.caption(np.zeros((28, 28, 3), np.uint8)), str)
