"""Train-step speed and memory of any config, with random weights made in memory (no files).

    python bench/train_step.py --config configs/fromage.py --size real [--batch-size 180] [--peer] [--json]
    python bench/train_step.py --config configs/crossatt.py:layer=-2,k=8 --size real --memory-only
    python bench/train_step.py --config configs/demo.py --steps 5 --json          # reduced, CPU-sized

It builds the config's model with `BridgeModel.create` in the config's compute dtype, makes random
frozen weights (uniform, std 0.02) on the first device once, stored in `frozen_param_dtype`, jits
the real `make_train_step` with donated state as training does, and feeds one random batch of
fixed shape, also placed once (the data pipeline is not timed). It reports:
  * step_s: the median of --steps steps after --warmup steps; compile_s separately;
  * samples_per_s = batch_size / step_s;
  * temp/argument/output bytes from XLA's memory analysis of the compiled step, and peak_bytes,
    the device's peak_bytes_in_use over the whole process (null where the backend has no stats);
  * residual_bytes: what the backward keeps from the forward, read from the traced program
    (before fusion: an upper bound, but it shows config.remat's saving on any backend);
  * flops_per_step (analytic, below), the achieved FLOP/s, and utilisation against a bf16 GEMM
    rate measured on the same device in the same run.
--memory-only compiles from abstract inputs (jax.ShapeDtypeStruct) and reports the memory
analysis without allocating or running anything: real-size memory figures on a CPU.

Sizes: --size real takes CLIP and Gemma shapes from the config's `arch` names (ViT-L/14 and
Gemma-2B in the thesis configs); --size reduced (the default on CPU) keeps a backbone whose
config.json exists at its path (the demo's toy backbones) and otherwise uses the toy backbones'
sizes.

--peer runs the same recipe in transformers eager PyTorch in a subprocess, first (JAX would
hold the accelerator's memory): CLIPVisionModel + GemmaForCausalLM with random weights and the same
shapes, frozen; a trainable Linear from the bridge's CLIP feature (the CLS of its layer, post-LN if
the bridge uses it) to k tokens (non-linear bridges are replaced by this linear one with the same
k, and the output says so); a trainable [RET] row and the W_t / W_i heads; captioning and text
cross-entropy plus InfoNCE; AdamW with clipping. It has no concat trick (peer_concat: false). On
a GPU it runs on CUDA in the compute dtype with SDPA attention.

Analytic FLOPs per step (multiply-adds count 2; XLA's cost_analysis misses cuBLAS GEMMs on GPU).
B batch, T text length, K visual tokens, S = K + T.
  CLIP (frozen, forward only; N = (image/patch)^2 + 1 tokens, width W, MLP M, Lv layers):
    clip = B [2 (N-1) C P^2 W + Lv (N (8 W^2 + 4 W M) + 4 N^2 W)]
  LLM per token (width D, H query heads, G kv heads, head dim h, MLP F, Ll layers, V vocab):
    lin = 2 Ll (2 D H h + 2 D G h + 3 D F),  head = 2 D (V + 1)     ([RET] is one extra column)
  LLM attention of one sequence of length s: attn(s) = 4 Ll s^2 H h (dense: masks skip nothing)
  The caption pass is R rows of length Sc: (B, S), or (B/2, 2S) when concat_prob > 0 (the concat
  trick lays pairs out whatever the coin says). Each pass takes logits at all but its last position.
    forward = B (S + T) lin + (R (Sc - 1) + B (T - 1)) head + R attn(Sc) + B attn(T)
  The LLM is frozen but gradients flow through it to the visual tokens and the [RET] row: its
  backward computes activation gradients only, as many FLOPs as the forward for the weight GEMMs
  (2x in all) and twice the forward for attention, whose both operands are activations (3x).
  Bridge and retrieval heads (trainable): 3x their forward (forward, weight and input gradients).
  The bridge's forward is its dot/conv FLOPs read from its traced jaxpr; the heads' is
  2 B E (D + W_feature) for W_t, W_i and 4 B^2 E for the two similarity matrices of InfoNCE.
  Not counted: the optimizer and element-wise work, and the recomputation that config.remat adds
  (so utilisation is model FLOPs utilisation). A bridge reading layer L-1 lets XLA skip CLIP's last
  layer, which this count keeps (1/Lv of the CLIP term).
At fromage, batch 180, 24-token captions, ViT-L/14 + Gemma-2B this gives 116.9 TFLOP per step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_ASSETS = os.path.join(ROOT, "bridgejax", "toy", "assets")


# ---------------------------------------------------------------------------------------- config


def load_config(spec: str):
  """'configs/x.py[:arg]' -> its get_config(arg), as train.py loads it (bridgejax.cli.load_config_file)."""
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # configs import `configs.base` and `bridgejax`
  from bridgejax.cli import load_config_file  # lazy: after ROOT is on sys.path, like every bridgejax import here
  from bridgejax.errors import UserError
  try:
    return load_config_file(spec)
  except UserError as e:
    raise SystemExit(f"--config {spec}: {e}") from None


def backbone_sizes(config, size: str):
  """(vision config, LLM config) of the config at 'real' or 'reduced' size, of any family
  (`bridgejax.param_count`'s names; config.json's architecture)."""
  from bridgejax.param_count import LLM_ARCHS, VISION_ARCHS
  from bridgejax.weights import language, safetensors_io, vision

  if size == "real":
    for part, archs in (("vision", VISION_ARCHS), ("llm", LLM_ARCHS)):
      if config[part].arch not in archs:
        raise SystemExit(f"--size real: config.{part}.arch={config[part].arch!r} is not one of {sorted(archs)}")
    return VISION_ARCHS[config.vision.arch], LLM_ARCHS[config.llm.arch]
  own = lambda path, toy: path if os.path.isfile(os.path.join(path, "config.json")) else os.path.join(TOY_ASSETS, toy)
  return (vision.config_from_hf(safetensors_io.read_hf_config(own(config.vision.path, "clip"))),
          language.config_from_hf(safetensors_io.read_hf_config(own(config.llm.path, "gemma"))))


# ----------------------------------------------------------------------------------------- FLOPs


def _traced_matmul_flops(jaxpr) -> int:
  """dot_general and conv FLOPs of a jaxpr, sub-jaxprs included (no loops expected)."""
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      out_dim = eqn.params["dimension_numbers"].rhs_spec[0]
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) // rhs[out_dim]
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          total += _traced_matmul_flops(inner)
  return total


def _bridge_forward(config, vision, llm, batch: int) -> tuple[int, int, int]:
  """(forward FLOPs, k, image-feature width) of the config's bridge, traced from shapes."""
  import jax
  import jax.numpy as jnp

  from bridgejax.bridges import VisionFeatures, build_bridge

  bridge = build_bridge(config.bridge, vision_width=vision.hidden_size, vision_layers=vision.num_layers,
                        grid_size=vision.grid_size, llm_width=llm.hidden_size)
  hidden = tuple(jax.ShapeDtypeStruct((batch, vision.num_tokens, vision.hidden_size), jnp.float32)
                 for _ in range(vision.num_layers + 1))
  norm = jax.ShapeDtypeStruct((vision.hidden_size,), jnp.float32)
  features = VisionFeatures(hidden, norm, norm, vision.layer_norm_eps)
  params = jax.eval_shape(lambda f: bridge.init(jax.random.key(0), f), features)
  jaxpr = jax.make_jaxpr(lambda p, f: bridge.apply(p, f))(params, features)
  out = jax.eval_shape(lambda p, f: bridge.apply(p, f), params, features)
  return _traced_matmul_flops(jaxpr.jaxpr), out.tokens.shape[1], out.image_feature.shape[-1]


def flops_breakdown(config, vision_config, llm_config, batch: int, text_len: int) -> dict:
  """The analytic count of the module docstring, by part: forward FLOPs and step FLOPs."""
  v, g, B, T = vision_config, llm_config, batch, text_len
  p = float(config.concat_prob)
  N, W, M, P, C = v.num_tokens, v.hidden_size, v.intermediate_size, v.patch_size, v.num_channels
  clip = B * (2 * (N - 1) * C * P * P * W + v.num_layers * (N * (8 * W * W + 4 * W * M) + 4 * N * N * W))
  D, H, G, h, F = g.hidden_size, g.num_heads, g.num_kv_heads, g.head_dim, g.intermediate_size
  lin = 2 * g.num_layers * (2 * D * H * h + 2 * D * G * h + 3 * D * F)
  head = 2 * D * (g.vocab_size + 1)
  attn = lambda s: 4 * g.num_layers * s * s * H * h
  bridge, K, feature = _bridge_forward(config, v, g, B)
  S = K + T
  rows, length = (B // 2, 2 * S) if p > 0 else (B, S)  # the caption pass's layout
  E = config.ret.embed_dim
  fwd = {
      "clip": clip,
      "bridge": bridge,
      "llm_linear": B * (S + T) * lin,
      "lm_head": (rows * (length - 1) + B * (T - 1)) * head,
      "llm_attention": rows * attn(length) + B * attn(T),
      "heads": 2 * B * E * (D + feature) + 4 * B * B * E,
  }
  factor = {"clip": 1, "bridge": 3, "llm_linear": 2, "lm_head": 2, "llm_attention": 3, "heads": 3}
  step = {k: factor[k] * fwd[k] for k in fwd}
  return {"forward": fwd, "step": step, "total": sum(step.values()), "k": K}


def flops_per_step(config, vision_config, llm_config, batch: int, text_len: int) -> float:
  """Analytic FLOPs of one train step (formula in the module docstring)."""
  return flops_breakdown(config, vision_config, llm_config, batch, text_len)["total"]


# ------------------------------------------------------------------------------------- the bench


def random_batch(rng, batch: int, text_len: int, vision, llm) -> dict:
  """BOS + random caption + [RET], right padded to text_len, lengths from half to full."""
  import numpy as np

  r = np.random.default_rng(rng)
  ids = r.integers(3, llm.vocab_size, (batch, text_len)).astype(np.int32)
  lengths = r.integers(max(2, text_len // 2), text_len + 1, batch)
  pos = np.arange(text_len)[None]
  ids[:, 0] = llm.bos_token_id
  ids = np.where(pos == lengths[:, None] - 1, llm.vocab_size, ids)  # [RET] = vocab_size
  mask = (pos < lengths[:, None]).astype(np.int32)
  ids = np.where(mask > 0, ids, llm.pad_token_id).astype(np.int32)
  image = r.standard_normal((batch, vision.num_channels, vision.image_size, vision.image_size), np.float32)
  return {"image": image, "text_ids": ids, "text_mask": mask}


def matmul_rate(n: int, repeats: int = 5) -> float:
  """FLOP/s of an (n, n) x (n, n) bf16 GEMM on the default device (best of `repeats` bursts)."""
  import jax
  import jax.numpy as jnp

  a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in (1, 2))
  f = jax.jit(jnp.matmul)
  f(a, b).block_until_ready()
  start = time.perf_counter()
  f(a, b).block_until_ready()
  calls = max(1, min(200, int(0.05 / max(time.perf_counter() - start, 1e-6))))  # ~50 ms per burst
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      out = f(a, b)
    out.block_until_ready()
    best = min(best, (time.perf_counter() - start) / calls)
  return 2 * n**3 / best


def memory_fields(compiled) -> dict:
  analysis = compiled.memory_analysis()
  get = lambda name: None if analysis is None else int(getattr(analysis, name))
  return {"temp_bytes": get("temp_size_in_bytes"), "argument_bytes": get("argument_size_in_bytes"),
          "output_bytes": get("output_size_in_bytes"), "alias_bytes": get("alias_size_in_bytes")}


def residual_bytes(model, params, frozen, batch) -> int:
  """Bytes the backward pass keeps from the forward: the residuals of jax.vjp of model.loss with
  respect to the trainable params, frozen weights and the batch excluded (they are held anyway).
  Read from the traced program before XLA fuses anything, so it is backend-independent and
  overstates what a compiler keeps, but it shows what config.remat saves on any machine (XLA's
  CPU compiler drops remat's recomputation, so the CPU's temp buffer does not)."""
  import jax

  rng = jax.random.key(0)
  traced, shapes = jax.make_jaxpr(lambda p, f, b: jax.vjp(lambda q: model.loss(q, f, b, rng)[0], p),
                                  return_shape=True)(params, frozen, batch)
  jaxpr = traced.jaxpr
  count = len(jax.tree.leaves(shapes[1]))
  held = set(jaxpr.invars) | set(jaxpr.constvars)
  saved = {v for v in jaxpr.outvars[len(jaxpr.outvars) - count:] if not hasattr(v, "val") and v not in held}
  return sum(v.aval.size * v.aval.dtype.itemsize for v in saved)  # hasattr "val": a literal


def peak_bytes():
  import jax

  stats = jax.devices()[0].memory_stats()
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def build_model(config, vision, llm):
  import jax.numpy as jnp

  from bridgejax.model import BridgeModel

  return BridgeModel.create(config, vision, llm, compute_dtype=jnp.dtype(config.compute_dtype),
                            frozen_param_dtype=jnp.dtype(config.frozen_param_dtype))


def frozen_init(model):
  """key -> random frozen {vision, llm} in frozen_param_dtype, by the modules' own initialisers."""
  import jax
  import jax.numpy as jnp

  c = model.vision.config

  def init(key):
    kv, kl = jax.random.split(key)
    image = jnp.zeros((1, c.num_channels, c.image_size, c.image_size), jnp.float32)
    return {"vision": model.vision.init(kv, image)["params"],
            "llm": model.llm.init(kl, jnp.zeros((1, 1), jnp.int32))["params"]}

  return init


def random_tree(abstract, seed: int = 0, fill=lambda path: None):
  """Random arrays shaped like `abstract`, made on the device: uniform with std 0.02, or the
  constant `fill(path)` returns. One small program per distinct (shape, dtype, constant), from
  XLA's RngBitGenerator: Gemma-2B + ViT-L/14 have 556 leaves but 14 shapes, and whole-tree or
  threefry programs take many times longer to compile. The step's speed does not depend on values."""
  import functools

  import jax
  import jax.numpy as jnp

  @functools.partial(jax.jit, static_argnums=(2, 3, 4))
  def leaf(key, i, shape, dtype, value):
    if value is not None:
      return jnp.full(shape, value, dtype)
    bound = 0.02 * math.sqrt(3)
    return jax.random.uniform(jax.random.fold_in(key, i), shape, jnp.float32, -bound, bound).astype(dtype)

  key = jax.random.key(seed, impl="unsafe_rbg")
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  return jax.tree_util.tree_unflatten(
      treedef, [leaf(key, i, x.shape, jnp.dtype(x.dtype), fill(path)) for i, (path, x) in enumerate(leaves)])


def random_frozen(model, seed: int = 0):
  """Random frozen {vision, llm} on the device, once: CLIP LayerNorm scales at 1, Gemma's
  (1 + scale) RMSNorm scales and all biases at 0, the rest random."""
  import jax

  def fill(path):
    top, name = path[0].key, path[-1].key
    if name in ("scale", "bias"):
      return 1.0 if (top, name) == ("vision", "scale") else 0.0
    return None

  return random_tree(jax.eval_shape(frozen_init(model), jax.random.key(0)), seed, fill)


def benchmark(config, vision, llm, *, batch_size: int, text_len: int, warmup: int = 2, steps: int = 5,
              memory_only: bool = False, seed: int = 0) -> dict:
  """Compiles and times the config's train step on the first device; returns the result fields."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from bridgejax.heads import frozen_row_norm
  from bridgejax.train.optimizer import make_optimizer
  from bridgejax.train.step import TrainState, make_train_step

  if config.concat_prob > 0 and batch_size % 2:
    raise SystemExit(f"batch size {batch_size} must be even for the concat trick (or --concat-prob 0)")
  model = build_model(config, vision, llm)
  optimizer = make_optimizer(config.optim)
  step_fn = jax.jit(make_train_step(model, optimizer, seed=config.seed, rescale_ret=config.ret.rescale_row),
                    donate_argnums=(0,))
  make_state = lambda key, f: TrainState.create(model.init_trainable(key, f), optimizer)
  batch = random_batch(seed, batch_size, text_len, vision, llm)
  abstract = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  frozen_abs = jax.eval_shape(frozen_init(model), jax.random.key(0))
  state = jax.eval_shape(make_state, jax.random.key(0), frozen_abs)
  result = {"residual_bytes": residual_bytes(model, state.params, frozen_abs, abstract(batch))}
  if memory_only:
    start = time.perf_counter()
    compiled = step_fn.lower(state, frozen_abs, abstract(batch), jax.ShapeDtypeStruct((), jnp.float32)).compile()
    result.update(compile_s=time.perf_counter() - start, step_s=None, samples_per_s=None, **memory_fields(compiled))
    return result

  frozen = random_frozen(model, seed)
  state = jax.jit(make_state)(jax.random.key(seed), frozen)
  ret_norm = jax.jit(frozen_row_norm)(frozen)
  batch = jax.device_put(batch)  # placed once, like the frozen weights: the step alone is timed
  jax.block_until_ready((frozen, state, batch))
  start = time.perf_counter()
  compiled = step_fn.lower(state, frozen, batch, ret_norm).compile()
  result["compile_s"] = time.perf_counter() - start
  result.update(memory_fields(compiled))
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    state, metrics = compiled(state, frozen, batch, ret_norm)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  result.update(step_s=step_s, step_s_all=times, samples_per_s=batch_size / step_s,
                loss=float(np.asarray(metrics["loss"])), peak_bytes=peak_bytes())
  return result


# ------------------------------------------------------------------------------------------ peer


def hf_configs(vision, llm) -> tuple[dict, dict]:
  """transformers CLIPVisionConfig / GemmaConfig keyword arguments for the same shapes."""
  if llm.family != "gemma":
    raise SystemExit(f"--peer supports Gemma 1 shapes only, got family {llm.family!r}")
  clip = dict(hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
              num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_heads,
              image_size=vision.image_size, patch_size=vision.patch_size, num_channels=vision.num_channels,
              layer_norm_eps=vision.layer_norm_eps, hidden_act=vision.hidden_act)
  gemma = dict(vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
               num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads,
               num_key_value_heads=llm.num_kv_heads, head_dim=llm.head_dim, rms_norm_eps=llm.rms_norm_eps,
               hidden_act=llm.hidden_act, hidden_activation=llm.hidden_act, rope_theta=llm.rope_theta,
               max_position_embeddings=llm.max_position_embeddings, bos_token_id=llm.bos_token_id,
               pad_token_id=llm.pad_token_id, eos_token_id=llm.eos_token_ids[0], tie_word_embeddings=True)
  return clip, gemma


def peer_spec(config, vision, llm, k: int, *, batch_size: int, text_len: int, warmup: int, steps: int) -> dict:
  clip, gemma = hf_configs(vision, llm)
  bridge = config.bridge
  linear = bridge.name == "cls_linear"
  return {
      "clip": clip, "gemma": gemma, "batch_size": batch_size, "text_len": text_len, "k": k,
      "layer": int(bridge.get("layer", -1)), "post_norm": bool(bridge.get("post_norm", False)),
      "embed_dim": config.ret.embed_dim, "dtype": config.compute_dtype, "warmup": warmup, "steps": steps,
      "optim": {key: config.optim[key] for key in ("lr", "b1", "b2", "eps", "weight_decay", "grad_clip")},
      "loss": {key: float(config.loss[key]) for key in ("caption", "text", "contrastive")},
      "batch": {key: value.tolist() for key, value in
                random_batch(0, batch_size, text_len, vision, llm).items() if key != "image"},
      "peer_bridge": "linear" if linear else f"linear (stands in for {bridge.name}), k={k}",
  }


def run_peer(spec: dict, timeout: float = 1800) -> dict:
  """The torch recipe in a subprocess (torch and JAX never share a process)."""
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--peer-worker"], input=json.dumps(spec),
                        capture_output=True, text=True, timeout=timeout, cwd=ROOT)
  if proc.returncode:
    raise SystemExit(f"the torch peer failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def peer_worker(spec: dict) -> dict:
  """FROMAGe's step in transformers eager torch: frozen CLIP + Gemma, linear bridge, [RET], InfoNCE."""
  import numpy as np
  import torch
  import torch.nn.functional as F
  import transformers

  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[spec["dtype"]]
  torch.manual_seed(0)
  # built in float32 on the device, then cast: `dtype=` / `torch_dtype=` differ across transformers versions
  build = lambda cls, cfg: cls._from_config(cfg, attn_implementation="sdpa").to(device=device, dtype=dtype).eval()
  with torch.device(device):
    clip = build(transformers.CLIPVisionModel, transformers.CLIPVisionConfig(**spec["clip"]))
    lm = build(transformers.GemmaForCausalLM, transformers.GemmaConfig(**spec["gemma"]))
  for p in list(clip.parameters()) + list(lm.parameters()):
    p.requires_grad_(False)
  B, K = spec["batch_size"], spec["k"]
  W, D, E = spec["clip"]["hidden_size"], spec["gemma"]["hidden_size"], spec["embed_dim"]
  V = spec["gemma"]["vocab_size"]
  with torch.device(device):  # trainable, float32 as in bridgejax
    bridge, text_proj, image_proj = torch.nn.Linear(W, D * K), torch.nn.Linear(D, E), torch.nn.Linear(W, E)
    ret_row = torch.nn.Parameter(torch.randn(1, D))
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
  trainable = [*bridge.parameters(), *text_proj.parameters(), *image_proj.parameters(), ret_row, logit_scale]
  o = spec["optim"]
  optimizer = torch.optim.AdamW(trainable, lr=o["lr"], betas=(o["b1"], o["b2"]), eps=o["eps"],
                                weight_decay=o["weight_decay"])
  ids = torch.tensor(spec["batch"]["text_ids"], device=device)
  mask = torch.tensor(spec["batch"]["text_mask"], device=device)
  image = torch.randn(B, spec["clip"]["num_channels"], spec["clip"]["image_size"], spec["clip"]["image_size"],
                      device=device, dtype=dtype)
  table = lm.get_input_embeddings()
  weights = spec["loss"]

  def run_lm(embeds, attention_mask):
    hidden = lm.model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
    logits = torch.cat([lm.lm_head(hidden), hidden @ ret_row.to(dtype).T], dim=-1)
    return logits, hidden

  def ce(logits, labels, target_mask):  # next-token CE over target positions
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, V + 1), labels[:, 1:].reshape(-1), reduction="none")
    m = target_mask[:, 1:].reshape(-1).float()
    return (nll * m).sum() / m.sum().clamp(min=1)

  def step():
    with torch.no_grad():
      out = clip(pixel_values=image, output_hidden_states=True)
      layer = spec["layer"]
      feature = out.hidden_states[layer][:, 0]
      if spec["post_norm"]:
        feature = getattr(clip, "vision_model", clip).post_layernorm(feature)  # moved in transformers 5
    feature = feature.float()
    tokens = bridge(feature).view(B, K, D).to(dtype)
    is_ret = ids == V
    text = table(ids.clamp(max=V - 1))
    text = torch.where(is_ret[..., None], ret_row.to(dtype).expand_as(text), text)
    cap_mask = mask * (~is_ret)
    ones = torch.ones(B, K, dtype=mask.dtype, device=device)
    logits, _ = run_lm(torch.cat([tokens, text], 1), torch.cat([ones, cap_mask], 1))
    labels = torch.cat([torch.zeros_like(ones), ids], 1)
    caption = ce(logits, labels, torch.cat([torch.zeros_like(ones), cap_mask], 1))
    logits, hidden = run_lm(text, mask)
    text_loss = ce(logits, ids, mask)
    last = mask.sum(1) - 1
    text_emb = F.normalize(text_proj(hidden[torch.arange(B, device=device), last].float()), dim=-1)
    image_emb = F.normalize(image_proj(feature), dim=-1)
    sims = logit_scale.exp() * image_emb @ text_emb.T
    target = torch.arange(B, device=device)
    contrastive = (F.cross_entropy(sims, target) + F.cross_entropy(sims.T, target)) / 2
    loss = weights["caption"] * caption + weights["text"] * text_loss + weights["contrastive"] * contrastive
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if o["grad_clip"]:
      torch.nn.utils.clip_grad_norm_(trainable, o["grad_clip"])
    optimizer.step()
    with torch.no_grad():  # FROMAGe keeps the [RET] row at the frozen rows' mean norm
      ret_row.mul_(row_norm / ret_row.norm())
    return loss

  row_norm = table.weight.float().norm(dim=-1).mean()
  times = []
  for i in range(spec["warmup"] + spec["steps"]):
    start = time.perf_counter()
    loss = step()
    loss = float(loss)  # syncs
    if cuda:
      torch.cuda.synchronize()
    if i >= spec["warmup"]:
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  return {"peer_step_s": step_s, "peer_step_s_all": times, "peer_samples_per_s": B / step_s,
          "peer_loss": loss, "peer_peak_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
          "peer_device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
          "peer_dtype": spec["dtype"], "peer_attention": "sdpa", "peer_concat": False,
          "peer_bridge": spec["peer_bridge"], "torch": torch.__version__, "transformers": transformers.__version__,
          "numpy": np.__version__}


# ------------------------------------------------------------------------------------------- CLI


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", help="configs/*.py[:args], as train.py takes it")
  parser.add_argument("--size", choices=("real", "reduced"), help="default: reduced on CPU, real elsewhere")
  parser.add_argument("--batch-size", type=int, help="default: the config's batch_size")
  parser.add_argument("--text-len", type=int, help="default: the config's data.max_caption_tokens")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--remat", choices=("none", "llm", "all"), help="sets config.remat")
  parser.add_argument("--concat-prob", type=float, help="sets config.concat_prob")
  parser.add_argument("--memory-only", action="store_true", help="compile from shapes and report memory only")
  parser.add_argument("--peer", action="store_true", help="also time transformers eager torch, same recipe")
  parser.add_argument("--no-matmul", action="store_true", help="skip measuring the bf16 GEMM rate")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--peer-worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if not args.peer_worker and not args.config:
    parser.error("--config is required")
  if args.memory_only and args.peer:
    parser.error("--memory-only runs nothing: it cannot time a --peer")
  return args


def default_backend() -> str:
  """The JAX backend, probed in a subprocess so that this process leaves the accelerator to the peer."""
  out = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"], capture_output=True,
                       text=True, check=True)
  return out.stdout.strip().splitlines()[-1]


def configure(args):
  """The config with the command line's overrides; whether this checkout's model has remat."""
  import contextlib
  import dataclasses

  from bridgejax.model import BridgeModel

  config = load_config(args.config)
  has_remat = "remat" in {f.name for f in dataclasses.fields(BridgeModel)}
  with config.unlocked() if hasattr(config, "unlocked") else contextlib.nullcontext():
    if args.remat is not None:
      config.remat = args.remat
    if args.concat_prob is not None:
      config.concat_prob = args.concat_prob
  return config, has_remat


def versions() -> dict:
  import flax
  import jax
  import jaxlib
  import optax

  return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "flax": flax.__version__, "optax": optax.__version__}


def run(args) -> dict:
  config, has_remat = configure(args)
  size = args.size
  if size is None:  # with --peer, JAX must not touch the accelerator before the peer has run
    backend = default_backend() if args.peer else _backend_in_process()
    size = "reduced" if backend == "cpu" else "real"
  vision, llm = backbone_sizes(config, size)
  batch_size = args.batch_size or config.batch_size
  text_len = args.text_len or config.data.max_caption_tokens
  flops = flops_breakdown(config, vision, llm, batch_size, text_len)
  result = {"config": config.name, "config_arg": args.config, "size": size, "batch_size": batch_size,
            "text_len": text_len, "k": flops["k"], "concat_prob": float(config.concat_prob),
            "remat": config.get("remat", "none"), "compute_dtype": config.compute_dtype,
            "frozen_param_dtype": config.frozen_param_dtype, "bridge": config.bridge.to_dict(),
            "vision": f"{vision.num_layers} layers, width {vision.hidden_size}, {vision.num_tokens} tokens",
            "llm": f"{llm.num_layers} layers, width {llm.hidden_size}, vocab {llm.vocab_size}",
            "flops_per_step": flops["total"], "flops_by_part": flops["step"]}
  if args.remat not in (None, "none") and not has_remat:
    result["note"] = "this checkout's BridgeModel has no remat: --remat was ignored"
  if args.peer:  # first: JAX has not touched the accelerator yet
    result.update(run_peer(peer_spec(config, vision, llm, flops["k"], batch_size=batch_size, text_len=text_len,
                                     warmup=args.warmup, steps=args.steps)))
  import jax

  device = jax.devices()[0]
  result.update(backend=jax.default_backend(), device_kind=device.device_kind, devices=jax.device_count(),
                **versions())
  result.update(benchmark(config, vision, llm, batch_size=batch_size, text_len=text_len, warmup=args.warmup,
                          steps=args.steps, memory_only=args.memory_only))
  if args.memory_only:
    result.update(peak_bytes=None)
    return result
  result["flops_per_s"] = flops["total"] / result["step_s"]
  if not args.no_matmul:
    n = 512 if result["backend"] == "cpu" else 8192
    rate = matmul_rate(n)
    result.update(matmul_bf16_n=n, matmul_bf16_flops_per_s=rate, utilisation=result["flops_per_s"] / rate)
  if args.peer:
    result["speedup"] = result["peer_step_s"] / result["step_s"]
  return result


def _backend_in_process() -> str:
  import jax

  return jax.default_backend()


def _bytes(x):
  if x is None:
    return "n/a"
  return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.1f} MiB"


def _flops(x, unit=""):
  scale, prefix = next((s, p) for s, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1, "")) if x >= s or s == 1)
  return f"{x / scale:.3g} {prefix}FLOP{unit}"


def format_table(r: dict) -> str:
  lines = [f"{r['config']} ({r['size']} size: vision {r['vision']}; llm {r['llm']})",
           f"  batch {r['batch_size']}, text {r['text_len']} tokens, k={r['k']}, concat_prob {r['concat_prob']}, "
           f"remat {r['remat']}, {r['compute_dtype']} compute; {r['backend']} {r['device_kind']}, jax {r['jax']}"]
  row = lambda name, value: lines.append(f"  {name:28s} {value}")
  if r.get("step_s") is not None:
    row("step", f"{r['step_s']:.4f} s (median of {len(r['step_s_all'])})")
    row("samples/s", f"{r['samples_per_s']:.1f}")
  row("compile", f"{r['compile_s']:.1f} s")
  row("XLA temp / argument / output", f"{_bytes(r['temp_bytes'])} / {_bytes(r['argument_bytes'])} / "
      f"{_bytes(r['output_bytes'])}")
  row("device peak", _bytes(r.get("peak_bytes")))
  row("backward residuals (traced)", _bytes(r.get("residual_bytes")))
  row("FLOPs per step (analytic)", _flops(r["flops_per_step"]))
  if "utilisation" in r:
    row("achieved", _flops(r["flops_per_s"], "/s"))
    row(f"bf16 GEMM rate (n={r['matmul_bf16_n']})", _flops(r["matmul_bf16_flops_per_s"], "/s"))
    row("utilisation", f"{100 * r['utilisation']:.1f}%")
  if "peer_step_s" in r:
    row("peer (transformers eager)", f"{r['peer_step_s']:.4f} s, {r['peer_samples_per_s']:.1f} samples/s, "
        f"peak {_bytes(r['peer_peak_bytes'])}, bridge {r['peer_bridge']}, no concat trick")
    row("speedup (peer / bridgejax)", f"{r['speedup']:.2f}x")
  if "note" in r:
    lines.append(f"  note: {r['note']}")
  return "\n".join(lines)


def main(argv=None) -> dict | None:
  args = parse_args(argv)
  if args.peer_worker:
    print(json.dumps(peer_worker(json.loads(sys.stdin.read()))))
    return None
  result = run(args)
  print(json.dumps(result) if args.json else format_table(result))
  return result


if __name__ == "__main__":
  main()
