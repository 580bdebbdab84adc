"""Reading Hugging Face checkpoint directories with numpy only (no torch at run time).

safetensors' own numpy reader rejects bfloat16, the dtype of most LLM checkpoints, so the
(simple) format is parsed here: 8-byte header length, JSON header, raw little-endian data. Tensors
are memory-mapped, so a 5 GB checkpoint costs no memory until a tensor is used.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from bridgejax.weights.errors import CheckpointError, MissingCheckpointError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_safetensors_file(path: str) -> dict[str, np.ndarray]:
  """All tensors of one .safetensors file, memory-mapped, keyed by name."""
  try:
    with open(path, "rb") as f:
      (header_len,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(header_len))
  except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path} is not a readable safetensors file ({e}); re-download it.") from e
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
  tensors = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _DTYPES:
      raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    if end > data.size:
      raise CheckpointError(f"{path} is truncated (tensor {name!r} ends past the file); re-download it.")
    tensors[name] = data[start:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
  return tensors


def read_hf_config(path: str) -> dict:
  """config.json of a Hugging Face model directory."""
  if not os.path.isdir(path):
    raise MissingCheckpointError(f"checkpoint directory {path!r} does not exist")
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise MissingCheckpointError(
        f"{path!r} has no config.json: expected a Hugging Face model directory "
        "(config.json + *.safetensors, as written by save_pretrained) or a bridgejax converted directory")
  with open(config_path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{config_path} is not valid JSON: {e}") from e


def read_hf_tensors(path: str) -> Mapping[str, np.ndarray]:
  """Every tensor of a HF directory: model.safetensors, or the shards its index lists."""
  index_path = os.path.join(path, INDEX_FILE)
  if os.path.isfile(index_path):
    with open(index_path) as f:
      weight_map = json.load(f)["weight_map"]
    shards = sorted(set(weight_map.values()))
  elif os.path.isfile(os.path.join(path, SINGLE_FILE)):
    shards = [SINGLE_FILE]
  else:
    found = sorted(os.listdir(path))
    hint = " (.bin/.pt files are PyTorch pickles: re-save with safe_serialization=True)" if any(
        f.endswith((".bin", ".pt", ".pth")) for f in found) else ""
    raise MissingCheckpointError(
        f"{path!r} has neither {SINGLE_FILE} nor {INDEX_FILE}; found {found}{hint}")
  tensors = {}
  for shard in shards:
    shard_path = os.path.join(path, shard)
    if not os.path.isfile(shard_path):
      raise MissingCheckpointError(f"shard {shard!r} listed in {INDEX_FILE} is missing from {path!r}")
    tensors.update(read_safetensors_file(shard_path))
  return tensors
