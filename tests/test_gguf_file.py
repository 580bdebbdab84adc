"""bridgejax's GGUF reader (weights/gguf_file.py) reads what `gguf.GGUFReader` reads, field by field
and tensor by tensor, and a damaged file is one CheckpointError line."""

import gguf
import numpy as np
import pytest

from bridgejax.weights import load_language_model
from bridgejax.weights.errors import CheckpointError
from bridgejax.weights.gguf_file import GGUFFile


def _write(path, alignment=None):
  rng = np.random.default_rng(0)
  writer = gguf.GGUFWriter(str(path), "gemma")
  if alignment:
    writer.add_custom_alignment(alignment)
  writer.add_uint8("t.u8", 200)
  writer.add_int8("t.i8", -5)
  writer.add_uint16("t.u16", 60000)
  writer.add_int16("t.i16", -300)
  writer.add_uint32("t.u32", 4_000_000_000)
  writer.add_int32("t.i32", -7)
  writer.add_float32("t.f32", 0.25)
  writer.add_uint64("t.u64", 2**40)
  writer.add_int64("t.i64", -(2**40))
  writer.add_float64("t.f64", 1e-300)
  writer.add_bool("t.bool", True)
  writer.add_string("t.str", "ünïcödé ✓")
  writer.add_array("t.strings", ["a", "", "▁▁", "<0x0A>"])
  writer.add_array("t.ints", [3, -1, 2])
  writer.add_array("t.floats", [0.5, -2.0])
  writer.add_array("t.bools", [True, False])
  writer.add_array("t.nested", [[1, 2], [3]])
  writer.add_tensor("f32", rng.normal(size=(3, 5)).astype(np.float32))
  writer.add_tensor("f16", rng.normal(size=(2, 7)).astype(np.float16))
  writer.add_tensor("i32", np.arange(6, dtype=np.int32).reshape(2, 3))
  q8 = gguf.quants.quantize(rng.normal(size=(4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
  writer.add_tensor("q8", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # q8: (4, 2 blocks x 34 bytes)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return str(path)


@pytest.mark.parametrize("alignment", [None, 64])
def test_reads_what_gguf_reads(tmp_path, alignment):
  path = _write(tmp_path / "all.gguf", alignment)
  ours, reference = GGUFFile(path), gguf.GGUFReader(path)
  expected = {k: f.contents() for k, f in reference.fields.items() if not k.startswith("GGUF.")}
  # GGUFReader flattens an array of arrays (its contents() FIXME); the file holds them nested.
  assert expected.pop("t.nested") == [1, 2, 3] and ours.fields.pop("t.nested") == [[1, 2], [3]]
  assert ours.fields == expected
  assert ours.fields["t.strings"] == ["a", "", "▁▁", "<0x0A>"] and ours.fields["t.bool"] is True
  assert [t.name for t in ours.tensors] == [t.name for t in reference.tensors] == ["f32", "f16", "i32", "q8"]
  for a, b in zip(ours.tensors, reference.tensors):
    assert (a.tensor_type, a.shape) == (b.tensor_type, tuple(int(n) for n in b.shape))
    assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
    np.testing.assert_array_equal(a.data, b.data)
  np.testing.assert_array_equal(
      gguf.quants.dequantize(ours.tensors[3].data, ours.tensors[3].tensor_type),
      gguf.quants.dequantize(reference.tensors[3].data, reference.tensors[3].tensor_type))


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"GGML" + b[4:], "no GGUF magic"),
    (lambda b: b[:4] + (9).to_bytes(4, "little") + b[8:], "version 9"),
    (lambda b: b[:60], "not a readable GGUF file"),
    (lambda b: b[:-100], "runs past the end of the file"),
])
def test_a_damaged_file_is_one_line(tmp_path, damage, message):
  path = _write(tmp_path / "all.gguf")
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(damage(data))
  with pytest.raises(CheckpointError, match=message) as error:
    load_language_model(path)
  assert "\n" not in str(error.value)
