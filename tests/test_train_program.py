"""What the compiled training step is, read from its jaxpr and XLA's memory analysis: one LLM
program whatever the concat coin says, no float32 GEMM of vocabulary size in a bf16 step,
rematerialisation that changes no number, and float32 that means float32.

Remat's memory saving is not asserted here: XLA's CPU pipeline drops JAX's optimization barriers
and CSEs the recomputation away (a jax.checkpoint'ed 8-layer MLP compiles to the same 32 GEMMs and
the same temp buffer), so only a GPU or TPU compile shows it (bench/train_step.py --remat).
"""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import base
from bridgejax import losses
from bridgejax.model import BridgeModel
from bridgejax.models.clip import CLIPVisionConfig
from bridgejax.models.gemma import GemmaConfig
from bridgejax.train.step import TrainState, make_train_step

VOCAB = 97  # no other dimension of the model has this size


def _model(compute_dtype="float32", *, remat="none", concat_prob=0.5, matmul_precision="", bridge="crossatt",
           llm_layers=2, width=32):
  config = base.get_config()
  config.bridge = ml_collections.ConfigDict({"name": bridge, "k": 3, "layer": -2})
  if bridge == "cls_linear":
    config.bridge.post_norm = True
  config.concat_prob, config.remat, config.matmul_precision = concat_prob, remat, matmul_precision
  vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, image_size=28,
                            patch_size=7)
  llm = GemmaConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_layers=llm_layers,
                    num_heads=4, num_kv_heads=1, head_dim=8)
  dtype = jnp.dtype(compute_dtype)
  model = BridgeModel.create(config, vision, llm, compute_dtype=dtype, frozen_param_dtype=dtype)
  key_v, key_l = jax.random.split(jax.random.key(0))
  images = jnp.zeros((1, 3, 28, 28))
  frozen = {"vision": model.vision.init(key_v, images)["params"],
            "llm": model.llm.init(key_l, jnp.zeros((1, 4), jnp.int32))["params"]}
  frozen = jax.tree.map(lambda x: (x * 4).astype(dtype), frozen)  # larger weights: activations matter
  return model, frozen


def _batch(batch=4, length=8, seed=0):
  rng = np.random.default_rng(seed)
  ids = np.zeros((batch, length), np.int32)
  mask = np.zeros((batch, length), np.int32)
  for row in range(batch):
    n = int(rng.integers(3, length + 1))
    ids[row, :n] = [2, *rng.integers(3, VOCAB, n - 2), VOCAB]  # BOS ... [RET]
    mask[row, :n] = 1
  return {"image": rng.standard_normal((batch, 3, 28, 28)).astype(np.float32), "text_ids": ids, "text_mask": mask}


def _step(model, frozen, batch):
  optimizer = optax.adamw(1e-3)
  state = TrainState.create(model.init_trainable(jax.random.key(1), frozen), optimizer)
  step = make_train_step(model, optimizer, seed=0)
  return step, (state, frozen, batch, jnp.float32(1.0))


def _equations(jaxpr):
  """Every equation of a jaxpr, recursing into sub-jaxprs (pjit, remat, cond branches, custom rules)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          yield from _equations(sub)


def _dots(jaxpr):
  return [e for e in _equations(jaxpr) if e.primitive.name == "dot_general"]


def test_bf16_step_has_no_float32_vocabulary_gemm_and_no_llm_in_a_cond():
  model, frozen = _model("bfloat16", concat_prob=0.5)
  step, args = _step(model, frozen, _batch())
  jaxpr = jax.make_jaxpr(step)(*args).jaxpr
  vocab_dots = [e for e in _dots(jaxpr) if any(VOCAB in v.aval.shape for v in e.invars)]
  # forward pass and backward (activations only: the table is frozen) of both passes' LM heads
  assert len(vocab_dots) >= 4, len(vocab_dots)
  for eqn in vocab_dots:
    assert [str(v.aval.dtype) for v in eqn.invars] == ["bfloat16", "bfloat16"], eqn
  for eqn in _equations(jaxpr):
    if eqn.primitive.name == "cond":
      branch_dots = [d for branch in eqn.params["branches"] for d in _dots(branch.jaxpr)]
      assert not branch_dots, f"a cond branch holds {len(branch_dots)} matmuls"
  # the [RET] column is its own product: no (V + 1)-row table is joined or differentiated
  assert not any(VOCAB + 1 in v.aval.shape for e in _equations(jaxpr) for v in e.outvars)


def test_remat_changes_no_number():
  batch = _batch()
  results = {}
  for mode in ("none", "llm", "all"):
    model, frozen = _model(remat=mode, concat_prob=1.0)
    trainable = model.init_trainable(jax.random.key(1), frozen)
    args = (trainable, frozen, batch, jax.random.key(0))
    traced = jax.jit(jax.value_and_grad(model.loss, has_aux=True)).trace(*args)
    results[mode] = traced.lower().compile()(*args)
    remats = [e for e in _equations(traced.jaxpr.jaxpr) if "remat" in e.primitive.name or
              e.primitive.name == "checkpoint"]
    assert bool(remats) == (mode != "none"), mode
  (loss_a, _), grads_a = results["none"]
  for mode in ("llm", "all"):
    (loss_b, _), grads_b = results[mode]
    assert float(loss_b) == pytest.approx(float(loss_a), rel=1e-6), mode
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(np.abs(a).max()))  # XLA may reassociate


def _precisions(fn, *args):
  return {e.params["precision"] for e in _dots(jax.make_jaxpr(fn)(*args).jaxpr)}


def test_float32_means_float32_and_tf32_is_an_opt_in():
  batch, rng = _batch(), jax.random.key(0)
  highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
  model, frozen = _model("float32")
  trainable = model.init_trainable(jax.random.key(1), frozen)
  assert _precisions(jax.grad(lambda t: model.loss(t, frozen, batch, rng)[0]), trainable) == {highest}
  model, _ = _model("float32", matmul_precision="tensorfloat32")
  assert _precisions(jax.grad(lambda t: model.loss(t, frozen, batch, rng)[0]), trainable) == {
      (jax.lax.Precision.HIGH, jax.lax.Precision.HIGH)}
  # the frozen backbones on their own (as loaded for inference) too
  images = jnp.asarray(batch["image"])
  assert _precisions(lambda p: model.vision.apply({"params": p}, images), frozen["vision"]) == {highest}
  assert _precisions(lambda p: model.llm.apply({"params": p}, batch["text_ids"]), frozen["llm"]) == {highest}
  # bf16 compute keeps the backend default; an explicit JAX setting wins over the automatic one
  model, frozen16 = _model("bfloat16")
  assert _precisions(lambda t: model.loss(t, frozen16, batch, rng)[0], trainable) == {None}
  with jax.default_matmul_precision("bfloat16"):
    model, _ = _model("float32")
    assert _precisions(lambda t: model.loss(t, frozen, batch, rng)[0], trainable) == {
        (jax.lax.Precision.DEFAULT, jax.lax.Precision.DEFAULT)}


def test_bf16_loss_stays_within_todays_distance_of_float32():
  """Logits now leave the LM head in bfloat16 and are upcast in the loss. Measured on this model
  before the change (float32 logits out of the bf16 GEMM): caption / text CE within 1.6e-5
  relative of float32, gradients within 2.1%; after: 2.0e-5 and 2.1% (vocab 4000, concat on)."""
  batch, rng = _batch(), jax.random.key(3)
  results = {}
  for dtype in ("float32", "bfloat16"):
    model, frozen = _model(dtype, concat_prob=0.0, bridge="cls_linear")
    frozen = jax.tree.map(lambda x: x.astype(dtype), _model("float32", concat_prob=0.0, bridge="cls_linear")[1])
    trainable = model.init_trainable(jax.random.key(1), frozen)
    results[dtype] = jax.jit(jax.value_and_grad(model.loss, has_aux=True))(trainable, frozen, batch, rng)
  (_, m32), g32 = results["float32"]
  (_, m16), g16 = results["bfloat16"]
  for key in ("caption_loss", "text_loss"):
    assert float(m16[key]) == pytest.approx(float(m32[key]), rel=1e-3), key
  flat = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
  assert np.linalg.norm(flat(g16) - flat(g32)) / np.linalg.norm(flat(g32)) < 0.05




def test_chunked_lm_loss_changes_no_number(monkeypatch):
  """The LM-head CE of both passes a few positions at a time against the whole logits: blocks of 4
  positions, the text pass's 7 in 2 chunks of 4, the concat trick's 21 in 6 of 4 (1 and 3 padded),
  with remat "none" and "all". Measured (remat "none"): the total loss equal, caption and text CE
  within 2.0e-7 relative, the gradient w.r.t. every trainable parameter within 7.6e-7 of its leaf's
  largest entry ([RET] row 6.4e-8; the k_proj bias's, zero up to 1e-10, aside), 2.3e-7 relative as a
  whole."""
  batch, default, four = _batch(), losses.LOSS_BLOCK_ROW_BYTES, 4 * (VOCAB + 1) * 4
  results = {}
  monkeypatch.setattr(losses, "LOSS_WHOLE_BYTES", 0)  # at this size the logits would all be kept whole
  for mode, row_bytes in (("none", default), ("none", four), ("all", four)):
    monkeypatch.setattr(losses, "LOSS_BLOCK_ROW_BYTES", row_bytes)
    model, frozen = _model(remat=mode, concat_prob=1.0)
    trainable = model.init_trainable(jax.random.key(1), frozen)
    loss = lambda t: model.loss(t, frozen, batch, jax.random.key(0))
    results[mode, row_bytes] = jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)
  (loss_a, metrics_a), grads_a = results.pop(("none", default))
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
  for key, ((loss_b, metrics_b), grads_b) in results.items():
    assert float(loss_b) == pytest.approx(float(loss_a), rel=1e-6), key
    for name in ("caption_loss", "text_loss"):
      assert float(metrics_b[name]) == pytest.approx(float(metrics_a[name]), rel=1e-6), (key, name)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
      np.testing.assert_allclose(b, a, rtol=0, atol=2e-6 * float(np.abs(a).max()) + 1e-9)
    assert np.linalg.norm(flat(grads_b) - flat(grads_a)) < 1e-6 * np.linalg.norm(flat(grads_a)), key


def _vocabulary_rows(text: str) -> int:
  """The most rows (the product of the leading dimensions) of any float32 array of vocabulary width
  that a program's text names: StableHLO's tensor<2x21x97xf32>, XLA HLO's f32[2,21,97]."""
  shapes = [m.split("x") for m in re.findall(rf"tensor<((?:\d+x)+){VOCAB}xf32>", text)]
  shapes += [m.split(",") for m in re.findall(rf"f32\[((?:\d+,)+){VOCAB}\]", text)]
  return max((int(np.prod([int(d) for d in dims if d])) for dims in shapes), default=0)


def test_no_float32_logits_of_the_whole_sequence_when_the_loss_is_chunked(monkeypatch):
  """The train step's float32 vocabulary-wide arrays, in the lowered StableHLO and in XLA's compiled
  HLO: with LOSS_BLOCK_ROW_BYTES forced down to 4 positions (4 x 98 columns x 4 bytes) and
  LOSS_WHOLE_BYTES to 0 they hold at
  most 16 rows (batch x positions): the text pass runs its 4 rows' 7 positions in 2 chunks of 4, the
  concat trick's captioning pass its 2 rows' 21 in 6 of 4. Unchunked (the default at this size) the
  same step holds the captioning pass's whole (2, 21, 97) logits."""
  model, frozen = _model("float32", concat_prob=0.5)
  step, args = _step(model, frozen, _batch())

  def rows():  # a new function each time: jit traces again under the patched constant
    lowered = jax.jit(lambda *a: step(*a)).lower(*args)
    return _vocabulary_rows(lowered.as_text()), _vocabulary_rows(lowered.compile().as_text())

  assert rows() == (42, 42)
  monkeypatch.setattr(losses, "LOSS_WHOLE_BYTES", 0)
  monkeypatch.setattr(losses, "LOSS_BLOCK_ROW_BYTES", 4 * (VOCAB + 1) * 4)
  assert rows() == (16, 16)
