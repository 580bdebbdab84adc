"""The flamingo bridge against OpenFlamingo's own code (open-flamingo 2.0.1, issue 26): its
PerceiverResampler, its GatedCrossAttentionBlock in both media-attention modes, where FlamingoLMMixin
places the blocks and that each runs before its decoder layer (a whole toy LLM through FlamingoLayer),
and the trainable parameter count at ViT-L/14 + Gemma-2B sizes. The torch modules get random weights
(LayerNorms and gates off their init, so that a swapped scale or a zero gate would show) and a small
converter copies them into the Flax params.

open_flamingo's package __init__ imports open_clip and transformers (its factory); the modules under
test need neither, so open_flamingo/src is loaded as a package of its own (`_open_flamingo_src`).
"""

import importlib
import importlib.util
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="OpenFlamingo's reference modules are torch modules")


def _open_flamingo():
  """(helpers, flamingo_lm, utils) of the installed open_flamingo, or None with the reason."""
  try:
    spec = importlib.util.find_spec("open_flamingo")
  except (ImportError, ValueError) as e:
    return None, f"open_flamingo cannot be found: {e}"
  if spec is None or not spec.submodule_search_locations:
    return None, "open_flamingo is not installed (pip install --no-deps open-flamingo==2.0.1 einops einops-exts)"
  src = pathlib.Path(list(spec.submodule_search_locations)[0]) / "src"
  name = "_open_flamingo_src"
  try:
    if name not in sys.modules:
      package_spec = importlib.util.spec_from_file_location(name, src / "__init__.py",
                                                            submodule_search_locations=[str(src)])
      package = importlib.util.module_from_spec(package_spec)
      sys.modules[name] = package
      package_spec.loader.exec_module(package)
    return tuple(importlib.import_module(f"{name}.{module}") for module in ("helpers", "flamingo_lm", "utils")), ""
  except ImportError as e:  # einops or einops_exts missing
    sys.modules.pop(name, None)
    return None, f"open_flamingo's modules cannot be imported: {e}"


_MODULES, _REASON = _open_flamingo()
if _MODULES is None:
  if os.environ.get("CI"):  # .ci/run installs the reference: a skip there would hide the parity check
    raise ImportError(_REASON)
  pytest.skip(_REASON, allow_module_level=True)
helpers, flamingo_lm, of_utils = _MODULES

# pylint: disable=g-import-not-at-top,wrong-import-position
from bridgejax import bridges  # noqa: E402
from bridgejax.bridges import flamingo  # noqa: E402
from bridgejax.bridges.base import VisionFeatures  # noqa: E402
from bridgejax.models.decoder import attention_mask_for  # noqa: E402
from bridgejax.models.gemma import DecoderLayer, Gemma, GemmaConfig, RMSNorm  # noqa: E402

D, E, GRID, K = 16, 24, 4, 4  # vision width, LLM width, patch grid, latents
TOL = dict(rtol=1e-5, atol=1e-5)


# --- torch -> Flax -------------------------------------------------------------------------------

def _np(t):
  return t.detach().cpu().numpy().astype(np.float32)


def _layer_norm(ln):
  return {"scale": _np(ln.weight), "bias": _np(ln.bias)}


def _kernel(linear):
  return {"kernel": _np(linear.weight).T}  # torch (out, in) -> Flax (in, out)


def _attention(q, kv, out):
  k, v = np.split(_np(kv.weight), 2, axis=0)  # to_kv's output is [k; v] (helpers.py: .chunk(2, dim=-1))
  return {"q_proj": _kernel(q), "k_proj": {"kernel": k.T}, "v_proj": {"kernel": v.T}, "o_proj": _kernel(out)}


def _feed_forward(ff):  # nn.Sequential(LayerNorm, Linear, GELU, Linear)
  return {"ff_norm": _layer_norm(ff[0]), "ff_in": _kernel(ff[1]), "ff_out": _kernel(ff[3])}


def resampler_params(ref) -> dict:
  """helpers.PerceiverResampler -> flamingo.PerceiverResampler's params."""
  params = {"latents": _np(ref.latents), "norm": _layer_norm(ref.norm)}
  for i, (attn, ff) in enumerate(ref.layers):
    params[f"layer_{i}"] = {"media_norm": _layer_norm(attn.norm_media), "latent_norm": _layer_norm(attn.norm_latents),
                            **_attention(attn.to_q, attn.to_kv, attn.to_out), **_feed_forward(ff)}
  return params


def block_params(ref) -> dict:
  """helpers.GatedCrossAttentionBlock -> flamingo.GatedCrossAttentionDense's params."""
  return {"attn_norm": _layer_norm(ref.attn.norm), **_attention(ref.attn.to_q, ref.attn.to_kv, ref.attn.to_out),
          "attn_gate": _np(ref.attn_gate)[0], **_feed_forward(ref.ff), "ff_gate": _np(ref.ff_gate)[0]}


def _perturb(module, seed):
  """LayerNorms off (1, 0) and gates off 0, so the comparison sees them."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, torch.nn.LayerNorm):
        m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
        m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
      if isinstance(m, helpers.GatedCrossAttentionBlock):
        m.attn_gate.fill_(0.7)
        m.ff_gate.fill_(-0.4)
  return module


def _bridge(llm_layers=4, **keys):
  cfg = {**dict(name="flamingo", k=K, num_layers=2, num_heads=3, head_dim=5, cross_attention_every=2, xattn_heads=3,
                xattn_head_dim=5), **keys}  # inner widths 15: neither D nor E, so a head layout slip shows
  return bridges.build_bridge(cfg, vision_width=D, vision_layers=3, grid_size=GRID, llm_width=E, llm_layers=llm_layers)


def _features(patches):
  """(B, P, D) patches -> VisionFeatures whose last hidden state is [CLS; patches] (CLS random, unread)."""
  cls = np.random.default_rng(1).standard_normal((patches.shape[0], 1, D)).astype(np.float32)
  last = jnp.asarray(np.concatenate([cls, patches], axis=1))
  return VisionFeatures((jnp.zeros_like(last),) * 3 + (last,), jnp.ones((D,)), jnp.zeros((D,)))


# --- (a) the resampler --------------------------------------------------------------------------

def test_resampler_equals_open_flamingo():
  torch.manual_seed(0)
  ref = _perturb(helpers.PerceiverResampler(dim=D, depth=2, dim_head=5, heads=3, num_latents=K, ff_mult=4), 0)
  x = torch.randn(2, 3, 1, GRID * GRID, D)  # (b, T images, F frames, v patches, D)
  with torch.no_grad():
    expected = _np(ref(x))  # (b, T, K, D)

  module = _bridge()
  init = jax.jit(module.init)(jax.random.key(0), _features(np.zeros((6, GRID * GRID, D), np.float32)))["params"]
  params = {**init, "resampler": resampler_params(ref)}
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, init)  # the converter fills every leaf
  out = jax.jit(module.apply)({"params": params}, _features(_np(x).reshape(6, GRID * GRID, D)))
  latents = np.asarray(module.unpack(out.tokens[:, 1:]))  # (b·T, K, D): the context rows, unpacked
  np.testing.assert_allclose(latents, expected.reshape(6, K, D), **TOL)
  np.testing.assert_allclose(out.image_feature, expected.reshape(6, K, D).mean(1), **TOL)  # W_i's input
  print(f"resampler max |diff| {np.abs(latents - expected.reshape(6, K, D)).max():.2e}")


def test_resampler_init_is_open_flamingos():
  """Latents N(0, 1) (torch.randn), no biases anywhere, LayerNorms at (1, 0), OpenFlamingo's leaf count."""
  module = flamingo.PerceiverResampler(256, GRID)
  last = jnp.zeros((1, 1 + GRID * GRID, 256))
  params = jax.jit(module.init)(jax.random.key(0), VisionFeatures((last,), jnp.ones((256,)), jnp.zeros((256,))))
  params = params["params"]
  assert abs(float(np.std(params["latents"])) - 1) < 0.03  # 64 x 256 draws: a standard error of 0.006
  paths = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
  assert [p for p in paths if p.endswith("bias") and "norm" not in p] == []
  assert all(np.all(np.asarray(x) == (1 if p.endswith("scale") else 0))
             for p, x in zip(paths, jax.tree.leaves(params)) if "norm" in p)
  with torch.device("meta"):
    ref = helpers.PerceiverResampler(dim=256)
  assert sum(int(np.size(x)) for x in jax.tree.leaves(params)) == sum(p.numel() for p in ref.parameters())
  assert module.num_params == sum(p.numel() for p in ref.parameters())


# --- (b) the gated block, both media-attention modes ---------------------------------------------

def _media_locations():
  """Row 0: t t <img> t t <img> t t t t (two tokens before any image); row 1: <img> t <img> <img> t ..."""
  locations = np.zeros((2, 10), bool)
  locations[0, [2, 5]] = True
  locations[1, [0, 2, 3]] = True
  return locations


@pytest.mark.parametrize("media_attention", ["immediate", "all_previous"])
def test_gated_block_equals_open_flamingo(media_attention):
  immediate = media_attention == "immediate"
  torch.manual_seed(1)
  ref = _perturb(helpers.GatedCrossAttentionBlock(dim=E, dim_visual=D, dim_head=5, heads=3, ff_mult=4,
                                                  only_attend_immediate_media=immediate), 1)
  x = torch.randn(2, 10, E)
  media = torch.randn(2, 3, K, D)  # (B, T_img, n, D_img): the resampler's output
  locations = _media_locations()
  with torch.no_grad():
    expected = _np(ref(x, media, media_locations=torch.from_numpy(locations)))

  module = _bridge(media_attention=media_attention)
  layer = module.block_layers[0]
  params = jax.jit(module.init)(jax.random.key(0), _features(np.zeros((1, GRID * GRID, D), np.float32)))["params"]
  params = {**params, f"xattn_{layer}": block_params(ref)}
  context = module.pack(jnp.asarray(_np(media).reshape(2, 3 * K, D)))  # (B, I·r·K, E), as BridgeOutput carries it
  causal = jnp.asarray(np.tril(np.ones((10, 10), bool)))[None].repeat(2, 0)
  out, _ = jax.jit(lambda p: module.apply({"params": p}, layer, jnp.asarray(_np(x)), causal,
                                          jnp.broadcast_to(jnp.arange(10), (2, 10)), context,
                                          jnp.asarray(locations), method="before_layer"))(params)
  out = np.asarray(out)

  seen = np.cumsum(locations, axis=1) > 0  # tokens at or after their row's first image
  np.testing.assert_allclose(out[seen], expected[seen], **TOL)
  print(f"{media_attention}: max |diff| {np.abs(out[seen] - expected[seen]).max():.2e} over {seen.sum()} tokens")
  # Tokens before any image: the FFW only (the module docstring). OpenFlamingo agrees for "immediate"; for
  # "all_previous" it does not zero them and they attend to every latent of the row, later images too.
  with torch.no_grad():
    ffw_only = _np(x + ref.ff(x) * ref.ff_gate.tanh())
  np.testing.assert_allclose(out[~seen], ffw_only[~seen], **TOL)
  if immediate:
    np.testing.assert_allclose(out[~seen], expected[~seen], **TOL)
  else:
    assert np.abs(expected[~seen] - ffw_only[~seen]).max() > 1e-3


def test_all_previous_sees_earlier_images_and_immediate_does_not():
  """The two masks differ where they should: after the second image, "all_previous" reads the first too."""
  locations = jnp.asarray(_media_locations())
  columns = jnp.broadcast_to(jnp.arange(10), (2, 10))
  immediate = np.asarray(_bridge().visible(locations, 10, columns, 3))
  previous = np.asarray(_bridge(media_attention="all_previous").visible(locations, 10, columns, 3))
  assert immediate[0, 6, :K].sum() == 0 and immediate[0, 6, K:2 * K].all()
  assert previous[0, 6, :2 * K].all() and not previous[0, 6, 2 * K:].any()
  assert not immediate[0, :2].any() and not previous[0, :2].any()


# --- (c) where the blocks go, and that each runs before its layer ---------------------------------

class _ToyLM(torch.nn.Module):
  """A decoder whose layers are given; input_ids only mark the media (FlamingoLMMixin reads them)."""

  def __init__(self, layers):
    super().__init__()
    self.layers = torch.nn.ModuleList(layers)
    self.embeds = None

  def forward(self, input_ids, attention_mask=None):
    del input_ids
    x = self.embeds
    for layer in self.layers:
      x = layer(x, attention_mask=attention_mask)
    return x


def _flamingo_lm(layers, every, lang_dim, vis_dim):
  lm = _ToyLM(layers)
  of_utils.extend_instance(lm, flamingo_lm.FlamingoLMMixin)
  lm.set_decoder_layers_attr_name("layers")
  lm.init_flamingo(media_token_id=1, lang_hidden_size=lang_dim, vis_hidden_size=vis_dim,
                   cross_attn_every_n_layers=every, gradient_checkpointing=False)
  return lm


@pytest.mark.parametrize("llm_layers,every", [(18, 4), (18, 1), (18, 2), (18, 3), (24, 4), (32, 4), (22, 7), (4, 4)])
def test_block_placement_is_open_flamingos(llm_layers, every):
  with torch.device("meta"):
    lm = _flamingo_lm([torch.nn.Identity() for _ in range(llm_layers)], every, 8, 8)
  theirs = tuple(i for i, block in enumerate(lm.gated_cross_attn_layers) if block is not None)
  assert flamingo.block_layers(llm_layers, every) == theirs
  if (llm_layers, every) == (18, 4):
    assert theirs == (3, 7, 11, 15)
    assert flamingo.block_layers(18, 4, "first") == (0, 4, 8, 12, 16)  # the earlier rule, still a key


def test_cross_attention_every_is_capped_at_the_llm_depth():
  """OpenFlamingo gives a 2-layer LLM with n = 4 no block; here it gets one, before its last layer."""
  assert flamingo.block_layers(2, 4) == (1,) and flamingo.block_layers(1, 4) == (0,)
  assert _bridge(llm_layers=2, cross_attention_every=4).block_layers == (1,)


class _FlaxLayer(torch.nn.Module):
  """A bridgejax Gemma decoder layer inside the torch LM: FlamingoLayer wraps it as it would a HF layer."""

  def __init__(self, fn):
    super().__init__()
    self.fn = fn

  def forward(self, x, attention_mask=None):
    del attention_mask
    return torch.from_numpy(np.array(self.fn(_np(x))))  # a writable copy


def test_a_whole_llm_runs_as_open_flamingos_flamingo_layers():
  """FlamingoLMMixin + FlamingoLayer (their placement, the block BEFORE its decoder layer) over the same
  frozen Gemma layers = Gemma.decode with the bridge's hook. 5 layers, n = 2: blocks before 1 and 3."""
  llm_config = GemmaConfig(vocab_size=30, hidden_size=E, intermediate_size=32, num_layers=5, num_heads=2,
                           num_kv_heads=1, head_dim=8, query_pre_attn_scalar=8)
  llm = jax.jit(lambda: Gemma(llm_config).init(jax.random.key(3), jnp.zeros((1, 1), jnp.int32))["params"])()
  ids = np.full((2, 10), 5)
  ids[_media_locations()] = 1  # the <image> token
  embeds = np.random.default_rng(2).standard_normal((2, 10, E)).astype(np.float32)
  positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
  mask = attention_mask_for(positions, positions, jnp.ones((2, 10), bool), None)
  layer_fn = jax.jit(lambda p, x: DecoderLayer(llm_config, llm_config.layer_types[0]).apply(
      {"params": p}, x, positions, mask)[0])
  assert len(set(llm_config.layer_types)) == 1
  layers = [_FlaxLayer(lambda x, p=llm[f"layers_{i}"]: layer_fn(p, x)) for i in range(5)]

  torch.manual_seed(2)
  lm = _flamingo_lm(layers, 2, E, D)  # its blocks: heads 8 of 64 (flamingo_lm.py builds them with the defaults)
  _perturb(lm.gated_cross_attn_layers, 2)
  media = torch.randn(2, 3, K, D)
  lm.embeds = torch.from_numpy(embeds)
  with torch.no_grad():
    for layer in lm._get_decoder_layers():  # pylint: disable=protected-access
      layer.condition_vis_x(media)
    expected = lm(input_ids=torch.from_numpy(ids), attention_mask=None)
  expected = np.asarray(RMSNorm(llm_config.rms_norm_eps).apply({"params": llm["final_norm"]}, _np(expected)))

  module = _bridge(llm_layers=5, xattn_heads=8, xattn_head_dim=64)
  assert module.block_layers == (1, 3)
  params = jax.jit(module.init)(jax.random.key(0), _features(np.zeros((1, GRID * GRID, D), np.float32)))["params"]
  params = {**params, **{f"xattn_{i}": block_params(lm.gated_cross_attn_layers[i]) for i in module.block_layers}}
  hook = module.decoder_hook(params, module.pack(jnp.asarray(_np(media).reshape(2, 3 * K, D))),
                             jnp.asarray(_media_locations()))
  out, _, _ = jax.jit(lambda llm, hook: Gemma(llm_config).apply(
      {"params": llm}, jnp.asarray(embeds), positions, jnp.ones((2, 10), jnp.int32), None, None, hook,
      method="decode"))(llm, hook)
  seen = np.cumsum(_media_locations(), axis=1) > 0
  np.testing.assert_allclose(np.asarray(out)[seen], expected[seen], **TOL)
  np.testing.assert_allclose(np.asarray(out), expected, **TOL)  # immediate: the image-less tokens agree too
  print(f"whole LLM: max |diff| {np.abs(np.asarray(out) - expected).max():.2e}")


# --- the parameter count at ViT-L/14 + Gemma-2B --------------------------------------------------

def test_parameter_count_against_open_flamingos_modules_at_real_sizes():
  """OpenFlamingo's resampler + its blocks for a 1024-wide tower and an 18-layer, 2048-wide LLM, placed
  by its own FlamingoLMMixin (meta tensors: nothing allocated), against configs/flamingo.py's formula."""
  from configs.flamingo import get_config  # pylint: disable=g-import-not-at-top
  with torch.device("meta"):
    resampler = helpers.PerceiverResampler(dim=1024)
    lm = _flamingo_lm([torch.nn.Identity() for _ in range(18)], 4, 2048, 1024)
  theirs = sum(p.numel() for p in resampler.parameters()) + sum(
      p.numel() for p in lm.gated_cross_attn_layers.parameters())
  bridge = get_config().bridge
  dims = dict(vision_width=1024, vision_layers=24, grid_size=16, llm_width=2048, llm_layers=18)
  ours = bridges.num_params(bridge, **dims)
  assert theirs == 209_852_424
  assert ours == theirs + 2048 == 209_854_472  # + the <image> row
  module = bridges.build_bridge(bridge, **dims)
  assert module.block_layers == (3, 7, 11, 15) and module.num_context_tokens == 64
