"""Run by tests/test_losses.py in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8
(the flag must be set before jax is imported, and the rest of the suite keeps one device).

InfoNCE value and gradients (image, text, logit scale) on a batch sharded over ('data', 'model') =
(8, 1) fake CPU devices, by GSPMD under jit and by jax.shard_map with axis_name='data', against the
unsharded single-device computation; the same for the token-wise CMLI loss (masked tokens, scored
in chunks of images), against its unchunked single-device value. Prints one JSON line: device
count, shard count, max relative errors.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from bridgejax import losses


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def main():
  batch, width = 32, 16
  rng = np.random.default_rng(0)
  img = rng.standard_normal((batch, width)).astype(np.float32)
  txt = (0.5 * img + rng.standard_normal((batch, width))).astype(np.float32)
  log_scale = jnp.float32(np.log(1 / 0.07))

  def global_loss(i, t, s):
    return losses.contrastive_loss(i, t, s)

  grad_fn = jax.jit(jax.value_and_grad(global_loss, argnums=(0, 1, 2), has_aux=True))
  dev0 = jax.devices()[0]
  (ref, ref_parts), ref_grads = grad_fn(jax.device_put(img, dev0), jax.device_put(txt, dev0), log_scale)

  mesh = jax.make_mesh((8, 1), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  batch_sharding = NamedSharding(mesh, P("data"))
  img_s, txt_s = jax.device_put(img, batch_sharding), jax.device_put(txt, batch_sharding)
  scale_s = jax.device_put(log_scale, NamedSharding(mesh, P()))
  shards = len({str(s.index) for s in img_s.addressable_shards})
  assert img_s.addressable_shards[0].data.shape == (batch // 8, width)

  errors = {}
  with jax.set_mesh(mesh):
    (val, parts), grads = grad_fn(img_s, txt_s, scale_s)
    hlo = grad_fn.lower(img_s, txt_s, scale_s).compile().as_text()
  # the computation really ran split: XLA inserted collectives, and the gradients stay batch-sharded
  collectives = sorted({op for op in ("all-gather", "all-reduce", "reduce-scatter", "all-to-all") if op in hlo})
  assert collectives, "GSPMD inserted no collective: the batch was not sharded"
  assert grads[0].sharding.is_equivalent_to(batch_sharding, 2), grads[0].sharding
  errors["gspmd_loss"] = rel(val, ref)
  errors["gspmd_loss_i2t"] = rel(parts["loss_i2t"], ref_parts["loss_i2t"])
  errors["gspmd_loss_t2i"] = rel(parts["loss_t2i"], ref_parts["loss_t2i"])
  errors["gspmd_acc_t2i_top1"] = rel(parts["t2i_top1"], ref_parts["t2i_top1"])
  for name, g, r in zip(("image", "text", "scale"), grads, ref_grads):
    errors[f"gspmd_grad_{name}"] = rel(g, r)

  def local_loss(i, t, s):  # per-device shards in, global loss out (replicated)
    loss, parts = losses.contrastive_loss(i, t, s, axis_name="data")
    return loss, parts["loss_i2t"]

  mapped = jax.shard_map(local_loss, mesh=mesh, in_specs=(P("data"), P("data"), P()), out_specs=(P(), P()))
  smap_fn = jax.jit(jax.value_and_grad(mapped, argnums=(0, 1, 2), has_aux=True))
  (val, i2t), grads = smap_fn(img_s, txt_s, scale_s)
  errors["shard_map_loss"] = rel(val, ref)
  errors["shard_map_loss_i2t"] = rel(i2t, ref_parts["loss_i2t"])
  for name, g, r in zip(("image", "text", "scale"), grads, ref_grads):
    errors[f"shard_map_grad_{name}"] = rel(g, r)

  errors.update(cmli_errors(mesh, batch_sharding))
  print(json.dumps({"devices": jax.device_count(), "shards": shards, "collectives": collectives, "loss": float(ref),
                    "relative_errors": errors}))


def cmli_errors(mesh, batch_sharding):
  """CMLI (losses.cmli_contrastive_loss) by GSPMD and shard_map on 8 devices against 1."""
  batch, patches, tokens, width = 32, 5, 4, 8
  rng = np.random.default_rng(1)
  img = rng.standard_normal((batch, patches, width)).astype(np.float32)
  txt = (0.5 * img[:, :tokens] + rng.standard_normal((batch, tokens, width))).astype(np.float32)
  img_mask = np.ones((batch, patches), bool)
  txt_mask = np.arange(tokens)[None, :] < rng.integers(1, tokens + 1, batch)[:, None]  # padding out
  log_scale = jnp.float32(np.log(1 / 0.07))
  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

  def global_loss(i, t, s, im, tm, chunk=0):
    loss, parts = losses.cmli_contrastive_loss(i, t, s, image_mask=im, text_mask=tm, chunk=chunk)
    return loss, parts["loss_i2t"]

  dev0 = jax.devices()[0]
  (ref, ref_i2t), ref_grads = grad(global_loss)(*(jax.device_put(x, dev0) for x in (img, txt)), log_scale,
                                                img_mask, txt_mask)
  sharded = [jax.device_put(x, batch_sharding) for x in (img, txt)]
  masks = [jax.device_put(x, batch_sharding) for x in (img_mask, txt_mask)]
  scale = jax.device_put(log_scale, NamedSharding(mesh, P()))
  errors = {}
  with jax.set_mesh(mesh):
    (val, i2t), grads = grad(lambda *a: global_loss(*a, chunk=8))(*sharded, scale, *masks)
  errors["cmli_gspmd_loss"], errors["cmli_gspmd_loss_i2t"] = rel(val, ref), rel(i2t, ref_i2t)
  for name, g, r in zip(("image", "text", "scale"), grads, ref_grads):
    errors[f"cmli_gspmd_grad_{name}"] = rel(g, r)

  def local_loss(i, t, s, im, tm):  # per-device shards in, global loss out (replicated)
    loss, parts = losses.cmli_contrastive_loss(i, t, s, image_mask=im, text_mask=tm, chunk=2, axis_name="data")
    return loss, parts["loss_i2t"]

  mapped = jax.shard_map(local_loss, mesh=mesh, in_specs=(P("data"), P("data"), P(), P("data"), P("data")),
                         out_specs=(P(), P()))
  (val, i2t), grads = grad(mapped)(*sharded, scale, *masks)
  errors["cmli_shard_map_loss"], errors["cmli_shard_map_loss_i2t"] = rel(val, ref), rel(i2t, ref_i2t)
  for name, g, r in zip(("image", "text", "scale"), grads, ref_grads):
    errors[f"cmli_shard_map_grad_{name}"] = rel(g, r)
  return errors


if __name__ == "__main__":
  main()
