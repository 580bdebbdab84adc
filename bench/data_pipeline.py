"""Images per second of the whole input pipeline (read record, decode JPEG, CLIP resize + crop +
normalise, tokenise, batch) for 0..N worker processes, on CC3M-like data and on the toy world.

    python bench/data_pipeline.py [--images 512] [--batch-size 32] [--workers 0 1 2] [--tokenizer DIR]

CC3M-like: JPEGs (quality 95) of 256 px on the shorter side, the size img2dataset is usually run
with, made here as an img2dataset webdataset shard and prepared with bridgejax.data.prepare.
Prints a table (and writes JSON with --json PATH).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def _photo_like(rng: np.random.Generator, width: int, height: int) -> bytes:
  """A smooth, textured JPEG: decodes like a photo (random noise would be unrealistically big)."""
  small = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
  image = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
  draw = ImageDraw.Draw(image)
  for _ in range(6):
    x, y = int(rng.integers(width)), int(rng.integers(height))
    r = int(rng.integers(10, 60))
    draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
  noise = rng.normal(0, 6, (height, width, 3))
  pixels = np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, "JPEG", quality=95)
  return out.getvalue()


def _cc3m_like(root: Path, n: int) -> Path:
  rng = np.random.default_rng(0)
  src = root / "shards"
  src.mkdir()
  words = "a photo of the man woman dog cat on in with street beach city red blue old new".split()
  with tarfile.open(src / "00000.tar", "w") as tar:
    for i in range(n):
      w, h = (int(256 * rng.uniform(1.0, 1.6)), 256) if i % 3 else (256, int(256 * rng.uniform(1.0, 1.5)))
      key = f"{i:09d}"
      caption = " ".join(rng.choice(words, int(rng.integers(6, 20)))).encode()
      meta = json.dumps({"key": key, "caption": caption.decode(), "url": f"http://x/{i}", "status": "success"}).encode()
      for ext, data in (("jpg", _photo_like(rng, w, h)), ("txt", caption), ("json", meta)):
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  return src


def _tokenizer(root: Path, path: str | None):
  from bridgejax.weights import load_tokenizer
  if path:
    return load_tokenizer(path)
  from tokenizers import Tokenizer, models, pre_tokenizers
  words = "a photo of the man woman dog cat on in with street beach city red blue old new".split()
  from bridgejax.toy import world
  words += sorted({w for e in world.examples("val", 50, image=False, num_questions=0, dialog_rounds=0)
                   for c in e["captions"] for w in c.split()})
  vocab = {w: i for i, w in enumerate(dict.fromkeys(["<pad>", "<eos>", "<bos>", "<unk>"] + words))}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  (root / "tok").mkdir()
  tok.save(str(root / "tok" / "tokenizer.json"))
  (root / "tok" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}))
  return load_tokenizer(str(root / "tok"))


def measure(data_dir, tokenizer, *, image_size: int, batch_size: int, workers: int, steps: int) -> float:
  from bridgejax.data import pipeline
  loader = pipeline.train_dataset(data_dir, "train", tokenizer, batch_size=batch_size, seed=0,
                                  image_size=image_size, shard_index=0, shard_count=1, worker_count=workers)
  it = iter(loader)
  try:
    for _ in range(2 + 2 * workers):  # start-up: worker processes spawn and fill their buffers
      next(it)
    start = time.perf_counter()
    for _ in range(steps):
      next(it)
    return steps * batch_size / (time.perf_counter() - start)
  finally:
    it.close()


def per_image_ms(data_dir, tokenizer, image_size: int, n: int = 200) -> dict[str, float]:
  """Single-thread cost of each stage for one image: what one worker core spends per image."""
  from bridgejax.data import records
  from bridgejax.data.image import clip_preprocess, decode_image
  split = records.open_split(data_dir, "train")
  recs = [split[i] for i in range(min(n, len(split)))]
  t0 = time.perf_counter()
  recs = [split[i] for i in range(len(recs))]
  t1 = time.perf_counter()
  images = [decode_image(r["image"]) for r in recs]
  t2 = time.perf_counter()
  for im in images:
    clip_preprocess(im, image_size)
  t3 = time.perf_counter()
  for r in recs:
    tokenizer.batch_encode([r["captions"][0]], 24, append_ret=True)
  t4 = time.perf_counter()
  k = 1000 / len(recs)
  return {"read_record": (t1 - t0) * k, "decode": (t2 - t1) * k, "clip_preprocess": (t3 - t2) * k,
          "tokenize": (t4 - t3) * k, "total": (t4 - t0) * k}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--images", type=int, default=512)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--steps", type=int, default=12)
  p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--tokenizer", default=None, help="a HF tokenizer dir (default: a word-level one made here)")
  p.add_argument("--json", default=None, help="also write the results here")
  a = p.parse_args()
  from bridgejax.data import prepare
  from bridgejax.toy.prepare import prepare_toy

  results = {"cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
             "load_average_at_start": os.getloadavg(), "batch_size": a.batch_size, "runs": []}
  with tempfile.TemporaryDirectory() as tmp:
    root = Path(tmp)
    tok = _tokenizer(root, a.tokenizer)
    src = _cc3m_like(root, a.images)
    t = time.perf_counter()
    prepare.prepare_cc3m(src, root / "cc3m", workers=0)
    results["prepare_cc3m_images_per_s_1_process"] = a.images / (time.perf_counter() - t)
    t = time.perf_counter()
    prepare_toy(root / "toy", num_train=a.images, num_val=0, num_test=0)
    results["prepare_toy_images_per_s_1_process"] = a.images / (time.perf_counter() - t)
    for name, data_dir, size in (("cc3m-like 256px JPEG -> 224", root / "cc3m", 224),
                                 ("toy 112px PNG -> 112", root / "toy", 112)):
      stages = per_image_ms(data_dir, tok, size)
      results.setdefault("per_image_ms_one_thread", {})[name] = {k: round(v, 3) for k, v in stages.items()}
      print(f"{name:30s} one thread: " + ", ".join(f"{k} {v:.2f} ms" for k, v in stages.items()), flush=True)
      for w in a.workers:
        rate = measure(data_dir, tok, image_size=size, batch_size=a.batch_size, workers=w, steps=a.steps)
        results["runs"].append({"data": name, "workers": w, "images_per_s": round(rate, 1)})
        print(f"{name:30s} workers={w}: {rate:7.1f} images/s", flush=True)
  results["load_average_at_end"] = os.getloadavg()
  print(f"prepare (1 process): cc3m-like {results['prepare_cc3m_images_per_s_1_process']:.0f} images/s, "
        f"toy {results['prepare_toy_images_per_s_1_process']:.0f} images/s")
  if a.json:
    Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
