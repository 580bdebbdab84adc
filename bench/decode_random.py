"""Greedy decoding speed at Gemma-2B shapes with random weights made in memory (no files), through
the public API: `bridgejax.weights.LanguageModel(...).generate`, as `load_language_model(path)` returns it.

    python bench/decode_random.py [--size real] [--batch 1 8] [--prompt-len 16] [--new-tokens 64] [--peer] [--json]

Tokens/s counts the new tokens of the whole batch per second, prefill included, compilation
excluded (one warm-up call first; the median of --repeats calls). Rows:
  device:  parameters made on the device;
  numpy:   the same parameters handed to LanguageModel as numpy arrays, as a checkpoint reader
           gives them; batch 1 only. LanguageModel once re-sent such parameters on every call
           (127 tokens/s against 442 at Gemma-2B on an H200); it now places them once, so this
           row should match the first;
  --peer:  transformers' GemmaForCausalLM.generate(do_sample=False), eager, in a subprocess run
           first; CUDA and SDPA when there is a GPU, in the same dtype.
--size reduced (the default on CPU) uses the toy Gemma's shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_GEMMA = os.path.join(ROOT, "bridgejax", "toy", "assets", "gemma")


def gemma_config(size: str):
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  from bridgejax.models.gemma import GemmaConfig
  from bridgejax.weights import language, safetensors_io

  return GemmaConfig() if size == "real" else language.config_from_hf(safetensors_io.read_hf_config(TOY_GEMMA))


def prompts(config, batch: int, length: int):
  import numpy as np

  ids = np.random.default_rng(0).integers(3, config.vocab_size, (batch, length)).astype(np.int32)
  ids[:, 0] = config.bos_token_id
  return ids, np.ones_like(ids)


def _median_time(fn, repeats: int) -> float:
  fn()  # warm-up: compilation and first-call overheads
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench_jax(size: str, batches, prompt_len: int, new_tokens: int, repeats: int, dtype: str) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from bridgejax.models.families import decoder_class
  from bridgejax.weights import LanguageModel

  config = gemma_config(size)
  dt = jnp.dtype(dtype)
  module = decoder_class(config)(config, dtype=dt, param_dtype=dt)
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from train_step_model import random_tree

  params = random_tree(abstract, 0, lambda path: 0.0 if path[-1].key == "scale" else None)  # (1 + scale) norms
  on_device = LanguageModel(module, jax.block_until_ready(params), config)
  rows = []
  for batch in batches:
    ids, mask = prompts(config, batch, prompt_len)
    variants = [("device", on_device)]
    if batch == 1:
      variants.append(("numpy", LanguageModel(module, jax.tree.map(np.asarray, params), config)))
    for name, lm in variants:
      run = lambda: np.asarray(lm.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_ids=()))
      seconds = _median_time(run, repeats)
      rows.append({"impl": f"bridgejax ({name} params)", "batch": batch, "seconds": seconds,
                   "tokens_per_s": batch * new_tokens / seconds})
  return {"rows": rows, "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
          "jax": jax.__version__}


def hf_config(config) -> dict:
  return dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
              intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
              num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
              head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps, hidden_act=config.hidden_act,
              hidden_activation=config.hidden_act, rope_theta=config.rope_theta,
              max_position_embeddings=config.max_position_embeddings, bos_token_id=config.bos_token_id,
              pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_ids[0], tie_word_embeddings=True)


def peer_worker(spec: dict) -> dict:
  import torch
  import transformers

  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[spec["dtype"]]
  torch.manual_seed(0)
  with torch.device(device):
    lm = transformers.GemmaForCausalLM._from_config(transformers.GemmaConfig(**spec["gemma"]),
                                                    attn_implementation="sdpa").to(device=device, dtype=dtype).eval()
  rows = []
  for batch, ids in zip(spec["batches"], spec["ids"]):
    ids = torch.tensor(ids, device=device)
    n = spec["new_tokens"]

    def run():
      with torch.no_grad():
        lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, pad_token_id=spec["gemma"]["pad_token_id"])
      if cuda:
        torch.cuda.synchronize()

    seconds = _median_time(run, spec["repeats"])
    rows.append({"impl": "transformers eager", "batch": batch, "seconds": seconds, "tokens_per_s": batch * n / seconds})
  return {"rows": rows, "torch": torch.__version__, "transformers": transformers.__version__,
          "peer_device": torch.cuda.get_device_name() if cuda else "cpu"}


def run_peer(size: str, batches, prompt_len: int, new_tokens: int, repeats: int, dtype: str) -> dict:
  config = gemma_config(size)
  spec = {"gemma": hf_config(config), "batches": list(batches), "new_tokens": new_tokens, "repeats": repeats,
          "dtype": dtype, "ids": [prompts(config, b, prompt_len)[0].tolist() for b in batches]}
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--peer-worker"], input=json.dumps(spec),
                        capture_output=True, text=True, cwd=ROOT)
  if proc.returncode:
    raise SystemExit(f"the transformers peer failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict | None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--size", choices=("real", "reduced"), help="default: reduced on CPU, real elsewhere")
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--prompt-len", type=int, default=16)
  parser.add_argument("--new-tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--peer", action="store_true")
  parser.add_argument("--json", action="store_true")
  parser.add_argument("--peer-worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.peer_worker:
    print(json.dumps(peer_worker(json.loads(sys.stdin.read()))))
    return None
  size = args.size
  if size is None:  # probed in a subprocess so that the peer gets the accelerator first
    probe = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"], capture_output=True,
                           text=True, check=True)
    size = "reduced" if probe.stdout.strip().splitlines()[-1] == "cpu" else "real"
  shape = (args.batch, args.prompt_len, args.new_tokens, args.repeats, args.dtype)
  peer = run_peer(size, *shape) if args.peer else {"rows": []}
  result = bench_jax(size, *shape)
  result.update(size=size, prompt_len=args.prompt_len, new_tokens=args.new_tokens, dtype=args.dtype,
                **{k: v for k, v in peer.items() if k != "rows"})
  result["rows"] += peer["rows"]
  if args.json:
    print(json.dumps(result))
  else:
    print(f"Gemma ({size} size) greedy, {args.dtype}, prompt {args.prompt_len}, {args.new_tokens} new tokens; "
          f"jax {result['jax']} on {result['backend']} {result['device_kind']}")
    for row in result["rows"]:
      print(f"  {row['impl']:28s} batch {row['batch']:3d}: {row['tokens_per_s']:9.1f} tokens/s "
            f"({row['seconds']:.3f} s)")
  return result


if __name__ == "__main__":
  main()
