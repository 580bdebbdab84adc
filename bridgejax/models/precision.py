"""float32 means float32: the matmul precision a computation is traced under.

JAX's default matmul precision is backend-dependent: on NVIDIA GPUs float32 matmuls and
convolutions run as TF32 (10-bit mantissa inputs), on TPUs as bfloat16 passes. Measured on an
H200 with jax 0.11.2 at the default: CLIP ViT-L/14 in float32 differed from torch float32 by
1.7e-3 max abs, and Gemma float32 logits by 2.1e-3 relative (torch does not use TF32 unless
asked). So every bridgejax module whose compute dtype is float32 traces its matmuls at
"highest" precision, the same on every backend.

An explicit choice always wins. To opt into TF32 (faster float32 on Ampere and later):
  * training and eval: `--config.matmul_precision=tensorfloat32` (any `jax.default_matmul_precision`
    name: "default", "high", "bfloat16", "tensorfloat32", "float32", "highest");
  * the library: `jax.config.update("jax_default_matmul_precision", "tensorfloat32")`, or
    `with jax.default_matmul_precision("tensorfloat32"):` around the call that traces.
bfloat16 and float16 computations are left at the backend's default (their GEMMs are
bf16 x bf16 with float32 accumulation either way).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp


def matmul_precision(compute_dtype, override: str | None = None):
  """The context to trace a computation of `compute_dtype` under (see the module docstring).

  override: a jax.default_matmul_precision name that wins over everything; "" or None = automatic.
  """
  if override:
    return jax.default_matmul_precision(override)
  if jnp.dtype(compute_dtype) != jnp.float32 or jax.config.jax_default_matmul_precision is not None:
    return contextlib.nullcontext()  # not float32, or the user chose a precision themselves
  return jax.default_matmul_precision("highest")
