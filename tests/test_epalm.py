"""eP-ALM as the authors' code runs it (bridgejax/bridges/epalm.py, configs/epalm.py): the bridge equals a
transcription of github.com/mshukor/eP-ALM models/opt.py OPTDecoder.forward (the schedule l.693-705, the
injection l.724-752) on a tiny Gemma, window relative and absolute, re-set at every window layer, the slot's
query non-causal, CLS through the tower's post-LayerNorm (models/vit.py l.501-503); the layers below the
window see the text exactly as without the slot; the config's default, its `injection=text` and its optimiser
recipes."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import base, epalm as epalm_config
from bridgejax import bridges
from bridgejax.bridges.epalm import EPALM
from bridgejax.errors import UserError
from bridgejax.generate import prefill
from bridgejax.model import BridgeModel
from bridgejax.models.clip import CLIPVisionConfig, CLIPVisionTransformer
from bridgejax.models.decoder import FULL
from bridgejax.models.gemma import MLP, Attention, Gemma, GemmaConfig, RMSNorm
from bridgejax.train.optimizer import group_labels, groups, learning_rate_schedule

VISION = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_layers=3, num_heads=2, image_size=28, patch_size=7)
AUTHORS = dict(name="epalm", prompt_tokens=3, skip_last=1, reset_every_layer=True, causal_slot=False, post_norm=True)
# (LLM layers, bridge): the window [s, e) and the CLS of each window layer in the comments
CASES = {
    "relative": (6, dict(AUTHORS, num_cls=3, inject_from=0.5, inject_layers=0)),  # [3, 5): 0, 1 (M < N: step 1)
    "absolute": (6, dict(AUTHORS, num_cls=2, inject_layers=4)),  # [1, 5): 0, 0, 1, 1 (step 2)
    "uneven": (7, dict(AUTHORS, num_cls=3, inject_from=0.3, inject_layers=0)),  # [2, 6): 0, 1, 2, 2 (the last kept)
    "two_after": (6, dict(AUTHORS, num_cls=2, inject_from=0.34, inject_layers=0, skip_last=2)),  # [2, 4): 0, 1
}


def _llm(layers: int) -> GemmaConfig:
  return GemmaConfig(vocab_size=30, hidden_size=24, intermediate_size=32, num_layers=layers, num_heads=2,
                     num_kv_heads=1, head_dim=8, query_pre_attn_scalar=8)


def _model(bridge: dict, layers: int):
  config = base.get_config()
  config.bridge = ml_collections.ConfigDict(bridge)
  return BridgeModel.create(config, VISION, _llm(layers))


def _params(model, layers: int, seed: int = 0):
  """Frozen towers and the bridge moved off its init."""
  frozen = {"vision": CLIPVisionTransformer(VISION).init(jax.random.key(0), jnp.zeros((1, 3, 28, 28)))["params"],
            "llm": Gemma(_llm(layers)).init(jax.random.key(1), jnp.zeros((1, 1), jnp.int32))["params"]}
  trainable = model.init_trainable(jax.random.key(2), frozen)
  leaves, treedef = jax.tree.flatten(trainable["bridge"])
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  noisy = treedef.unflatten([x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])
  return {**frozen, **trainable, "bridge": noisy}


def _inputs(model, params, lengths=(5,), seed=0):
  """Images, caption_inputs' embeddings and mask (rows of `lengths` text tokens, right padded), the hook."""
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.standard_normal((len(lengths), 3, 28, 28)), jnp.float32)
  ids = jnp.asarray(rng.integers(3, 30, (len(lengths), max(lengths))), jnp.int32)
  mask = jnp.asarray(np.arange(max(lengths))[None] < np.array(lengths)[:, None], jnp.int32)
  tokens = model.encode_images(params, images).tokens
  embeds, full_mask, _, _ = model.caption_inputs(params, tokens, ids, mask)
  return images, embeds, full_mask, model.llm_hook(params, tokens, embeds.shape[1])


def _decode(model, params, embeds, mask, hook):
  """The decoder's per-layer states (hidden_states: [0] the input, [i] layer i-1's output, [-1] final-normed)."""
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  return model.llm.apply({"params": params["llm"]}, embeds, positions, mask, None, None, hook, method="decode")[1]


def _layer_norm(x, scale, bias, eps):
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * scale + bias


def authors_forward(params, config: GemmaConfig, x, vis_prefix, start, end, text_step=1):
  """models/opt.py OPTDecoder.forward, the lines eP-ALM adds (l.693-752), around Gemma's layers instead of
  OPT's: x (T, E) the decoder's input without the slot ([P; text]), vis_prefix the N projected CLS (E,).

  The slot counts as position 0 and the text keeps positions 1..T (bridgejax's choice: RoPE has no "no
  position"; OPT adds its positions at the input only), so a query's position is the last len(x) of 0..T.
  """
  num_layers, num_vis_prefix = end - start, len(vis_prefix)  # l.694-698
  step = 1 if num_vis_prefix == 1 else (num_layers // num_vis_prefix if num_layers > num_vis_prefix else 1)  # l.700-703
  length = x.shape[0]
  attention_mask = np.triu(np.full((length, length), -np.inf, np.float32), 1)  # _make_causal_mask, additive
  token_added = False
  norm = jax.jit(lambda p, h: RMSNorm(config.rms_norm_eps).apply({"params": p}, h))
  attention = jax.jit(lambda p, h, positions, mask: Attention(config, FULL).apply({"params": p}, h, positions, mask)[0])
  mlp = jax.jit(lambda p, h: MLP(config).apply({"params": p}, h))
  for idx in range(config.num_layers):
    if start <= idx < end and idx % text_step == 0:  # l.724-727
      vis_prefix_idx = min((idx - start) // step, num_vis_prefix - 1)  # l.729-735
      vis_pref = vis_prefix[vis_prefix_idx][None]  # (l = 1, E)
      if token_added:
        x[0] = vis_pref[0]  # l.744-746: hidden_states[:, 0, :] = vis_pref[:, 0, :]
      else:
        x = np.concatenate([vis_pref, x])  # l.749
        attention_mask = np.pad(attention_mask, ((1, 0), (1, 0)))  # l.750: F.pad(mask, (l, 0, l, 0)) with 0
        token_added = True
    positions = jnp.arange(length + 1 - x.shape[0], length + 1)[None]
    visible = jnp.asarray(attention_mask == 0)[None]
    p = params["llm"][f"layers_{idx}"]
    x = x + np.asarray(attention(p["attn"], norm(p["pre_attn_norm"], x[None]), positions, visible))[0]
    x = x + np.asarray(mlp(p["mlp"], norm(p["pre_ffw_norm"], x[None])))[0]
  return np.asarray(norm(params["llm"]["final_norm"], x))


def _authors_vis_prefix(model, params, image, num_cls):
  """models/epalm.py l.337-351: connector[-i] on the CLS of the tower's hidden state [-i], each through the
  tower's final LayerNorm (models/vit.py l.503)."""
  features = jax.jit(model.vision_features)(params, image)
  post = jax.tree.map(np.asarray, params["vision"]["post_norm"])
  bp = jax.tree.map(np.asarray, params["bridge"])
  cls = [_layer_norm(np.asarray(features.hidden_states[j])[0, 0], post["scale"], post["bias"], VISION.layer_norm_eps)
         for j in range(-num_cls, 0)]
  return [cls[j] @ bp["projection_kernel"][j] + bp["projection_bias"][j] for j in range(num_cls)]


@pytest.mark.parametrize("case", list(CASES))
def test_bridge_equals_the_authors_injection(case):
  layers, bridge = CASES[case]
  model = _model(bridge, layers)
  params = _params(model, layers)
  images, embeds, mask, hook = _inputs(model, params)
  hidden = jax.jit(lambda params, hook: model.llm_hidden(params, embeds, mask, hook=hook))(params, hook)
  start, end = model.bridge.window()
  vis_prefix = _authors_vis_prefix(model, params, images, model.bridge.num_context_tokens)
  reference = authors_forward(params, _llm(layers), np.asarray(embeds[0, 1:]), vis_prefix, start, end)
  np.testing.assert_allclose(hidden[0], reference, rtol=2e-5, atol=2e-5)

  # each of the authors' choices matters here: the bridge without it is far from their code
  changed = {"causal_slot": True, "reset_every_layer": False, "post_norm": False}
  if case == "two_after":
    changed["skip_last"] = 0
  for key, value in changed.items():
    other = _model(dict(bridge, **{key: value}), layers)
    hook = other.llm_hook(params, other.encode_images(params, images).tokens, embeds.shape[1])
    other_hidden = jax.jit(lambda params, hook: other.llm_hidden(params, embeds, mask, hook=hook))(params, hook)
    if key != "reset_every_layer" or other.bridge.injections() != model.bridge.injections():
      assert np.abs(np.asarray(other_hidden[0]) - reference).max() > 1e-3, key


def test_window_and_cls_schedule_as_the_authors_at_real_depths():
  """OPT-2.7B's 32 layers, start_layer_idx 19, end_layer_idx 31, 6 CLS (configs/image/ePALM_caption.yaml):
  each CLS held for 2 layers and re-written at each, the last layer free; the same window as a fraction
  and as a count. Gemma-2B's 18: from layer 10 (60%) to 16, the last CLS twice. And the paper's text."""
  opt = {19 + 2 * j + r: j for j in range(6) for r in range(2)}
  code = dict(skip_last=1, reset_every_layer=True)
  assert EPALM(1024, 2560, 16, 24, llm_layers=32, inject_from=0.6, inject_layers=0, **code).injections() == opt
  assert EPALM(1024, 2560, 16, 24, llm_layers=32, inject_layers=12, **code).window() == (19, 31)
  assert EPALM(1024, 2560, 16, 24, llm_layers=32, inject_layers=12, **code).injections() == opt
  gemma = EPALM(1024, 2048, 16, 24, llm_layers=18, inject_from=0.6, inject_layers=0, **code)
  assert gemma.injections() == {10: 0, 11: 1, 12: 2, 13: 3, 14: 4, 15: 5, 16: 5}
  assert EPALM(1024, 2048, 16, 24, llm_layers=18).injections() == {6: 0, 8: 1, 10: 2, 12: 3, 14: 4, 16: 5}
  for layers in (1, 2, 3):  # a toy LLM keeps a window of one layer
    start, end = EPALM(16, 24, 4, 3, llm_layers=layers, inject_from=0.6, inject_layers=0, **code).window()
    assert 0 <= start == end - 1 <= layers - 1


def test_first_layers_see_the_text_as_without_the_slot():
  """Below the window the slot's column is hidden: every layer up to s gives [P; text] the states of a
  plain LLM pass over [P; text] at the same positions (rows of 5 and 3 tokens, right padded)."""
  layers, bridge = CASES["relative"]
  model = _model(bridge, layers)
  params = _params(model, layers)
  _, embeds, mask, hook = _inputs(model, params, lengths=(5, 3))
  start, _ = model.bridge.window()
  states = jax.jit(lambda hook: _decode(model, params, embeds, mask, hook))(hook)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)[:, 1:]
  plain = jax.jit(lambda: model.llm.apply({"params": params["llm"]}, embeds[:, 1:], positions, mask[:, 1:],
                                          method="decode")[1])()
  for i in range(start + 1):  # the input and the outputs of layers 0..s-1
    np.testing.assert_allclose(states[i][:, 1:], plain[i], rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(states[start + 1][:, 1:]) - np.asarray(plain[start + 1])).max() > 1e-3  # then the CLS acts


def test_non_causal_slot_mask_on_a_concat_row():
  """Row: [slot_a t t t pad | slot_b t t t pad] (the concat trick's pair, each half padded): below the
  window both slot columns are hidden; from the window on, slot a's query sees its own caption's valid
  columns and slot b's its causal row plus its own caption; each slot takes its own image's v_j."""
  model = _model(dict(AUTHORS, num_cls=2, inject_layers=2, prompt_tokens=0), 4)  # window [1, 3)
  bp = _params(model, 4)["bridge"]
  width, e = 10, 24
  valid = np.array([1, 1, 1, 1, 0, 1, 1, 1, 1, 0], bool)
  causal = np.tril(np.ones((width, width), bool)) & valid[None]
  markers = np.zeros((1, width), bool)
  markers[0, [0, 5]] = True
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, width, e)).astype(np.float32)
  context = rng.standard_normal((1, 4, e)).astype(np.float32)  # image a's v_0, v_1, then image b's
  call = lambda layer: model.bridge.apply({"params": bp}, layer, jnp.asarray(x), jnp.asarray(causal[None]),
                                          jnp.arange(width)[None], jnp.asarray(context), jnp.asarray(markers),
                                          method="before_layer")
  out, mask = call(0)
  hidden = causal.copy()
  hidden[:, [0, 5]] = False
  np.testing.assert_array_equal(out, x)
  np.testing.assert_array_equal(mask[0], hidden)
  expected = causal.copy()
  expected[0] = valid & (np.arange(width) < 5)
  expected[5] = causal[5] | (valid & (np.arange(width) >= 5))
  for layer, j in ((1, 0), (2, 1), (3, None)):  # window [1, 3): CLS 0, then 1; layer 3 after it
    out, mask = call(layer)
    np.testing.assert_array_equal(mask[0], expected)
    want = x.copy()
    if j is not None:
      want[0, 0], want[0, 5] = context[0, j], context[0, 2 + j]
    np.testing.assert_array_equal(out, want)


def test_a_rows_padding_does_not_change_its_output():
  """The non-causal slot sees its row's real tokens only: a padded row's states equal the row alone."""
  layers, bridge = CASES["absolute"]
  model = _model(bridge, layers)
  params = _params(model, layers)
  images, embeds, mask, hook = _inputs(model, params, lengths=(5, 3))
  hidden = jax.jit(lambda hook: model.llm_hidden(params, embeds, mask, hook=hook))(hook)
  tokens = model.encode_images(params, images[1:]).tokens
  alone = embeds[1:, :-2]
  hook = model.llm_hook(params, tokens, alone.shape[1])
  hidden_alone = jax.jit(lambda hook: model.llm_hidden(params, alone, mask[1:, :-2], hook=hook))(hook)
  np.testing.assert_allclose(hidden[1, :-2], hidden_alone[0], rtol=2e-5, atol=2e-5)


def test_kv_cache_prefill_equals_a_full_pass_over_the_prompt():
  """With a KV cache the slot's query runs at prefill over the prompt (not the bucket's padding slots)."""
  layers, bridge = CASES["absolute"]
  model = _model(bridge, layers)
  params = _params(model, layers)
  _, embeds, mask, hook = _inputs(model, params, lengths=(5, 5))
  logits = jax.jit(lambda hook: model.run_llm(params, embeds, mask, hook=hook)[0])(hook)
  lengths = jnp.full((2,), embeds.shape[1], jnp.int32)
  padded = jnp.pad(embeds, ((0, 0), (0, 16 - embeds.shape[1]), (0, 0)))  # generate's bucket
  first, _ = prefill(model.llm, params["llm"], None, padded, lengths, params["ret"]["ret_embedding"], 32, hook)
  np.testing.assert_allclose(first, logits[:, -1], rtol=5e-5, atol=5e-5)


def test_config_default_is_the_authors_code_and_text_is_the_earlier_bridge():
  config = epalm_config.get_config()
  assert {k: config.bridge[k] for k in AUTHORS if k not in ("name", "prompt_tokens")} == {
      k: v for k, v in AUTHORS.items() if k not in ("name", "prompt_tokens")}
  assert (config.bridge.inject_from, config.bridge.inject_layers, config.optim.lr) == (0.6, 0, 3e-4)  # base recipe
  text = epalm_config.get_config("injection=text").bridge.to_dict()
  defaults = bridges.REGISTRY["epalm"].defaults
  assert text == {"name": "epalm", **defaults}  # the module's defaults: the bridge before issue 26
  counted = epalm_config.get_config("inject_layers=12").bridge
  assert (counted.inject_from, counted.inject_layers, counted.skip_last) == (0.0, 12, 1)
  with pytest.raises(UserError, match=r"config argument injection='opt' is unknown; choose from \['code', 'text'\]"):
    epalm_config.get_config("injection=opt")
  with pytest.raises(UserError, match=r"give the injection window as inject_from .* got inject_from=0.6, "
                                      r"inject_layers=12"):
    bridges.build_bridge(dict(config.bridge.to_dict(), inject_layers=12), vision_width=16, vision_layers=3, grid_size=4,
                         llm_width=24, llm_layers=4)


def test_paper_recipe_learning_rates():
  """recipe=paper: the connector (default group) 1e-5 warmed up to 2e-5 over 400 steps, then cosine to 1e-6
  at the last step; the soft prompt and adapters at 1e-5 throughout. recipe=released: the biases get that
  schedule, the rest 2e-5 with weight decay."""
  config = epalm_config.get_config("recipe=paper,adapters=true")
  optim = config.optim
  default = learning_rate_schedule(optim)
  prompt = learning_rate_schedule(groups(optim)["prompt_adapters"][1])
  total = config.total_steps
  assert [float(default(t)) for t in (0, 200, 400, total)] == pytest.approx([1e-5, 1.5e-5, 2e-5, 1e-6])
  assert [float(prompt(t)) for t in (0, 200, 400, total)] == pytest.approx([1e-5] * 4)
  assert (optim.weight_decay, optim.grad_clip, optim.b2) == (0.02, 0.0, 0.999)
  model = _model(config.bridge.to_dict(), 4)
  trainable = jax.eval_shape(lambda frozen: model.init_trainable(jax.random.key(0), frozen), _params_shapes(4))
  labels = {"/".join(str(k.key) for k in path): label
            for path, label in jax.tree_util.tree_leaves_with_path(group_labels(optim, trainable))}
  assert {p for p, label in labels.items() if label == "prompt_adapters"} == {
      p for p in labels if p.startswith(("bridge/prompt", "bridge/adapter_"))}
  assert labels["bridge/projection_kernel"] == labels["ret/logit_scale"] == "default"
  released = epalm_config.get_config("recipe=released").optim
  assert released.groups.biases.params == "bias$" and (released.lr, released.schedule) == (2e-5, "constant")


def _params_shapes(layers):
  return jax.eval_shape(lambda: {
      "vision": CLIPVisionTransformer(VISION).init(jax.random.key(0), jnp.zeros((1, 3, 28, 28)))["params"],
      "llm": Gemma(_llm(layers)).init(jax.random.key(1), jnp.zeros((1, 1), jnp.int32))["params"]})


def test_paper_recipe_trains_checkpoints_and_resumes(tmp_path):
  """The grouped optimizer through train/loop.py on the tiny world: 4 steps, a checkpoint, resumed to 6."""
  import tiny_world  # pylint: disable=g-import-not-at-top
  from bridgejax import experiment
  from bridgejax.train import loop
  paths = tiny_world.make(str(tmp_path / "world"))
  paper = epalm_config.get_config("recipe=paper")
  config = tiny_world.config(paths, total_steps=4)
  config.bridge, config.optim = paper.bridge, paper.optim
  config.optim.update(warmup_steps=2, decay_steps=4)
  setup = experiment.build(config)
  summary = loop.train(config, str(tmp_path / "run"), loop.train_iterator(config, setup), setup=setup)
  assert summary["step"] == 4 and set(summary["state"].opt_state[1].inner_states) == {"default", "prompt_adapters"}
  config.total_steps = 6
  setup = experiment.build(config)
  summary = loop.train(config, str(tmp_path / "run"), loop.train_iterator(config, setup), setup=setup)
  assert summary["step"] == 6
