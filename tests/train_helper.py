"""Runs a few training steps in a fresh process (so XLA_FLAGS can fake 8 CPU devices) and saves
the losses and final trainable params:

    python tests/train_helper.py PATHS_JSON WORKDIR OUT.npz DATA MODEL FROZEN [SHARDS]

With SHARDS=n, one process reads the n per-process data shards that an n-process job would read
and feeds their concatenation: the single-process twin of a multi-host run."""

import json
import sys

import jax
import numpy as np

sys.path.insert(0, ".")
sys.path.insert(0, "tests")
import tiny_world  # noqa: E402
from bridgejax import experiment  # noqa: E402
from bridgejax.main import run  # noqa: E402
from bridgejax.train import loop, program  # noqa: E402


def main():
  paths_json, workdir, out, data, model, frozen = sys.argv[1:7]
  shards = int(sys.argv[7]) if len(sys.argv) > 7 else 1
  cfg = tiny_world.config(json.loads(paths_json), total_steps=3, **{
      "mesh.data": int(data), "mesh.model": int(model), "frozen_sharding": frozen})
  if shards == 1:
    summary = run(cfg, workdir)
  else:
    setup = experiment.build(cfg)
    summary = loop.train(cfg, workdir, _joined_shards(cfg, setup, shards), setup=setup)
  losses = [json.loads(line)["train/loss"] for line in open(f"{workdir}/metrics.jsonl")]
  flat = {"/".join(str(k.key) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(summary["state"].params)}
  np.savez(out, losses=np.asarray(losses), devices=len(jax.devices()), **flat)


def _joined_shards(cfg, setup, shards):
  streams = [loop.train_iterator(cfg, setup, shard_index=i, shard_count=shards) for i in range(shards)]
  while True:
    parts = [next(s) for s in streams]
    yield {k: np.concatenate([p[k] for p in parts]) for k in program.MODEL_INPUTS}


if __name__ == "__main__":
  main()
