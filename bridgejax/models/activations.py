"""Activation functions by their Hugging Face config names, shared by every backbone."""

import jax

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # CLIP
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # Gemma
    "silu": jax.nn.silu,  # LLaMA, Mistral, Qwen2
}
