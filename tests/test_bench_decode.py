"""bench/decode.py's memory floor: the bytes a greedy step reads and the read rate it is measured at
(the whole bench needs the real Gemma 3 and transformers' minute-long GGUF load: a benchmark)."""

import os
import sys
import types

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import decode  # noqa: E402

sys.path.pop(0)


def test_a_step_reads_every_weight_once_and_each_rows_kv_cache():
  config = types.SimpleNamespace(num_layers=3, num_kv_heads=2, head_dim=8)
  lm = types.SimpleNamespace(config=config, params={"a": np.zeros((10, 4), np.float32), "b": {"c": np.zeros(6, np.float32)}})
  weights = (40 + 6) * 4
  assert decode.bytes_per_step(lm, batch=1, context=5) == weights + 3 * 2 * 2 * 8 * 5 * 4
  assert decode.bytes_per_step(lm, batch=4, context=5) - weights == 4 * (3 * 2 * 2 * 8 * 5 * 4)


def test_the_read_rate_is_bytes_over_seconds():
  rate = decode.memory_read_rate(1 << 24, repeats=2)
  assert 1e8 < rate < 1e12  # 0.1 GB/s to 1 TB/s: a plausible memory system
