"""bridgejax's converted format: an Orbax checkpoint of the frozen tree plus a small JSON header.

    DIR/bridgejax.json   {"format": 1, "kind": "clip_vision" | "gemma" | ..., "config": {...}}
    DIR/params/          Orbax (StandardCheckpointer) checkpoint of the parameter tree

The header is written last, so a directory without it is an unfinished conversion, never loaded.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from bridgejax.weights.errors import CheckpointError, MissingCheckpointError

HEADER = "bridgejax.json"
FORMAT_VERSION = 1


def is_converted(path: str) -> bool:
  return os.path.isfile(os.path.join(path, HEADER))


def save(out_dir: str, kind: str, config: dict, params) -> None:
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise FileExistsError(f"output directory {out_dir!r} is not empty; choose a new --out")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(out_dir, "params"), jax.tree.map(np.asarray, params))
  checkpointer.wait_until_finished()
  tmp = os.path.join(out_dir, HEADER + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"format": FORMAT_VERSION, "kind": kind, "config": config}, f, indent=2)
  os.replace(tmp, os.path.join(out_dir, HEADER))


def load(path: str, expected_kind: str) -> tuple[dict, dict]:
  """(config dict, params) of a converted directory of the expected kind."""
  path = os.path.abspath(path)
  if not is_converted(path):
    raise MissingCheckpointError(f"{path!r} is not a bridgejax converted directory (no {HEADER})")
  with open(os.path.join(path, HEADER)) as f:
    header = json.load(f)
  if header.get("format") != FORMAT_VERSION:
    raise CheckpointError(f"{path!r} has format {header.get('format')}; this bridgejax reads "
                          f"format {FORMAT_VERSION}: convert it again")
  if header.get("kind") != expected_kind:
    raise CheckpointError(f"{path!r} holds a {header.get('kind')!r} model, not a {expected_kind!r} one")
  params = ocp.StandardCheckpointer().restore(os.path.join(path, "params"))
  params = jax.tree.map(np.asarray, params)
  return header["config"], params
