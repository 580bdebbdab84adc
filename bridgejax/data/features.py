"""Cached frozen features: the vision tower run once over a prepared split, so training reads its
hidden states instead of decoding JPEGs and running the tower at every step.

    python -m bridgejax.features --config configs/crossatt_k12.py --data data/cc3m [--split train]
                                 [--out DIR] [--batch_size 64] [--config.key=value ...]
    python train.py --config configs/crossatt_k12.py --config.data.features=auto ...

Only what the config reads is written (model_reads): the hidden states its bridge reads, the CLS
alone where that is all it reads (found by running the bridge on NaN-poisoned features), plus
layer L's tokens for the CMLI heads; the tower's features as every bridge sees them
(VisionFeatures.from_tower: SigLIP's CLS stand-in included), in bfloat16. The post-LayerNorm is
not applied: its γ, β come from the loaded tower at training time, as they do for images.

The folder (by default DATA/features/SPLIT, what data.features="auto" reads):

    manifest.json                 tower identity (its path and a hash of its weights as bfloat16),
                                  the hidden states held (`reads`: tokens and shape each), image
                                  size and resize, dtype, split, record count and fingerprint (a
                                  hash of the split's records: which images), seconds, bytes
    SPLIT-00000-of-00001.array_record   record i = record i of the split: {id, hidden_<i>: bytes}

Training checks before step 1 that the manifest covers what the config reads from this tower, at
this image size and resize, for this split as it is now (its fingerprint: a split prepared again
with other images of the same count is another split), that the shard is whole (check_cache), and refuses a stale cache with one line
naming what differs and the command that rebuilds it. The step then rebuilds VisionFeatures from
the batch (vision_features): hidden states it does not read are NaN, so a wrong `reads` cannot pass
silently, and XLA drops them unread.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import ml_dtypes
import numpy as np
from absl import flags
from array_record.python.array_record_module import ArrayRecordWriter
from ml_collections import config_flags
from tqdm import tqdm

from bridgejax.data.pipeline import eval_dataset
from bridgejax.data.records import RecordError, decode, encode, load_info, split_fingerprint
from bridgejax.errors import UserError

FORMAT, VERSION = "bridgejax-features", 1
MANIFEST_FILE = "manifest.json"
KEY_PREFIX = "hidden_"  # record fields and batch keys: hidden_<i>, i the index into hidden_states
DTYPE = ml_dtypes.bfloat16
_WRITER_OPTIONS = "group_size:1,uncompressed"  # bfloat16 activations barely compress; reads stay cheap


def key(hidden_state: int) -> str:
  return f"{KEY_PREFIX}{hidden_state}"


def hidden_state_of(name: str) -> int:
  """hidden_<i> -> i."""
  return int(name[len(KEY_PREFIX):])


def cache_dir(config) -> str:
  """Where config.data.features points: "" (off), "auto" (DATA/features/TRAIN_SPLIT), or a path."""
  features = config.data.features
  if features == "auto":
    return os.path.join(config.data.dir, "features", config.data.train_split)
  return features


def bridge_reads(bridge, vision_config) -> dict[str, str]:
  """What `bridge` reads of the tower's features: {hidden_<i>: "cls" | "all"}, i in 0..num_layers.

  Found, not declared, so every bridge is covered whichever of its fields picks the layers: the
  freshly initialised bridge runs on one random image's features at the tower's real shapes, with
  a hidden state all NaN (is it read?), then with all its tokens but the CLS NaN (only the CLS?).
  """
  import jax  # lazy: jax; the checks import this module before jax loads
  import jax.numpy as jnp  # lazy: jax; the checks import this module before jax loads
  from bridgejax.bridges import VisionFeatures  # lazy: jax; the checks import this module before jax loads
  c = vision_config
  rng = np.random.default_rng(0)
  hidden = [rng.standard_normal((1, 1 + c.grid_size**2, c.hidden_size)).astype(np.float32)
            for _ in range(c.num_layers + 1)]  # (1, N, W) each
  features = lambda hs: VisionFeatures(tuple(hs), jnp.ones((c.hidden_size,)), jnp.zeros((c.hidden_size,)))
  params = jax.jit(lambda: bridge.init(jax.random.key(0), features(hidden)))()["params"]
  apply = jax.jit(lambda hs: bridge.apply({"params": params}, features(hs)))
  finite = lambda hs: all(bool(np.isfinite(np.asarray(x, np.float32)).all()) for x in jax.tree.leaves(apply(hs)))
  if not finite(hidden):
    raise ValueError(f"bridge {type(bridge).__name__} gives non-finite outputs on finite features")
  out = {}
  for i, x in enumerate(hidden):
    if finite(hidden[:i] + [np.full_like(x, np.nan)] + hidden[i + 1:]):
      continue
    cls_only = np.concatenate([x[:, :1], np.full_like(x[:, 1:], np.nan)], axis=1)
    out[key(i)] = "cls" if finite(hidden[:i] + [cls_only] + hidden[i + 1:]) else "all"
  return out


def model_reads(model) -> dict[str, str]:
  """What the training step reads of the tower: the bridge's (bridge_reads), and what the loss terms
  read of layer L: its tokens (CMLI, Target-CMLI) or its CLS (Pic2Word's mapping network)."""
  num_layers = model.vision.config.num_layers
  out = bridge_reads(model.bridge, model.vision.config)
  reads = {read for active in model.terms for read in active.term.reads}  # the loss terms' (bridgejax/terms/)
  if "tower:cls" in reads:
    out.setdefault(key(num_layers), "cls")
  if "tower:all" in reads:
    out[key(num_layers)] = "all"
  return dict(sorted(out.items(), key=lambda item: hidden_state_of(item[0])))


def _host(x) -> np.ndarray:
  if not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # lazy: jax; the checks import this module before jax loads
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def tower_hash(vision_params) -> str:
  """A hash of the tower's weights as bfloat16 (the cache's precision), so a tower loaded in
  float32 or bfloat16 is the same tower, and any other weights are not."""
  import jax  # lazy: jax; the checks import this module before jax loads
  digest = hashlib.blake2b(digest_size=12)
  for path, leaf in jax.tree_util.tree_leaves_with_path(vision_params):
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(_host(leaf.astype(DTYPE)).tobytes())
  return digest.hexdigest()


def identity(config, model, frozen) -> dict:
  """What a cache must agree on with a run: the tower, the hidden states it reads, the image transform."""
  return {"vision": {"path": str(config.vision.path), "weights_hash": tower_hash(frozen["vision"])},
          "reads": model_reads(model), "image_size": model.vision.config.image_size,
          "image_resize": config.data.image_resize,
          "num_hidden_states": model.vision.config.num_layers + 1}


def load_manifest(path: str | os.PathLike) -> dict:
  file = Path(path) / MANIFEST_FILE
  if not file.exists():
    raise RecordError(f"{path} holds no cached features (no {MANIFEST_FILE})")
  manifest = json.loads(file.read_text())
  if manifest.get("format") != FORMAT or manifest.get("version", 0) > VERSION:
    raise RecordError(f"{file} is not a {FORMAT} v<={VERSION} manifest")
  return manifest


def config_file_arg() -> str:
  """The --config this process was started with (absl), else a placeholder for messages."""
  if "config" in flags.FLAGS and flags.FLAGS.is_parsed():
    return config_flags.get_config_filename(flags.FLAGS["config"])
  return "CONFIG"


def rebuild_command(config, path: str) -> str:
  return (f"python -m bridgejax.features --config {config_file_arg()} --data {config.data.dir} "
          f"--split {config.data.train_split} --out {path} (with this run's --config.* overrides)")


def check_present(config) -> None:
  """Before any weight loads: data.features, when set, is a cache of data.train_split's records."""
  path = cache_dir(config)
  if not path:
    return
  rebuild = f"build it with: {rebuild_command(config, path)}"
  try:
    manifest = load_manifest(path)
  except RecordError as e:
    raise UserError(f"--config.data.features={config.data.features!r}: {e}; {rebuild}") from None
  split = load_info(config.data.dir)["splits"].get(config.data.train_split, {})
  cached = manifest["dataset"]
  if (cached["split"], cached["num_records"]) != (config.data.train_split, split.get("num_examples")):
    raise UserError(f"--config.data.features={config.data.features!r} caches split {cached['split']!r} "
                    f"({cached['num_records']} records), not {config.data.train_split!r} of {config.data.dir} "
                    f"({split.get('num_examples')} records); {rebuild}")
  if cached.get("fingerprint") != split_fingerprint(config.data.dir, config.data.train_split):
    why = ("was built before caches recorded which images they hold" if not cached.get("fingerprint") else
           f"was built from other images: split {config.data.train_split!r} of {config.data.dir} was prepared "
           "again since")
    raise UserError(f"--config.data.features={config.data.features!r} {why}; {rebuild}")
  missing = [f for f in manifest["files"] if not os.path.exists(os.path.join(path, f))]
  size = sum(os.path.getsize(os.path.join(path, f)) for f in manifest["files"] if f not in missing)
  if missing or size != manifest["bytes"]:  # a copy cut short, a full disk: not silently shorter records
    state = f"lacks {', '.join(missing)}" if missing else f"holds {size} bytes of shards, not the {manifest['bytes']} written"
    raise UserError(f"--config.data.features={config.data.features!r} {state} (truncated or damaged); {rebuild}")


def differences(manifest: dict, wanted: dict) -> list[str]:
  """What a cache's manifest lacks for a run's identity(): one phrase per difference."""
  out = []
  have, want = manifest["vision"], wanted["vision"]
  if have["weights_hash"] != want["weights_hash"]:
    out.append(f"vision tower: cached from {have['path']} (weights {have['weights_hash']}), the run loads "
               f"{want['path']} (weights {want['weights_hash']})")
  held = manifest["reads"]
  missing = {k: t for k, t in wanted["reads"].items() if k not in held or held[k]["tokens"] not in ("all", t)}
  if missing:
    count = wanted["num_hidden_states"]
    out.append(f"hidden states: cached {_layers(held, count)}, the run reads {_layers(wanted['reads'], count)}")
  for field in ("image_size", "image_resize"):
    if manifest[field] != wanted[field]:
      out.append(f"{field}: cached {manifest[field]!r}, the run uses {wanted[field]!r}")
  return out


def _layers(held: dict, count: int) -> str:
  """{hidden_1: all} -> 'layer -2 (all tokens)', as configs name layers."""
  tokens = lambda t: t if isinstance(t, str) else t["tokens"]
  return ", ".join(f"layer {hidden_state_of(k) - count} ({'CLS' if tokens(t) == 'cls' else 'all tokens'})"
                   for k, t in held.items())


def check_cache(config, setup) -> "FeatureCache":
  """The run's cache, opened for what it reads, once its manifest matches the run (else UserError)."""
  path = cache_dir(config)
  check_present(config)
  manifest = load_manifest(path)
  wanted = identity(config, setup.model, setup.frozen)
  found = differences(manifest, wanted)
  if found:
    raise UserError(f"--config.data.features={config.data.features!r} is stale for this run: {'; '.join(found)}. "
                    f"Rebuild it with: {rebuild_command(config, path)}")
  return FeatureCache(path, tuple(wanted["reads"]))


class FeatureCache:
  """Random access to a features folder: cache[i] -> {id, hidden_<i>: (tokens, width) bfloat16} for
  the hidden states `keys` (all it holds by default). Picklable and opened lazily, like Split, so
  grain's workers get a copy."""

  def __init__(self, path: str | os.PathLike, keys: tuple[str, ...] | None = None):
    self.path, self.manifest = Path(path), load_manifest(path)
    self.keys = tuple(keys or self.manifest["reads"])
    self._source = None

  def __len__(self) -> int:
    return self.manifest["dataset"]["num_records"]

  def __getitem__(self, index: int) -> dict:
    if self._source is None:
      import grain  # lazy: grain, ~1 s even after jax; only a cache being read needs it
      self._source = grain.sources.ArrayRecordDataSource([str(self.path / f) for f in self.manifest["files"]])
    record = decode(self._source[int(index)])
    shapes = self.manifest["reads"]
    return {"id": record["id"], **{k: np.frombuffer(record[k], DTYPE).reshape(shapes[k]["shape"]) for k in self.keys}}

  def __getstate__(self):
    return {**self.__dict__, "_source": None}


def vision_features(model, frozen, batch):
  """The batch's cached hidden_<i> (B, 1 or N, W) -> the VisionFeatures the tower would give: its
  num_layers + 1 hidden states (B, N, W) in its compute dtype, what the cache does not hold NaN
  (never read: XLA drops it, and a wrong `reads` shows as a NaN loss, not a quietly different one)."""
  import jax.numpy as jnp  # lazy: jax; the checks import this module before jax loads
  from bridgejax.bridges import VisionFeatures  # lazy: jax; the checks import this module before jax loads
  c = model.vision.config
  tokens, width, dtype = 1 + c.grid_size**2, c.hidden_size, model.vision.dtype
  size = batch["text_ids"].shape[0]

  def hidden_state(i):
    cached = batch.get(key(i))
    held = 0 if cached is None else cached.shape[1]
    fill = jnp.full((size, tokens - held, width), jnp.nan, dtype)
    return fill if cached is None else jnp.concatenate([cached.astype(dtype), fill], axis=1)

  post_norm = frozen["vision"]["post_norm"]
  return VisionFeatures(tuple(hidden_state(i) for i in range(c.num_layers + 1)), post_norm["scale"],
                        post_norm["bias"], c.layer_norm_eps)


def is_cached(batch) -> bool:
  return any(k.startswith(KEY_PREFIX) for k in batch)


# --- writing --------------------------------------------------------------------------------------

def check_out(out: str) -> None:
  """`out` is new, empty or a features cache: write_cache replaces it whole."""
  if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, MANIFEST_FILE)):
    raise UserError(f"--out {out} holds files but no features cache ({MANIFEST_FILE}): it is not replaced; "
                    "choose a new or empty folder")


def write_cache(config, setup, data_dir: str, split: str, out: str, *, batch_size: int = 64,
                quiet: bool = False) -> dict:
  """Runs the tower over every record of `split` in order and writes the folder `out` (replaced
  whole: shards and manifest go to a temporary folder renamed into place). Returns the manifest."""
  import jax  # lazy: jax; the checks import this module before jax loads
  from bridgejax import mesh as mesh_lib  # lazy: jax; the checks import this module before jax loads
  model, mesh = setup.model, setup.mesh
  wanted = identity(config, model, setup.frozen)
  batch_size = -(-batch_size // mesh.shape["data"]) * mesh.shape["data"]
  loader = eval_dataset(data_dir, split, batch_size=batch_size, image_size=model.vision.config.image_size,
                        shard_index=0, shard_count=1, worker_count=config.data.num_workers,
                        image_resize=wanted["image_resize"])

  @jax.jit
  def extract(vision, images):  # (B, 3, S, S) -> {hidden_<i>: (B, tokens, W) bfloat16}
    hidden = model.vision_features({"vision": vision}, images).hidden_states
    held = {k: hidden[hidden_state_of(k)] for k in wanted["reads"]}
    return {k: (x[:, :1] if wanted["reads"][k] == "cls" else x).astype(DTYPE) for k, x in held.items()}

  check_out(out)
  out_dir = Path(out)
  tmp = out_dir.with_name(f".{out_dir.name}.partial")
  tmp.mkdir(parents=True, exist_ok=True)
  file = f"{split}-00000-of-00001.array_record"
  writer = ArrayRecordWriter(str(tmp / file), _WRITER_OPTIONS)
  start, count, shapes = time.time(), 0, {}
  progress = tqdm(total=len(loader), desc=f"features {split}", unit="batch", disable=quiet, dynamic_ncols=True)
  try:
    for batch in loader:
      images = jax.device_put(batch["image"], mesh_lib.batch_sharding(mesh))
      with jax.set_mesh(mesh):
        hidden = jax.device_get(extract(setup.frozen["vision"], images))
      for row in np.flatnonzero(batch["valid"]):
        writer.write(encode({"id": str(batch["id"][row]), "index": int(batch["index"][row]),
                             **{k: v[row].tobytes() for k, v in hidden.items()}}))
        count += 1
      shapes = {k: list(v.shape[1:]) for k, v in hidden.items()}
      progress.update(1)
  finally:
    progress.close()
    writer.close()
  manifest = {"format": FORMAT, "version": VERSION, **wanted,
              "reads": {k: {"tokens": t, "shape": shapes[k]} for k, t in wanted["reads"].items()},
              "dtype": "bfloat16",
              "compute_dtype": str(config.compute_dtype),
              "dataset": {"dir": str(data_dir), "split": split, "num_records": count,
                          "fingerprint": split_fingerprint(data_dir, split)},
              "files": [file], "bytes": (tmp / file).stat().st_size, "seconds": round(time.time() - start, 2)}
  (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
  shutil.rmtree(out_dir, ignore_errors=True)  # a cache this replaces (checked above)
  os.replace(tmp, out_dir)
  return manifest


def summary(manifest: dict, out: str) -> str:
  n, seconds, size = manifest["dataset"]["num_records"], manifest["seconds"], manifest["bytes"]
  return (f"cached features of {n} images in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} images/s), "
          f"{size / 1e6:.1f} MB ({size / max(n, 1) / 1e3:.1f} kB/image) in {out}")
