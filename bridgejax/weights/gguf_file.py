"""A GGUF file's metadata and tensor table, read in one pass with `struct` and numpy.

`gguf.GGUFReader` builds a numpy view for every part of every metadata item: on Gemma 3's
262,144-token vocabulary that is about 3 million views and 30 s of a 2-core CPU before a single
weight is read. This reader decodes the same layout (GGUF versions 2 and 3, little-endian; the
format is specified in ggml's docs/gguf.md) into plain Python values in well under a second, and
leaves each tensor as a memory-mapped view for `gguf.quants.dequantize`, which `LazyTensor` calls
only when the weight is assembled.
"""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import quant_shape_to_byte_shape

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types -> (struct format, numpy dtype) of the fixed-size ones.
_SCALARS = {0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
            4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
            10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64)}
_STRING, _ARRAY = 8, 9
# Tensor types stored as plain numpy arrays; every other type is blocks of bytes to dequantise.
_PLAIN = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
          GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
          GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
          GGMLQuantizationType.I64: np.int64}


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
  name: str
  tensor_type: GGMLQuantizationType
  shape: tuple[int, ...]  # GGUF's order: innermost dimension first
  data: np.ndarray  # a view of the file: values, or (rows, bytes) blocks for quantised types


class GGUFFile:
  """`fields`: metadata key -> Python value (str, int, float, bool, or a list of them);
  `tensors`: the tensor table in file order. Raises ValueError on a damaged or unsupported file."""

  def __init__(self, path: str):
    self._map = np.memmap(path, dtype=np.uint8, mode="r")
    buffer = memoryview(self._map)
    self._buffer, self._offset = buffer, 0
    if bytes(buffer[:4]) != MAGIC:
      raise ValueError("no GGUF magic at the start of the file")
    self._offset = 4
    version = self._unpack("<I")
    if version not in VERSIONS:
      kind = "a big-endian file" if version & 0xFFFF == 0 else f"version {version}"
      raise ValueError(f"{kind}; bridgejax reads little-endian GGUF versions {VERSIONS}")
    tensor_count, field_count = self._unpack("<Q"), self._unpack("<Q")
    self.fields: dict[str, object] = {}
    for _ in range(field_count):
      key = self._string()
      self.fields[key] = self._value(self._unpack("<I"))
    table = [self._tensor_info() for _ in range(tensor_count)]
    alignment = self.fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
      raise ValueError(f"general.alignment {alignment!r} is not a power of two")
    start = -(-self._offset // alignment) * alignment
    self.tensors = [self._tensor(start, *info) for info in table]
    if len({t.name for t in self.tensors}) != len(self.tensors):
      raise ValueError("two tensors share a name")

  def _unpack(self, fmt: str):
    (value,) = struct.unpack_from(fmt, self._buffer, self._offset)
    self._offset += struct.calcsize(fmt)
    return value

  def _string(self) -> str:
    length = self._unpack("<Q")
    start, self._offset = self._offset, self._offset + length
    if self._offset > len(self._buffer):
      raise ValueError("a string runs past the end of the file")
    return str(self._buffer[start:self._offset], "utf-8")

  def _value(self, kind: int):
    if kind == _STRING:
      return self._string()
    if kind in _SCALARS:
      return self._unpack(_SCALARS[kind][0])
    if kind != _ARRAY:
      raise ValueError(f"unknown metadata value type {kind}")
    item_kind, count = self._unpack("<I"), self._unpack("<Q")
    if item_kind in _SCALARS:  # one numpy read for the whole array (token scores and types)
      dtype = np.dtype(_SCALARS[item_kind][1]).newbyteorder("<")
      values = np.frombuffer(self._buffer, dtype, count, self._offset)
      self._offset += values.nbytes
      return values.tolist()
    return [self._value(item_kind) for _ in range(count)]

  def _tensor_info(self):
    name = self._string()
    dims = tuple(self._unpack("<Q") for _ in range(self._unpack("<I")))
    return name, dims, GGMLQuantizationType(self._unpack("<I")), self._unpack("<Q")

  def _tensor(self, start: int, name, dims, tensor_type, offset) -> GGUFTensor:
    shape = tuple(reversed(dims))  # numpy's order
    elements = int(np.prod(dims))
    if tensor_type in _PLAIN:
      dtype, count = np.dtype(_PLAIN[tensor_type]), elements
    else:
      block, block_bytes = GGML_QUANT_SIZES[tensor_type]
      dtype, count = np.dtype(np.uint8), elements // block * block_bytes
      shape = quant_shape_to_byte_shape(shape, tensor_type)
    if start + offset + count * dtype.itemsize > len(self._map):
      raise ValueError(f"tensor {name!r} runs past the end of the file")
    data = np.frombuffer(self._buffer, dtype, count, start + offset).reshape(shape)
    return GGUFTensor(name, tensor_type, dims, data)
