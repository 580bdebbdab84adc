"""eP-ALM (Shukor, Dancette and Cord 2023) as the authors' code runs it: the CLS tokens of the frozen
tower's last N layers, each through its own linear layer, set as the hidden state of one slot token
in a window of the frozen LLM's layers; a trainable soft prompt and optional adapters. Acts inside
the LLM through the decoder hook (inllm.py).

The paper's supplementary (its Appendix A-B), with OPT-2.7B: "We extract the [CLS] tokens of the last
6 layers of perceptual encoders and prepend them, after linear projection, to the text tokens of the
last 12 layers of the OPT. Note that we replace the previous [CLS] with the new one to keep the same
number of tokens"; "each couple of layers (here 2), we replace the previous [CLS] with the new one
(thus only increasing the number of tokens by 1 the whole process)". eP-ALM uses "different
projections for each [CLS]" (eP-ALM_lin: one shared, `shared_projection=True`). The soft prompt is
"a linear embedding layer that takes numbers from 0 to the length of the prompt (here 10)", with "an
MLP after the prompts" in most experiments. Adapters (eP-ALM_ada): "sequential Adapters after self
attentions and feedforward layers with a downsample factor of 8 and ReLU activation", in all blocks.

Source: github.com/mshukor/eP-ALM (commit 9ecfeb9). models/opt.py OPTDecoder: the window and text_step
(l.518-527, start_layer_idx/end_layer_idx from configs/image/ePALM_caption.yaml: 19 and 31 of OPT's 32
layers, text_step 1), the CLS schedule (l.693-705: step = M // N if M > N else 1), the injection
(l.724-752: at every window layer idx in [start, end), CLS min((idx - start) // step, N - 1); prepended
at the first, `hidden_states[:, 0, :] = vis_pref` at every later one; the additive mask padded with a
zero row and column, l.750, so the slot's query sees every column and every query sees the slot).
models/epalm.py l.334-351: the last N hidden states, connector[-i] on the CLS of hidden state [-i].
models/vit.py l.501-503: every hidden state it returns went through the tower's final LayerNorm.

Equations (N = num_cls, L the LLM's layers, W vision width, E LLM width; B batch, T text tokens):
  c_j = CLS of hidden_states[-N + j], through the tower's post-LayerNorm iff post_norm   (B, W)
  v_j = c_j A_j + a_j   (B, E), A_j (W, E); j = 0..N-1
  LLM input: [slot; P; text], P = MLP(p) (prompt_tokens, E), p a learned table,
    MLP(p) = tanh(p U_1 + u_1) U_2 + u_2 (the authors' InputPrompts, models/epalm.py l.128: Embedding,
    Linear, Tanh, Linear), or P = p without prompt_mlp.
  Window [s, e) of the layers: e = max(L - skip_last, 1); s = floor(inject_from · L) (relative: 0.6 of
    OPT's 32 is 19, of Gemma-2B's 18 is 10) or e - inject_layers (absolute; exactly one of the two is
    non-zero); s is clipped to [0, e - 1], so the window keeps a layer on a 1- or 2-layer toy LLM.
    M = e - s. The authors: [19, 31), skip_last=1: OPT's last layer gets no CLS.
  Which CLS j(l) the slot takes at window layer l:
    reset_every_layer=True (the authors' code): j(l) = min((l - s) // step, N - 1), step = M // N if
      M > N else 1, and the slot's hidden state is set to v_j(l) at EVERY window layer: each CLS is held
      for a run of `step` layers and re-written at each (the last CLS for the rest of the window when
      N·step < M; the first M CLS only when M < N).
    reset_every_layer=False (the paper's text; this module's default): j(l) = N-1 - ((e-1-l)·N) // M,
      the slot set to v_j only at the first layer of each run: the window's last layer gets the last
      CLS and each CLS a run of M/N layers; in between the slot's state evolves through the layers.
  Below the window the slot's column is hidden from every query, so the first s layers see [P; text]
    exactly as without it (the authors' sequence has no slot there).
  From layer s on, the slot's query is causal (causal_slot=True) or also sees every later column of
    its own image's span (causal_slot=False, the authors' zero mask row): its caption, all of it.
  Adapters: h <- h + relu(h D_l + d) U_l + u on the attention's and the MLP's output h (after any
    post-norm, before the residual add), D_l (E, E/8), U_l (E/8, E) zero at init: identity at start.
What the non-causal slot does: with the slot re-set at every window layer, its query's output is
  thrown away at the next layer, except at the window's last layer e - 1: the layers after the window
  (skip_last of them) read it. So with skip_last >= 1 and causal_slot=False a text token there sees,
  through the slot, tokens after it: in training, the next token it is asked to predict (the authors'
  code does this; their generation reruns the whole sequence at every step, use_cache: False, so the
  slot sees the tokens generated so far). With skip_last=0 the slot's query changes nothing.
Choices: the slot is zeros until its first injection (hidden, so its value never matters); the slot
  counts as a position (RoPE has no "no position"; OPT adds its learned positions at the input only,
  and the authors give the prompt none), so text positions are one later than without it; the
  injected v_j is not multiplied by the LLM's embedding normaliser (it is a hidden state, not an input
  embedding); the soft prompt and slot are prefix tokens and get the normaliser like every bridge's.
  The non-causal slot sees the columns of its own image only (a concat-trick row holds two captions;
  the authors' rows hold one) and, in a full pass, not the row's padding (the authors' zero row sees
  padding too: a row's output would depend on its batch's longest caption). With a KV cache its query
  runs once, at prefill, over the prompt (a shorter prompt's right padding included: the cache has no
  padding mask; the slots generate() adds past the prompt are not seen), and generated tokens read that.
  W_i reads the tower's post-LayerNormed last CLS (its pooled output), as FROMAGe's retrieval.
  N is capped at the tower's depth (min(N, tower layers)) and the window as above, so the config also
  runs on the toy world's 2-layer backbones.
  The module's defaults are the paper's text (this bridge before issue 26: the last 12 layers, a new
  CLS every M/N layers, a causal slot, raw CLS); configs/epalm.py's default is the authors' code
  (inject_from=0.6, skip_last=1, reset_every_layer, causal_slot=False, post_norm), injection=text there
  the former.
Parameters (P = prompt_tokens, r = E // adapter_reduction; the window and schedule add none):
  N·(W·E + E) (1·(W·E + E) with shared_projection) + P·E + [prompt_mlp] 2·(E² + E)
  + [adapters] 2·L·(2·E·r + r + E).
  ViT-L/14 + Gemma-2B, defaults (N=6, P=10 with the MLP): 21,008,384 (21,797,377 with W_i, W_t,
  [RET] and the logit scale); with adapters +37,831,680.
Prefix: 1 + P tokens (slot, prompt); context: N rows (v_j), so num_tokens = 1 + P + N.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bridgejax.bridges import base, inllm
from bridgejax.bridges.base import BridgeOutput
from bridgejax.errors import UserError


class Adapter(nn.Module):
  """Houlsby's sequential adapter: h + relu(h D + d) U + u, the up-projection zero at init."""

  reduction: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h):  # (B, T, E) -> (B, T, E)
    width = h.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    down = base.dense(width // self.reduction, width, name="down", **kw)(h.astype(self.dtype))
    up = nn.Dense(width, kernel_init=nn.initializers.zeros, name="up", **kw)(jax.nn.relu(down))
    return h + up.astype(h.dtype)

  @staticmethod
  def num_params(width: int, reduction: int) -> int:
    r = width // reduction
    return 2 * width * r + r + width


class EPALM(inllm.InLLMBridge):
  grid_size: int
  vision_layers: int
  llm_layers: int = 0  # set by BridgeModel from the LLM
  num_cls: int = 6  # N: CLS of the tower's last N layers
  inject_layers: int = 12  # the window's length, ending skip_last layers before the end (0: inject_from sets it)
  inject_from: float = 0.0  # or its start, a fraction of the LLM's depth (0: inject_layers sets it)
  skip_last: int = 0  # the window ends this many layers before the last (the authors' code: 1)
  reset_every_layer: bool = False  # the slot set to its CLS at every window layer (the authors' code)
  causal_slot: bool = True  # False: the slot's query sees its image's whole caption (the authors' code)
  shared_projection: bool = False  # eP-ALM_lin's one projection for every CLS
  post_norm: bool = False  # CLS through the tower's post-LayerNorm (the authors' code)
  prompt_tokens: int = 10  # 0: no soft prompt
  prompt_mlp: bool = True
  adapters: bool = False
  adapter_reduction: int = 8

  @property
  def cls_count(self) -> int:
    return min(self.num_cls, self.vision_layers)

  @property
  def num_prefix_tokens(self) -> int:
    return 1 + self.prompt_tokens

  @property
  def num_context_tokens(self) -> int:
    return self.cls_count

  def window(self) -> tuple[int, int]:
    """[s, e): the LLM layers whose slot takes a CLS (module docstring)."""
    end = max(self.llm_layers - self.skip_last, 1)
    start = int(self.inject_from * self.llm_layers + 1e-9) if self.inject_from else end - self.inject_layers
    return min(max(start, 0), end - 1), end

  def injections(self) -> dict[int, int]:
    """{LLM layer: CLS index j} of the layers where the slot is set to v_j (module docstring)."""
    n, (start, end) = self.cls_count, self.window()
    window = end - start
    if self.reset_every_layer:  # models/opt.py l.703 and l.725-735
      step = window // n if window > n else 1
      return {layer: min((layer - start) // step, n - 1) for layer in range(start, end)}
    out, previous = {}, None
    for layer in range(start, end):
      j = n - 1 - ((end - 1 - layer) * n) // window
      if j != previous:
        out[layer] = previous = j
    return out

  @property
  def num_params(self) -> int:
    w, e = self.vision_width, self.llm_width
    projections = (1 if self.shared_projection else self.cls_count) * (w * e + e)
    prompt = self.prompt_tokens * e + (2 * (e * e + e) if self.prompt_tokens and self.prompt_mlp else 0)
    adapters = 2 * self.llm_layers * Adapter.num_params(e, self.adapter_reduction) if self.adapters else 0
    return projections + prompt + adapters

  def setup(self):
    w, e, n = self.vision_width, self.llm_width, self.cls_count
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.shared_projection:
      self.projection = base.dense(e, w, name="projection", **kw)
    else:  # one (W, E) linear per CLS, stacked
      self.projection_kernel = self.param("projection_kernel", base.torch_stacked_linear_kernel, (n, w, e),
                                          self.param_dtype)
      self.projection_bias = self.param("projection_bias", base.torch_linear_bias(w), (n, e), self.param_dtype)
    if self.prompt_tokens:
      self.prompt = self.param("prompt", nn.initializers.normal(0.02), (self.prompt_tokens, e), self.param_dtype)
      if self.prompt_mlp:
        self.prompt_in = base.dense(e, e, name="prompt_in", **kw)
        self.prompt_out = base.dense(e, e, name="prompt_out", **kw)
    if self.adapters:
      self.layer_adapters = [Adapter(self.adapter_reduction, name=f"adapter_{i}_{kind}", **kw)
                             for i in range(self.llm_layers) for kind in ("attn", "mlp")]

  def __call__(self, features: base.VisionFeatures) -> BridgeOutput:
    base.check_tokens("epalm", features, self.grid_size, self.vision_width)
    n = self.cls_count
    cls = jnp.stack([features.cls(j - n, self.post_norm) for j in range(n)], axis=1).astype(self.dtype)  # (B, N, W)
    if self.shared_projection:
      context = self.projection(cls)
    else:
      context = jnp.einsum("BNW,NWE->BNE", cls, self.projection_kernel.astype(self.dtype)) + self.projection_bias
    batch = cls.shape[0]
    prefix = [jnp.zeros((batch, 1, self.llm_width), context.dtype)]  # the slot
    if self.prompt_tokens:
      prompt = self.prompt.astype(self.dtype)
      if self.prompt_mlp:
        prompt = self.prompt_out(jnp.tanh(self.prompt_in(prompt)))
      prefix.append(jnp.broadcast_to(prompt, (batch, *prompt.shape)).astype(context.dtype))
    if self.adapters and self.is_initializing():  # their parameters exist only once called
      for adapter in self.layer_adapters:
        adapter(context[:1, :1])
    return BridgeOutput(jnp.concatenate([*prefix, context], axis=1), features.cls(-1, post_norm=True))

  def before_layer(self, layer, x, mask, columns, context, markers):
    """Hide the slot below the window; from there on open its query (causal_slot=False); at an
    injection layer, set each slot to its image's v_j."""
    injections = self.injections()
    width = mask.shape[-1]
    slots = inllm.padded_markers(markers, width)  # (B, S): each image's slot column
    if layer < min(injections):
      return x, mask & ~slots[:, None, :]
    is_slot = inllm.at_columns(slots, columns)  # (B, T)
    images = inllm.column_images(markers, width)  # (B, S)
    query_images = inllm.at_columns(images, columns)  # (B, T)
    if not self.causal_slot:  # the slot's row: every column of its image that this pass sees (not padding)
      # (B, S): the valid columns; with a KV cache, at prefill, the prompt's markers.shape[1] columns
      seen = mask.any(axis=1) & (jnp.arange(width) < markers.shape[1])
      own = (images[:, None, :] == query_images[:, :, None]) & seen[:, None, :]  # (B, T, S)
      mask = mask | (is_slot[:, :, None] & own)
    if layer not in injections:
      return x, mask
    batch, n = context.shape[0], self.cls_count
    v = context.reshape(batch, -1, n, context.shape[-1])[:, :, injections[layer]]  # (B, I, E)
    values = jnp.take_along_axis(v, jnp.maximum(query_images, 0)[..., None], axis=1)  # (B, T, E)
    return jnp.where(is_slot[..., None], values.astype(x.dtype), x), mask

  def after_sublayer(self, layer, kind, h):
    if not self.adapters:
      return h
    return self.layer_adapters[2 * layer + (kind == "mlp")](h)


def _check(name, dims, *, num_cls, inject_layers, inject_from, skip_last, reset_every_layer, causal_slot,
           shared_projection, post_norm, prompt_tokens, prompt_mlp, adapters, adapter_reduction):
  for key, value in dict(num_cls=num_cls, adapter_reduction=adapter_reduction).items():
    base.check_positive_int(name, key, value)
  for key, value in dict(inject_layers=inject_layers, skip_last=skip_last, prompt_tokens=prompt_tokens).items():
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise UserError(f"bridge {name!r}: {key}={value!r} must be an integer >= 0")
  if isinstance(inject_from, bool) or not isinstance(inject_from, (int, float)) or not 0 <= inject_from < 1:
    raise UserError(f"bridge {name!r}: inject_from={inject_from!r} must be a fraction of the LLM's depth in [0, 1)")
  if (inject_from > 0) == (inject_layers > 0):
    raise UserError(f"bridge {name!r}: give the injection window as inject_from (a fraction of the LLM's depth, "
                     f"e.g. 0.6) or inject_layers (a count of layers) and set the other to 0; got "
                     f"inject_from={inject_from}, inject_layers={inject_layers}")
  for key, value in dict(reset_every_layer=reset_every_layer, causal_slot=causal_slot,
                         shared_projection=shared_projection, post_norm=post_norm, prompt_mlp=prompt_mlp,
                         adapters=adapters).items():
    base.check_bool(name, key, value)
  if adapters and dims["llm_width"] % adapter_reduction:
    raise UserError(f"bridge {name!r}: adapter_reduction={adapter_reduction} does not divide the LLM width "
                     f"{dims['llm_width']}")


base.register("epalm", EPALM, check=_check,
              doc="eP-ALM: CLS of the last num_cls tower layers, one Linear(D, E) each, set as one slot's hidden state "
                  "in a window of the LLM's layers (inject_from or inject_layers, skip_last); soft prompt; "
                  "optional adapters")
