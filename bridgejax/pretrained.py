"""Reading a bridge that `python -m bridgejax.export` wrote, for `Pipeline.from_pretrained`: the
folder (local, or a Hub repo's snapshot), its manifest, the backbone folders it names, and its
trainable parameters checked against the model. Each problem is one UserError line.

    folder = pretrained_folder("bridge/", None, False, None)   # a folder as is; "org/name": its Hub snapshot
    manifest = read_manifest(folder)                            # {"step", "backbones": {vision, llm}, ...}
"""

from __future__ import annotations

import os

import jax
import numpy as np
from huggingface_hub import errors as hub_errors, snapshot_download

from bridgejax import export, mesh as mesh_lib, paths as paths_lib
from bridgejax.errors import UserError
from bridgejax.train.checkpoint import CheckpointMismatchError, param_differences
from bridgejax.weights.safetensors_io import read_safetensors_file


def pretrained_folder(path_or_id: str, revision, local_files_only: bool, cache_dir) -> str:
  """A local export folder, or the Hub repo `path_or_id`'s snapshot (downloaded or from the cache)."""
  if os.path.isdir(path_or_id):
    return str(path_or_id)
  if "/" not in str(path_or_id) or str(path_or_id).count("/") > 1 or os.path.exists(path_or_id):
    raise UserError(f"{path_or_id!r} is neither a folder nor a Hub repo id (org/name); pass the folder "
                    "python -m bridgejax.export wrote, or its Hub id")
  try:
    return snapshot_download(str(path_or_id), revision=revision, local_files_only=local_files_only,
                             cache_dir=cache_dir)
  except (hub_errors.LocalEntryNotFoundError, hub_errors.RepositoryNotFoundError,
          hub_errors.RevisionNotFoundError) as e:
    where = "in the local Hugging Face cache" if local_files_only else "on the Hub"
    raise UserError(f"cannot fetch {path_or_id!r} {where} ({type(e).__name__}); check the repo id, "
                    "or download it once without local_files_only") from e


def read_manifest(folder: str) -> dict:
  path = os.path.join(folder, export.MANIFEST_FILE)
  if not (os.path.isfile(path) and os.path.isfile(os.path.join(folder, export.PARAMS_FILE))):
    raise UserError(f"{folder} is not an exported bridge (no {export.MANIFEST_FILE} / {export.PARAMS_FILE}); "
                    "python -m bridgejax.export --workdir RUN --out DIR writes one")
  return paths_lib.read_json(path)


def check_backbone(part: str, path: str, recorded: dict) -> None:
  """The backbone folder exists, or one line naming what the bridge expects and how to pass it."""
  if not os.path.exists(path):
    hub = f", hub id {recorded['hub_id']}" if recorded.get("hub_id") else ""
    raise UserError(f"the {part} backbone folder {path!r} does not exist; the bridge was trained on "
                    f"{recorded.get('arch') or recorded.get('path')}{hub}: pass {part}=FOLDER to from_pretrained")


def read_trainable(setup, path: str) -> dict:
  """The exported {bridge, ret} params, checked against the model's shapes, replicated on setup.mesh."""
  trainable = export.unflatten(read_safetensors_file(path))
  expected = jax.eval_shape(lambda: setup.model.init_trainable(jax.random.key(0), setup.frozen))
  differences = param_differences(trainable, expected)
  if differences:
    raise CheckpointMismatchError(f"{path} does not fit this model (other backbones or config?): "
                                  + "; ".join(differences[:6]), differences)
  return jax.device_put(jax.tree.map(lambda x: np.asarray(x, np.float32), trainable),
                        mesh_lib.replicated(setup.mesh))
