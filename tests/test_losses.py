"""Losses against torch recomputations (FROMAGe's code paths), and InfoNCE on 8 fake CPU devices."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from bridgejax import losses
from model_helper import np_cmli

B, T, V = 4, 7, 11


def _caption_batch(seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.standard_normal((B, T, V)).astype(np.float32) * 3
  labels = rng.integers(0, V, (B, T))
  # a visual prefix of 2 positions, captions of different lengths, right padding
  mask = np.zeros((B, T), bool)
  for b, length in enumerate([5, 3, 1, 4]):
    mask[b, 2:2 + length] = True
  return logits, labels, mask


def _torch_hf_loss(logits, labels, mask):
  """transformers' causal-LM loss as FROMAGe gets it: shift, CrossEntropyLoss(ignore_index=-100), mean."""
  full_labels = torch.from_numpy(np.where(mask, labels, -100))
  lt = torch.from_numpy(logits.astype(np.float64)).requires_grad_()
  loss = torch.nn.functional.cross_entropy(lt[:, :-1].reshape(-1, V), full_labels[:, 1:].reshape(-1),
                                           ignore_index=-100)
  loss.backward()
  return loss.item(), lt.grad.numpy()


def test_caption_loss_equals_hf_causal_lm_loss_and_gradient():
  logits, labels, mask = _caption_batch()
  ref, ref_grad = _torch_hf_loss(logits, labels, mask)
  value, grad = jax.value_and_grad(losses.caption_loss)(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
  np.testing.assert_allclose(value, ref, rtol=1e-6)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)
  # the normalisation is over target tokens of the whole batch, not a mean of per-example means
  per_token = -jax.nn.log_softmax(jnp.asarray(logits[:, :-1]))[np.arange(B)[:, None], np.arange(T - 1), labels[:, 1:]]
  assert np.isclose(value, np.sum(np.where(mask[:, 1:], per_token, 0)) / mask[:, 1:].sum(), rtol=1e-6)


def test_caption_loss_masks_hf_labels_shift_and_empty():
  logits, labels, mask = _caption_batch(1)
  ref, _ = _torch_hf_loss(logits, labels, mask)
  hf_labels = np.where(mask, labels, -100)
  np.testing.assert_allclose(losses.caption_loss(jnp.asarray(logits), jnp.asarray(hf_labels)), ref, rtol=1e-6)
  pre_shifted = losses.caption_loss(jnp.asarray(logits[:, :-1]), jnp.asarray(labels[:, 1:]),
                                    jnp.asarray(mask[:, 1:]), shift=False)
  np.testing.assert_allclose(pre_shifted, ref, rtol=1e-6)
  # position 0 of the mask never counts: nothing predicts it
  mask0 = mask.copy()
  mask0[:, 0] = True
  np.testing.assert_allclose(losses.caption_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask0)),
                             ref, rtol=1e-6)
  assert float(losses.caption_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.zeros((B, T), bool))) == 0.0
  # bf16 logits are scored in float32
  bf16 = losses.caption_loss(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels), jnp.asarray(mask))
  assert bf16.dtype == jnp.float32 and abs(float(bf16) - ref) < 0.05
  with pytest.raises(ValueError, match="must be labels.shape"):
    losses.caption_loss(jnp.asarray(logits), jnp.asarray(labels[:, :-1]), jnp.asarray(mask[:, :-1]))


def _split_head(seed=0, width=6, vocab=13, extra=1):
  """A linear LM head as Gemma.split_logits computes it: (frozen table logits, trainable rows' logits)."""
  rng = np.random.default_rng(seed)
  table = jnp.asarray(rng.standard_normal((vocab, width)), jnp.float32)
  rows = jnp.asarray(rng.standard_normal((extra, width)), jnp.float32)
  head = lambda h, rows: (jnp.einsum("BTD,VD->BTV", h, table), jnp.einsum("BTD,XD->BTX", h, rows))
  return head, rows


def test_chunked_caption_loss_equals_caption_loss_and_its_gradients():
  """The chunked LM-head CE against caption_loss of the whole logits, 17 positions (not a multiple
  of any chunk tried), padding and a masked prefix, targets in the table and in the extra row ([RET]):
  3 chunks of 6 positions and 6 of 3 (1 padded each), and 17 of 1. Measured: the loss equal, the
  gradients w.r.t. the hidden states and the extra row within 5e-8 and 1.4e-7 of their largest
  entry; asserted within 1.2e-7 relative and 3e-7 of the largest entry."""
  head, rows = _split_head()
  rng = np.random.default_rng(1)
  b, t = 3, 17
  hidden = jnp.asarray(rng.standard_normal((b, t, 6)), jnp.float32)
  labels = rng.integers(0, 14, (b, t))  # 13 is the extra row's id ([RET])
  labels[:, 5] = 13
  mask = np.zeros((b, t), bool)
  for row, (start, end) in enumerate([(2, 17), (0, 9), (4, 5)]):
    mask[row, start:end] = True
  labels, mask = jnp.asarray(labels), jnp.asarray(mask)
  whole = lambda h, r: losses.caption_loss(head(h, r), labels, mask, shift=False)
  ref, (ref_h, ref_r) = jax.value_and_grad(whole, argnums=(0, 1))(hidden, rows)
  position = 14 * 4  # float32 bytes of one position's logits in a row
  for row_bytes, chunks in ((6 * position, 3), (3 * position, 6), (position, 17)):
    chunked = lambda h, r: losses.chunked_caption_loss(lambda x: head(x, r), h, labels, mask, row_bytes=row_bytes,
                                                          whole_bytes=0)
    traced = jax.make_jaxpr(chunked)(hidden, rows)
    assert [e.params["length"] for e in traced.eqns if e.primitive.name == "scan"] == [chunks]
    value, (grad_h, grad_r) = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)))(hidden, rows)
    np.testing.assert_allclose(value, ref, rtol=1.2e-7)
    np.testing.assert_allclose(grad_h, ref_h, rtol=3e-7, atol=3e-7 * float(np.abs(ref_h).max()))
    np.testing.assert_allclose(grad_r, ref_r, rtol=3e-7, atol=3e-7 * float(np.abs(ref_r).max()))
  # everything in one block: caption_loss itself, no loop; an empty mask gives 0 as there
  one = jax.make_jaxpr(lambda h: losses.chunked_caption_loss(lambda x: head(x, rows), h, labels, mask))(hidden)
  assert not [e for e in one.eqns if e.primitive.name == "scan"]
  empty = losses.chunked_caption_loss(lambda x: head(x, rows), hidden, labels, jnp.zeros((b, t), bool),
                                      row_bytes=position, whole_bytes=0)
  # logits that fit whole_bytes in all are kept whole, however many blocks a row would take
  small = jax.make_jaxpr(lambda h: losses.chunked_caption_loss(lambda x: head(x, rows), h, labels, mask,
                                                               row_bytes=position, whole_bytes=b * t * position))(hidden)
  assert not [e for e in small.eqns if e.primitive.name == "scan"]
  assert float(empty) == 0.0


def test_l2_normalize_equals_torch_on_numpy_and_jax():
  x = np.random.default_rng(2).standard_normal((3, 4, 5)).astype(np.float32)
  x[1, 2] = 0.0  # a zero row stays finite (zero), as with torch's F.normalize
  ref = torch.nn.functional.normalize(torch.from_numpy(x), dim=-1).numpy()
  host = losses.l2_normalize(x.astype(np.float16))  # evaluation's ranking: numpy in, numpy out
  assert type(host) is np.ndarray and host.dtype == np.float32
  np.testing.assert_allclose(host, ref, atol=1e-3)
  np.testing.assert_allclose(losses.l2_normalize(x), ref, rtol=1e-6, atol=1e-7)
  traced = jax.jit(losses.l2_normalize)(jnp.asarray(x, jnp.bfloat16))  # the losses: jax in, jax out
  assert isinstance(traced, jax.Array) and traced.dtype == jnp.float32
  np.testing.assert_allclose(traced, ref, atol=1e-2)
  np.testing.assert_allclose(jax.jit(losses.l2_normalize)(jnp.asarray(x)), ref, rtol=1e-6, atol=1e-7)


def _embeddings(n=6, d=5, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((n, d)).astype(np.float32),
          np.float32(np.log(1 / 0.07)))


def _torch_fromage_contrastive(img, txt, log_scale, max_scale=None):
  """FROMAGe main.py/models.py: normalise, scale the visual side, CE both ways, mean."""
  vi = torch.from_numpy(img.astype(np.float64)).requires_grad_()
  te = torch.from_numpy(txt.astype(np.float64)).requires_grad_()
  ls = torch.tensor(float(log_scale), dtype=torch.float64, requires_grad=True)
  visual_embs = vi / vi.norm(dim=1, keepdim=True)
  last_embedding = te / te.norm(dim=1, keepdim=True)
  scale = ls.exp() if max_scale is None else ls.exp().clamp(max=max_scale)
  logits_per_image = (scale * visual_embs) @ last_embedding.t()
  logits_per_text = logits_per_image.t()
  target = torch.arange(len(img))
  caption_loss = torch.nn.functional.cross_entropy(logits_per_text, target)
  image_loss = torch.nn.functional.cross_entropy(logits_per_image, target)
  loss = (caption_loss + image_loss) / 2.0
  loss.backward()
  return (loss.item(), image_loss.item(), caption_loss.item()), (vi.grad.numpy(), te.grad.numpy(), ls.grad.item())


@pytest.mark.parametrize("log_scale,max_scale", [(np.log(1 / 0.07), None), (np.log(150.0), 100.0)],
                         ids=["init", "clamped"])
def test_contrastive_loss_equals_fromage(log_scale, max_scale):
  img, txt, _ = _embeddings()
  (ref, ref_i2t, ref_t2i), ref_grads = _torch_fromage_contrastive(img, txt, log_scale, max_scale)

  def f(i, t, s):
    return losses.contrastive_loss(i, t, s, max_scale=max_scale)

  (value, parts), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(
      jnp.asarray(img), jnp.asarray(txt), jnp.float32(log_scale))
  np.testing.assert_allclose(value, ref, rtol=1e-5)
  np.testing.assert_allclose(parts["loss_i2t"], ref_i2t, rtol=1e-5)
  np.testing.assert_allclose(parts["loss_t2i"], ref_t2i, rtol=1e-5)
  np.testing.assert_allclose(parts["scale"], min(np.exp(log_scale), max_scale or np.inf), rtol=1e-6)
  for ours, theirs in zip(grads, ref_grads):
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)


def test_retrieval_accuracy_equals_torch_topk():
  rng = np.random.default_rng(3)
  n = 12
  img = rng.standard_normal((n, 4)).astype(np.float32)
  txt = (img + 0.8 * rng.standard_normal((n, 4))).astype(np.float32)  # some hits, some misses
  acc = losses.retrieval_accuracy(jnp.asarray(img), jnp.asarray(txt))
  sim = torch.nn.functional.normalize(torch.from_numpy(img)) @ torch.nn.functional.normalize(torch.from_numpy(txt)).t()
  for name, logits in (("i2t", sim), ("t2i", sim.t())):
    top5 = logits.topk(5, dim=1).indices
    for k in (1, 5):
      ref = 100.0 * (top5[:, :k] == torch.arange(n)[:, None]).any(1).float().mean().item()
      np.testing.assert_allclose(acc[f"{name}_top{k}"], ref, rtol=1e-6)
  _, parts = losses.contrastive_loss(jnp.asarray(img), jnp.asarray(txt), 0.0)
  assert {"i2t_top1", "i2t_top5", "t2i_top1", "t2i_top5"} <= set(parts)


def test_total_loss_weightings():
  parts = {"caption": jnp.float32(2.0), "text": jnp.float32(3.0), "contrastive": jnp.float32(5.0)}
  assert float(losses.total_loss(parts)) == 10.0  # FROMAGe: 1·cap + 1·text + 1·(i2t + t2i)/2
  # thesis eq. 5.1 with i2t = 4, t2i = 6: 0.5·2 + 0.5·(4 + 6) = 6
  assert float(losses.total_loss(parts, "thesis_eq5_1")) == 0.5 * 2.0 + 0.5 * (4.0 + 6.0)
  assert float(losses.total_loss({"caption": 2.0, "contrastive": 5.0}, "thesis_eq5_1")) == 6.0  # no text term
  assert float(losses.total_loss(parts, {"text": 0.5})) == 2.0 + 1.5 + 5.0
  assert float(losses.total_loss(parts, ml_collections.ConfigDict(dict(caption=2.0, contrastive=0.0)))) == 7.0
  with pytest.raises(ValueError, match="unknown loss weighting 'clip'"):
    losses.total_loss(parts, "clip")
  with pytest.raises(ValueError, match=r"unknown loss weight key\(s\) \['retrieval'\]"):
    losses.total_loss(parts, {"retrieval": 1.0})
  with pytest.raises(ValueError, match="parts has no 'text'"):
    losses.total_loss({"caption": 1.0, "contrastive": 1.0})


def test_infonce_on_8_sharded_devices_equals_single_device():
  """GSPMD (batch sharded over 8 fake CPU devices) and shard_map(axis_name=...) vs one device, for
  InfoNCE and for CMLI (chunked)."""
  script = pathlib.Path(__file__).with_name("sharded_infonce_helper.py")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["devices"] == 8 and report["shards"] == 8 and "all-gather" in report["collectives"]
  assert {"cmli_gspmd_grad_text", "cmli_shard_map_grad_image"} <= set(report["relative_errors"])
  for key, err in report["relative_errors"].items():
    assert err <= 1e-5, (key, err)


def test_cmli_equals_loop_reference_and_reduces_to_infonce():
  rng = np.random.default_rng(5)
  n, patches, tokens, d = 5, 6, 4, 8
  v = rng.standard_normal((n, patches, d)).astype(np.float32)
  w = rng.standard_normal((n, tokens, d)).astype(np.float32)
  vm = np.ones((n, patches), bool)
  vm[:, 0] = False  # CLS out
  tm = np.arange(tokens)[None, :] < np.array([4, 2, 3, 1, 4])[:, None]  # padding out
  log_scale = np.log(1 / 0.07)
  ref_i2t, ref_t2i = np_cmli(v.astype(np.float64), w.astype(np.float64), vm, tm, np.exp(log_scale))
  (loss, parts), grads = jax.value_and_grad(
      lambda a, b: losses.cmli_contrastive_loss(a, b, log_scale, image_mask=jnp.asarray(vm),
                                                text_mask=jnp.asarray(tm)), argnums=(0, 1), has_aux=True)(
      jnp.asarray(v), jnp.asarray(w))
  np.testing.assert_allclose(parts["loss_i2t"], ref_i2t, rtol=1e-5)
  np.testing.assert_allclose(parts["loss_t2i"], ref_t2i, rtol=1e-5)
  np.testing.assert_allclose(loss, (ref_i2t + ref_t2i) / 2, rtol=1e-5)
  assert np.all(np.isfinite(grads[0])) and np.all(grads[0][:, 0] == 0)  # masked CLS gets no gradient
  assert np.all(np.isfinite(grads[1])) and np.all(grads[1][3, 1:] == 0)
  # one token per side: CMLI is the global InfoNCE
  img, txt, _ = _embeddings()
  one = losses.cmli_contrastive_loss(jnp.asarray(img)[:, None], jnp.asarray(txt)[:, None], log_scale)[0]
  np.testing.assert_allclose(one, losses.contrastive_loss(jnp.asarray(img), jnp.asarray(txt), log_scale)[0], rtol=1e-6)
