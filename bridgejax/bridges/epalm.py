"""eP-ALM (Shukor, Dancette and Cord 2023): the CLS tokens of the frozen tower's last N layers,
each through its own linear layer, injected into the last M layers of the frozen LLM; a trainable
soft prompt and optional adapters. Acts inside the LLM through the decoder hook (inllm.py).

The paper's supplementary (its Appendix A-B), with OPT-2.7B: "We extract the [CLS] tokens of the last
6 layers of perceptual encoders and prepend them, after linear projection, to the text tokens of the
last 12 layers of the OPT. Note that we replace the previous [CLS] with the new one to keep the same
number of tokens"; "each couple of layers (here 2), we replace the previous [CLS] with the new one
(thus only increasing the number of tokens by 1 the whole process)". eP-ALM uses "different
projections for each [CLS]" (eP-ALM_lin: one shared, `shared_projection=True`). The soft prompt is
"a linear embedding layer that takes numbers from 0 to the length of the prompt (here 10)", with "an
MLP after the prompts" in most experiments. Adapters (eP-ALM_ada): "sequential Adapters after self
attentions and feedforward layers with a downsample factor of 8 and ReLU activation", in all blocks.

Equations (N = num_cls, M = inject_layers, L the LLM's layers, W vision width, E LLM width):
  c_j = CLS of hidden_states[-N + j],  v_j = c_j A_j + a_j   (B, E), A_j (W, E); j = 0..N-1
  LLM input: [slot; P; text], P = MLP(p) (prompt_tokens, E), p a learned table,
    MLP(p) = tanh(p U_1 + u_1) U_2 + u_2 (prefix-tuning's reparametrisation; eP-ALM does not say which
    MLP: a choice), or P = p without prompt_mlp.
  Layer l of the last M takes CLS j(l) = N-1 - ((L-1-l)·N) // M: the last layer gets the last CLS and
    each CLS a run of M/N layers; at the first layer of each run the slot's hidden state is set to
    v_j (prepended at the first, replaced after). Below the window the slot's column is hidden from
    every query, so the first L-M layers see [P; text] exactly as without it.
  Adapters: h <- h + relu(h D_l + d) U_l + u on the attention's and the MLP's output h (after any
    post-norm, before the residual add), D_l (E, E/8), U_l (E/8, E) zero at init: identity at start.
Choices: the slot is zeros until its first injection (hidden, so its value never matters); the slot
  counts as a position (RoPE has no "no position"), so text positions are one later than without it;
  CLS are read raw (post_norm=False), as OPT's eP-ALM takes the encoder's tokens; the injected v_j is
  not multiplied by the LLM's embedding normaliser (it is a hidden state, not an input embedding);
  the soft prompt and slot are prefix tokens and get the normaliser like every bridge's.
  W_i reads the tower's post-LayerNormed last CLS (its pooled output), as FROMAGe's retrieval.
  N and M are capped at the backbones' depths (min(N, tower layers), min(M, L)), so the config also
  runs on the toy world's 2-layer backbones.
Parameters (P = prompt_tokens, r = E // adapter_reduction):
  N·(W·E + E) (1·(W·E + E) with shared_projection) + P·E + [prompt_mlp] 2·(E² + E)
  + [adapters] 2·L·(2·E·r + r + E).
  ViT-L/14 + Gemma-2B, defaults (N=6, M=12, P=10 with the MLP): 21,008,384 (21,797,377 with W_i, W_t,
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
  vision_width: int
  llm_width: int
  grid_size: int
  vision_layers: int
  llm_layers: int = 0  # set by BridgeModel from the LLM
  num_cls: int = 6  # N: CLS of the tower's last N layers
  inject_layers: int = 12  # M: into the LLM's last M layers
  shared_projection: bool = False  # eP-ALM_lin's one projection for every CLS
  post_norm: bool = False
  prompt_tokens: int = 10  # 0: no soft prompt
  prompt_mlp: bool = True
  adapters: bool = False
  adapter_reduction: int = 8
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def cls_count(self) -> int:
    return min(self.num_cls, self.vision_layers)

  @property
  def num_prefix_tokens(self) -> int:
    return 1 + self.prompt_tokens

  @property
  def num_context_tokens(self) -> int:
    return self.cls_count

  def injections(self) -> dict[int, int]:
    """{LLM layer: CLS index j} of the layers where the slot gets a new CLS (module docstring)."""
    n, layers = self.cls_count, self.llm_layers
    window = min(self.inject_layers, layers)
    out, previous = {}, None
    for layer in range(layers - window, layers):
      j = n - 1 - ((layers - 1 - layer) * n) // window
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
    """Hide the slot below the window; at an injection layer, set each slot to its image's v_j."""
    injections = self.injections()
    slots = inllm.padded_markers(markers, mask.shape[-1])  # (B, S): each image's slot column
    if layer < min(injections):
      return x, mask & ~slots[:, None, :]
    if layer not in injections:
      return x, mask
    batch, n = context.shape[0], self.cls_count
    v = context.reshape(batch, -1, n, context.shape[-1])[:, :, injections[layer]]  # (B, I, E)
    images = jnp.maximum(inllm.at_columns(inllm.column_images(markers, mask.shape[-1]), columns), 0)  # (B, T)
    values = jnp.take_along_axis(v, images[..., None], axis=1)  # (B, T, E)
    is_slot = inllm.at_columns(slots, columns)  # (B, T)
    return jnp.where(is_slot[..., None], values.astype(x.dtype), x), mask

  def after_sublayer(self, layer, kind, h):
    if not self.adapters:
      return h
    return self.layer_adapters[2 * layer + (kind == "mlp")](h)


def _check(name, dims, *, num_cls, inject_layers, shared_projection, post_norm, prompt_tokens, prompt_mlp,
           adapters, adapter_reduction):
  for key, value in dict(num_cls=num_cls, inject_layers=inject_layers, adapter_reduction=adapter_reduction).items():
    base.check_positive_int(name, key, value)
  if isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int) or prompt_tokens < 0:
    raise UserError(f"bridge {name!r}: prompt_tokens={prompt_tokens!r} must be 0 (no soft prompt) or more")
  for key, value in dict(shared_projection=shared_projection, post_norm=post_norm, prompt_mlp=prompt_mlp,
                         adapters=adapters).items():
    base.check_bool(name, key, value)
  if adapters and dims["llm_width"] % adapter_reduction:
    raise UserError(f"bridge {name!r}: adapter_reduction={adapter_reduction} does not divide the LLM width "
                     f"{dims['llm_width']}")


base.register("epalm", EPALM, check=_check,
              doc="eP-ALM: CLS of the last num_cls tower layers, one Linear(D, E) each, injected into the LLM's "
                  "last inject_layers layers; soft prompt; optional adapters")
