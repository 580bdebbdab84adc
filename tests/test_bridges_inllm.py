"""Bridges that act inside the frozen LLM (eP-ALM, Flamingo) through the decoder's per-layer hook:
the plain decoder's program is unchanged, each bridge equals an independent computation (eP-ALM: a
sequence that grows by the CLS slot; Flamingo: its gated block on a hand-built image-causal mask),
Flamingo starts exactly at the frozen LM, KV-cache generation equals full passes, the parameter
formulas hold, and each config trains on the tiny world with the frozen trees bitwise unchanged."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import tiny_world
from configs import base
from bridgejax import bridges, experiment
from bridgejax.bridges.base import VisionFeatures
from bridgejax.bridges.epalm import EPALM
from bridgejax.generate import generate
from bridgejax.param_count import count
from bridgejax.model import BridgeModel
from bridgejax.models.clip import CLIPVisionConfig, CLIPVisionTransformer
from bridgejax.models.decoder import FULL, attention_mask_for
from bridgejax.models.gemma import MLP, Attention, Gemma, GemmaConfig, RMSNorm
from bridgejax.train import loop

VISION = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_layers=3, num_heads=2, image_size=28, patch_size=7)
LLM = GemmaConfig(vocab_size=30, hidden_size=24, intermediate_size=32, num_layers=4, num_heads=2, num_kv_heads=1,
                  head_dim=8, query_pre_attn_scalar=8)
EPALM_CFG = dict(name="epalm", num_cls=2, inject_layers=3, prompt_tokens=3, adapters=True, adapter_reduction=4)
FLAMINGO_CFG = dict(name="flamingo", k=4, num_layers=1, num_heads=2, cross_attention_every=2, xattn_heads=2,
                    xattn_head_dim=4)
DIMS = dict(vision_width=16, vision_layers=3, grid_size=4, llm_width=24, llm_layers=4)


@pytest.fixture(scope="module")
def frozen():
  x = jnp.zeros((1, 3, 28, 28))
  return jax.jit(lambda: {"vision": CLIPVisionTransformer(VISION).init(jax.random.key(0), x)["params"],
                          "llm": Gemma(LLM).init(jax.random.key(1), jnp.zeros((1, 1), jnp.int32))["params"]})()


def _init(model, frozen):
  return jax.jit(lambda frozen: model.init_trainable(jax.random.key(2), frozen))(frozen)


def _model(bridge: dict, **options):
  config = base.get_config()
  config.bridge = ml_collections.ConfigDict(bridge)
  config.update(options)
  return BridgeModel.create(config, VISION, LLM)


def _noisy(tree, seed=0, scale=0.3):
  """Every trainable leaf moved off its init: gates and adapters' zero up-projections act."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def _inputs(model, params, seed=0, batch=2, length=5):
  """Visual tokens, caption_inputs' embeddings and mask (row 1 two tokens shorter), and the hook."""
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.standard_normal((batch, 3, 28, 28)), jnp.float32)
  ids = jnp.asarray(rng.integers(3, LLM.vocab_size, (batch, length)), jnp.int32)
  mask = jnp.asarray(np.arange(length)[None] < np.array([length, length - 2])[:batch, None], jnp.int32)

  def fn(params):
    tokens = model.encode_images(params, images).tokens
    embeds, full_mask, _, _ = model.caption_inputs(params, tokens, ids, mask)
    return tokens, embeds, full_mask, model.llm_hook(params, tokens, embeds.shape[1])

  return jax.jit(fn)(params)


def _run_llm(model):
  return jax.jit(lambda params, embeds, mask, hook: model.run_llm(params, embeds, mask, hook=hook)[0])


class _PlainGemma(Gemma):
  """The decoder's forward as it was before the hook: masks, the layers, the final norm."""

  def _decode(self, inputs_embeds, positions, attention_mask, cache, segment_ids, hook=None):
    x = self.add_positions(inputs_embeds.astype(self.dtype), positions)
    mask = attention_mask_for(positions, positions, attention_mask.astype(bool), None)
    states = [x]
    for layer in self.layers:
      x, _ = layer(x, positions, mask, None)
      states.append(x)
    x = self.final_norm(x)
    return x, (*states[:-1], x), None


@pytest.mark.parametrize("remat", [False, True])
def test_plain_decoder_program_is_unchanged(frozen, remat):
  embeds = jnp.ones((2, 5, LLM.hidden_size))
  positions, mask = jnp.broadcast_to(jnp.arange(5), (2, 5)), jnp.ones((2, 5), jnp.int32)
  jaxpr = lambda module: str(jax.make_jaxpr(lambda p: module.apply(
      {"params": p}, embeds, positions, mask, method="decode"))(frozen["llm"]))
  assert jaxpr(Gemma(LLM, remat=remat)) == jaxpr(_PlainGemma(LLM, remat=remat))


def test_flamingo_starts_exactly_at_the_frozen_lm(frozen):
  model = _model(FLAMINGO_CFG, remat="llm")
  params = {**frozen, **_init(model, frozen)}
  tokens, embeds, mask, hook = _inputs(model, params)
  run_llm = _run_llm(model)
  frozen_lm = run_llm(params, embeds, mask, None)
  np.testing.assert_array_equal(run_llm(params, embeds, mask, hook), frozen_lm)
  noisy = {**params, "bridge": _noisy(params["bridge"])}  # and the blocks do act once the gates move
  assert np.abs(run_llm(noisy, embeds, mask, model.llm_hook(noisy, tokens, embeds.shape[1])) - frozen_lm).max() > 1e-3


def _layer_norm(x, p, eps=1e-5):
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def test_flamingo_block_on_two_interleaved_images_equals_a_hand_built_mask(frozen):
  """Row: t t <img a> t t <img b> t t t t. Tokens 0-1 see no image, 2-4 image a, 5-9 image b."""
  model = _model(FLAMINGO_CFG)
  params = _noisy(_init(model, frozen)["bridge"])
  k, width, heads, head_dim = 4, LLM.hidden_size, 2, 4
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 10, width)).astype(np.float32)
  context = rng.standard_normal((1, 2 * k, VISION.hidden_size)).astype(np.float32)  # image a's latents, then b's
  markers = np.zeros((1, 10), bool)
  markers[0, [2, 5]] = True
  causal = np.tril(np.ones((10, 10), bool))[None]
  assert model.bridge.block_layers == (1, 3)  # OpenFlamingo's (l + 1) % 2 == 0 of 4 layers
  out, mask = model.bridge.apply({"params": params}, 3, jnp.asarray(x), jnp.asarray(causal), jnp.arange(10)[None],
                                 model.bridge.pack(jnp.asarray(context)), jnp.asarray(markers), method="before_layer")
  np.testing.assert_array_equal(mask, causal)

  visible = np.zeros((10, 2 * k), bool)
  visible[2:5, :k], visible[5:, k:] = True, True
  p = jax.tree.map(np.asarray, params["xattn_3"])
  split = lambda t: t.reshape(t.shape[0], heads, head_dim)
  q = split(_layer_norm(x[0], p["attn_norm"]) @ p["q_proj"]["kernel"])
  keys, values = split(context[0] @ p["k_proj"]["kernel"]), split(context[0] @ p["v_proj"]["kernel"])
  scores = np.einsum("thf,shf->hts", q, keys) / np.sqrt(head_dim)
  scores = np.where(visible[None], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True, initial=-1e30))
  total = probs.sum(-1, keepdims=True)
  probs = np.divide(probs, total, out=np.zeros_like(probs), where=total > 0)  # rows without an image: nothing
  attn = np.einsum("hts,shf->thf", probs, values).reshape(10, -1) @ p["o_proj"]["kernel"]
  y = x[0] + np.tanh(p["attn_gate"]) * attn
  hidden = _layer_norm(y, p["ff_norm"]) @ p["ff_in"]["kernel"]
  y = y + np.tanh(p["ff_gate"]) * (np.asarray(jax.nn.gelu(hidden, approximate=False)) @ p["ff_out"]["kernel"])
  np.testing.assert_allclose(out[0], y, rtol=1e-5, atol=1e-5)


def _adapter(h, p):
  return h + np.maximum(h @ p["down"]["kernel"] + p["down"]["bias"], 0) @ p["up"]["kernel"] + p["up"]["bias"]


def test_epalm_equals_a_sequence_that_grows_by_the_cls_slot(frozen):
  """eP-ALM as the paper runs it: [prompt; text] through the layers below the window (no slot), then
  the projected CLS prepended at the window's first layer and replaced at each later injection, with
  adapters after each attention and MLP, built from the layers' own submodules."""
  model = _model(EPALM_CFG)
  trainable = _init(model, frozen)
  params = {**frozen, **trainable, "bridge": _noisy(trainable["bridge"])}
  _, embeds, mask, hook = _inputs(model, params, batch=1)
  hidden = jax.jit(lambda params, hook: model.llm_hidden(params, embeds, mask, hook=hook))(params, hook)

  assert model.bridge.injections() == {1: 0, 2: 1}  # 4 layers, window 3, 2 CLS: layer 1 gets CLS 0, 2 gets 1
  image = jnp.asarray(np.random.default_rng(0).standard_normal((1, 3, 28, 28)), jnp.float32)  # _inputs' image
  features = jax.jit(model.vision_features)(params, image)
  bp = jax.tree.map(np.asarray, params["bridge"])
  cls = [np.asarray(features.hidden_states[j])[0, 0] for j in (-2, -1)]
  v = [cls[j] @ bp["projection_kernel"][j] + bp["projection_bias"][j] for j in range(2)]
  llm = params["llm"]
  norm = jax.jit(lambda p, h: RMSNorm(LLM.rms_norm_eps).apply({"params": p}, h))
  attention = jax.jit(lambda p, h, positions, mask: Attention(LLM, FULL).apply({"params": p}, h, positions, mask))
  mlp = jax.jit(lambda p, h: MLP(LLM).apply({"params": p}, h))
  x = np.asarray(embeds[0, 1:])  # without the slot
  for i in range(LLM.num_layers):
    if i == 1:
      x = np.concatenate([v[0][None], x])
    elif i == 2:
      x[0] = v[1]
    n, columns = x.shape[0], embeds.shape[1]
    positions = jnp.arange(columns - n, columns)[None]  # the slot is position 0 once it is there
    causal = jnp.asarray(np.tril(np.ones((n, n), bool))[None])
    p = llm[f"layers_{i}"]
    h = np.asarray(attention(p["attn"], norm(p["pre_attn_norm"], x[None]), positions, causal)[0])[0]
    x = x + _adapter(h, bp[f"adapter_{i}_attn"])
    h = np.asarray(mlp(p["mlp"], norm(p["pre_ffw_norm"], x[None])))[0]
    x = x + _adapter(h, bp[f"adapter_{i}_mlp"])
  x = np.asarray(norm(llm["final_norm"], x))
  np.testing.assert_allclose(hidden[0], x, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("bridge", [EPALM_CFG, FLAMINGO_CFG], ids=["epalm", "flamingo"])
def test_kv_cache_generation_equals_full_passes(frozen, bridge):
  """Greedy generation through prefill + cached steps (the hook in both) = one full pass over each
  prompt followed by the generated tokens, each predicted by the one before; beam search runs too."""
  model = _model(bridge, remat="llm")
  params = {**frozen, **_noisy(_init(model, frozen))}
  tokens, embeds, mask, hook = _inputs(model, params)
  new = generate(model.llm, params["llm"], inputs_embeds=embeds, attention_mask=mask,
                 extra_embeddings=params["ret"]["ret_embedding"], max_new_tokens=4, eos_token_ids=(), hook=hook)
  lengths = np.asarray(mask.sum(1))
  rows = [jnp.concatenate([embeds[r, :lengths[r]], model.embed_text(params, jnp.asarray(new[r:r + 1, :3]))[0]])
          for r in range(2)]
  width = max(len(r) for r in rows)
  full = jnp.stack([jnp.pad(r, ((0, width - len(r)), (0, 0))) for r in rows])
  full_mask = jnp.asarray(np.arange(width)[None] < np.array([len(r) for r in rows])[:, None], jnp.int32)
  logits = _run_llm(model)(params, full, full_mask, model.llm_hook(params, tokens, width))
  for r in range(2):
    np.testing.assert_array_equal(np.argmax(logits[r, lengths[r] - 1:lengths[r] + 3], -1), new[r])
  beams = generate(model.llm, params["llm"], inputs_embeds=embeds, attention_mask=mask, max_new_tokens=2,
                   extra_embeddings=params["ret"]["ret_embedding"], method="beam", num_beams=2, hook=hook)
  assert beams.shape == (2, 2)


def _count(tree):
  return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("bridge", [
    EPALM_CFG, dict(EPALM_CFG, adapters=False), dict(EPALM_CFG, shared_projection=True, prompt_mlp=False),
    dict(EPALM_CFG, prompt_tokens=0, num_cls=5, inject_layers=9),  # capped at 3 tower and 4 LLM layers
    FLAMINGO_CFG, dict(FLAMINGO_CFG, cross_attention_every=1, retrieval_feature="attention_pool"),
    dict(FLAMINGO_CFG, cross_attention_every=3)])
def test_num_params_and_tokens_equal_the_tree(bridge):
  module = bridges.build_bridge(bridge, **DIMS)
  hidden = tuple(jnp.zeros((2, 17, 16)) for _ in range(4))
  features = VisionFeatures(hidden, jnp.ones((16,)), jnp.zeros((16,)))
  out, variables = jax.eval_shape(lambda: module.init_with_output(jax.random.key(0), features))
  assert _count(variables["params"]) == module.num_params == bridges.num_params(bridge, **DIMS)
  assert out.tokens.shape == (2, module.num_tokens, 24)
  assert module.num_tokens == module.num_prefix_tokens + module.num_context_tokens


def test_epalm_injection_schedule_at_gemma_2b():
  """18 layers, the last 12, 6 CLS: a new CLS every 2 layers, the last one at layer 16 (the paper's rule)."""
  module = EPALM(1024, 2048, 16, vision_layers=24, llm_layers=18)
  assert module.injections() == {6: 0, 8: 1, 10: 2, 12: 3, 14: 4, 16: 5}


@pytest.mark.parametrize("name,total", [("epalm", 21_797_377), ("flamingo", 210_643_465)])
def test_inspect_counts_at_real_sizes(name, total):
  config = __import__(f"configs.{name}", fromlist=["get_config"]).get_config()
  result = count(config)  # CLIP ViT-L/14 + Gemma-2B
  heads = 1024 * 256 + 256 + 2048 * 256 + 256 + 2048 + 1  # W_i, W_t, [RET], the logit scale
  dims = dict(vision_width=1024, vision_layers=24, grid_size=16, llm_width=2048, llm_layers=18)
  assert result["trainable_params"] == bridges.num_params(config.bridge, **dims) + heads == total


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  return tiny_world.make(str(tmp_path_factory.mktemp("tiny_world")))


@pytest.mark.parametrize("name,options", [("epalm", {"remat": "llm"}), ("flamingo", {})])
def test_config_trains_three_steps_frozen_unchanged_and_captions(paths, tmp_path, name, options):
  """configs/<name>.py's bridge on the tiny world, with the concat trick: 3 steps change the bridge,
  not a bit of the frozen trees; then the Pipeline captions (KV-cache generation with the hook)."""
  from bridgejax.inference import Pipeline  # pylint: disable=g-import-not-at-top
  config = tiny_world.config(paths, total_steps=3, **options)
  config.bridge = __import__(f"configs.{name}", fromlist=["get_config"]).get_config().bridge
  assert config.concat_prob > 0
  setup = experiment.build(config)
  before = jax.tree.map(np.array, setup.frozen)
  initial = jax.tree.map(np.array, setup.model.init_trainable(jax.random.key(config.seed), setup.frozen))
  summary = loop.train(config, str(tmp_path), loop.train_iterator(config, setup), setup=setup)
  assert jax.tree.all(jax.tree.map(np.array_equal, before, jax.tree.map(np.asarray, setup.frozen)))
  trained = jax.tree.map(np.asarray, summary["state"].params)
  assert sorted(trained) == ["bridge", "ret"] and summary["step"] == 3
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), initial["bridge"], trained["bridge"])
  assert all(jax.tree.leaves(moved))
  pipe = Pipeline(setup, {**setup.frozen, **summary["state"].params}, max_new_tokens=4)
  image = np.random.default_rng(0).integers(0, 255, (112, 112, 3), np.uint8)
  assert isinstance(pipe.caption(image), str)
