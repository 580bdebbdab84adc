"""What cached frozen features (bridgejax.data.features) buy: the train step, the input pipeline and
the two together, from images and from the cache, on CC3M-like JPEGs.

    python bench/features.py [--config configs/demo.py] [--images 256] [--batch-size 32] [--steps 8] [--json PATH]

The config's backbones are loaded from their paths (the demo's toy CLIP and Gemma by default: a
reduced size that runs on a CPU; a thesis config with --config.vision.path etc. for the real one is
`python bench/features.py --config configs/crossatt_k12.py --vision /ckpt/clip-l14 --llm /ckpt/gemma-2b`).
It prepares --images CC3M-like JPEGs (bench/data_pipeline.py's, 256 px on the short side), caches
their features once (timed: the tower's one-off cost), then reports:
  * step_s: the jitted train step alone, the batch already on the device (median of --steps);
  * data images/s: the grain pipeline alone, in this process (num_workers=0);
  * end-to-end samples/s: next(batch) + step, as training runs them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from data_pipeline import _cc3m_like  # noqa: E402  (bench/ is not a package)
from train_step import load_config  # noqa: E402

from bridgejax import experiment  # noqa: E402
from bridgejax.data import features, prepare  # noqa: E402
from bridgejax.heads import frozen_row_norm  # noqa: E402
from bridgejax.train import loop  # noqa: E402
from bridgejax.train.optimizer import make_optimizer  # noqa: E402
from bridgejax.train.step import TrainState, make_train_step  # noqa: E402


def _timed(fn, count: int, warmup: int = 2) -> list[float]:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(count):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def measure(config, setup, steps: int) -> dict:
  """step_s, data images/s and end-to-end samples/s of one config (images, or data.features)."""
  optimizer = make_optimizer(config.optim)
  step_fn = jax.jit(make_train_step(setup.model, optimizer, seed=0), donate_argnums=(0,))
  state = jax.jit(lambda key: TrainState.create(setup.model.init_trainable(key, setup.frozen), optimizer))(
      jax.random.key(0))  # jitted, as training makes it: no buffer shared between params and optimizer state
  ret_norm = frozen_row_norm(setup.frozen)
  stream = loop.train_iterator(config, setup)
  batch = loop.global_batch(next(stream), setup.mesh)
  box = {"state": state}

  def step(batch=batch):
    box["state"], metrics = step_fn(box["state"], setup.frozen, batch, ret_norm)
    jax.block_until_ready(metrics)

  step_s = statistics.median(_timed(step, steps))
  data_s = sum(_timed(lambda: next(stream), steps))
  both_s = sum(_timed(lambda: step(loop.global_batch(next(stream), setup.mesh)), steps))
  stream.close()
  return {"step_s": step_s, "data_images_per_s": steps * config.batch_size / data_s,
          "end_to_end_samples_per_s": steps * config.batch_size / both_s}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/demo.py")
  p.add_argument("--vision", help="the vision tower's path (default: the config's)")
  p.add_argument("--llm", help="the LLM's path (default: the config's; its tokenizer too)")
  p.add_argument("--images", type=int, default=256)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--json", help="also write the results here")
  a = p.parse_args()
  config = load_config(a.config)
  with tempfile.TemporaryDirectory() as tmp:
    root = Path(tmp)
    prepare.prepare_cc3m(_cc3m_like(root, a.images), root / "cc3m", workers=0, quiet=True)
    config.data.dir, config.data.val_split, config.data.num_workers = str(root / "cc3m"), "", 0
    config.batch_size, config.vision.path = a.batch_size, a.vision or config.vision.path
    config.llm.path = a.llm or config.llm.path
    setup = experiment.build(config)
    manifest = features.write_cache(config, setup, config.data.dir, "train", str(root / "cc3m" / "features" / "train"),
                                    quiet=True)
    images = measure(config, setup, a.steps)
    config.data.features = "auto"
    cached = measure(config, setup, a.steps)
  c = setup.model.vision.config
  results = {
      "config": a.config, "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
      "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
      "load_average": os.getloadavg(), "batch_size": a.batch_size, "num_images": a.images,
      "tower": f"{c.num_layers} layers, width {c.hidden_size}, {c.image_size} px, {1 + c.grid_size**2} tokens",
      "reads": manifest["reads"], "cache_images_per_s": a.images / manifest["seconds"],
      "cache_bytes_per_image": manifest["bytes"] / a.images, "images": images, "features": cached}
  print(f"{a.config}: tower {results['tower']}, batch {a.batch_size}, {jax.default_backend()}")
  held = ", ".join(f"{k} {v['tokens']}" for k, v in manifest["reads"].items())
  print(f"caching once: {results['cache_images_per_s']:.0f} images/s, "
        f"{results['cache_bytes_per_image'] / 1e3:.1f} kB/image ({held})")
  print(f"{'':10s} {'step s':>8s} {'data images/s':>14s} {'end-to-end samples/s':>21s}")
  for name, r in (("images", images), ("features", cached)):
    print(f"{name:10s} {r['step_s']:8.3f} {r['data_images_per_s']:14.0f} {r['end_to_end_samples_per_s']:21.1f}")
  if a.json:
    Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
