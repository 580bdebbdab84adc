"""`python -m bridgejax.prepare` on bad input: bad rows are skipped and listed (a line that is
not UTF-8 and a CSV quote left open included), a byte-order mark costs no row, an empty input
fails, a failed run leaves nothing half-made, --overwrite starts skipped.jsonl afresh for the
split, and image paths may not leave the base folder. All in-process, no worker processes."""

import io
import json
import os

import pytest
from PIL import Image

from bridgejax.data import prepare, records


def _jpeg(path, colour=(200, 30, 30)):
  out = io.BytesIO()
  Image.new("RGB", (16, 16), colour).save(out, "JPEG")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(out.getvalue())


def _jsonl(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return path


def _prepare(*args):
  return prepare.main(["jsonl", *map(str, args), "--workers", "0", "--quiet"])


def _skipped(out):
  return [json.loads(line) for line in (out / records.SKIPPED_FILE).read_text().splitlines()]


def test_bad_rows_are_skipped_counted_and_listed(tmp_path, capsys):
  _jpeg(tmp_path / "a.jpg")
  src = _jsonl(tmp_path / "d.jsonl", [
      {"image": "a.jpg", "caption": "good"},
      {"image": "a.jpg", "caption": 5},                   # a number: was a TypeError that stopped the run
      {"image": "a.jpg", "caption": {"text": "x"}},       # a dict: was stored as its key
      {"image": "a.jpg", "captions": ["fine", None]},     # a null in the list: was stored as "None"
      {"image": "a.jpg", "caption": None},
      {"image": ["a.jpg"], "caption": "list image"},
      {"image": "a.jpg", "caption": "x", "id": {"n": 1}},
      {"image": "a.jpg", "captions": ["two", " ok "], "id": 7},
  ])
  assert _prepare("--src", src, "--out", tmp_path / "out") == 0
  out = capsys.readouterr().out
  assert "2 written, 6 skipped of 8" in out and "6 bad_row" in out
  kept = [(r["id"], r["captions"]) for r in records.open_split(tmp_path / "out", "train")]
  assert kept == [("1", ["good"]), ("7", ["two", "ok"])]
  details = {s["source"]: s["detail"] for s in _skipped(tmp_path / "out")}
  assert all(s["reason"] == "bad_row" for s in _skipped(tmp_path / "out"))
  assert details == {
      "d.jsonl:2": "caption is a number, not a string or a list of strings",
      "d.jsonl:3": "caption is a JSON object, not a string or a list of strings",
      "d.jsonl:4": "captions[1] is null, not a string",
      "d.jsonl:5": "caption is null, not a string or a list of strings",
      "d.jsonl:6": "the image path is a list, not a path string",
      "d.jsonl:7": "id is a JSON object, not a string or an integer"}


def test_empty_or_all_skipped_input_fails_and_writes_nothing(tmp_path, capsys):
  empty = _jsonl(tmp_path / "empty.jsonl", [])
  assert _prepare("--src", empty, "--out", tmp_path / "out") == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "no examples" in err and len(err.strip().splitlines()) == 1
  bad = _jsonl(tmp_path / "bad.jsonl", [{"image": "missing.jpg", "caption": "x"}, "[1, 2]"])
  assert _prepare("--src", bad, "--out", tmp_path / "out") == 2
  err = capsys.readouterr().err
  assert "every example of split 'train' was skipped (1 missing, 1 bad_row)" in err, err
  assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "empty.jsonl"]  # no out/, no temporary folder


def test_failed_preparation_leaves_nothing_half_made(tmp_path, monkeypatch):
  _jpeg(tmp_path / "a.jpg")
  src = _jsonl(tmp_path / "d.jsonl", [{"image": "a.jpg", "caption": f"c{i}"} for i in range(3)]
               + [{"image": "gone.jpg", "caption": "x"}])
  real = prepare.write_examples

  def crash(writer, loader, examples, on_example):
    real(writer, loader, iter([next(iter(examples))]), on_example)  # one example and one skip are in
    writer.skip("missing", "gone.jpg")
    raise RuntimeError("disk on fire")

  monkeypatch.setattr(prepare, "write_examples", crash)
  with pytest.raises(RuntimeError):
    prepare.prepare_jsonl(src, tmp_path / "new")
  assert sorted(os.listdir(tmp_path)) == ["a.jpg", "d.jsonl"]

  # Adding a split to an existing dataset: the dataset and its skipped.jsonl stay as they were.
  monkeypatch.setattr(prepare, "write_examples", real)
  prepare.prepare_jsonl(src, tmp_path / "out")
  before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
  monkeypatch.setattr(prepare, "write_examples", crash)
  with pytest.raises(RuntimeError):
    prepare.prepare_jsonl(src, tmp_path / "out", split="val")
  assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
  assert len(records.open_split(tmp_path / "out", "train")) == 3


def test_overwrite_starts_the_splits_skip_list_afresh(tmp_path):
  _jpeg(tmp_path / "a.jpg")
  rows = [{"image": "a.jpg", "caption": "x"}, {"image": "b.jpg", "caption": "y"}]
  src = _jsonl(tmp_path / "d.jsonl", rows)
  prepare.prepare_jsonl(src, tmp_path / "out")
  prepare.prepare_jsonl(src, tmp_path / "out", split="val")  # another split keeps its lines
  assert [(s["split"], s["source"]) for s in _skipped(tmp_path / "out")] == [("train", str(tmp_path / "b.jpg")),
                                                                            ("val", str(tmp_path / "b.jpg"))]
  _jpeg(tmp_path / "b.jpg")
  _jsonl(src, rows + [{"image": "c.jpg", "caption": "z"}])
  summary = prepare.prepare_jsonl(src, tmp_path / "out", overwrite=True)
  assert summary["skipped"]["train"] == {"missing": 1}
  assert [(s["split"], s["source"]) for s in _skipped(tmp_path / "out")] == [("val", str(tmp_path / "b.jpg")),
                                                                            ("train", str(tmp_path / "c.jpg"))]
  assert records.load_info(tmp_path / "out")["skipped"]["train"] == {"missing": 1}


def test_image_paths_outside_the_base_folder_need_a_flag(tmp_path, capsys):
  _jpeg(tmp_path / "outside.jpg")
  _jpeg(tmp_path / "base" / "in.jpg")
  src = _jsonl(tmp_path / "base" / "d.jsonl", [
      {"image": "in.jpg", "caption": "inside"},
      {"image": "sub/../in.jpg", "caption": "inside too"},
      {"image": "../outside.jpg", "caption": "up"},
      {"image": str(tmp_path / "outside.jpg"), "caption": "absolute"},
      {"image": str(tmp_path / "base" / "in.jpg"), "caption": "absolute, inside"}])
  assert _prepare("--src", src, "--out", tmp_path / "out") == 0
  assert "3 written, 2 skipped of 5" in capsys.readouterr().out
  skipped = _skipped(tmp_path / "out")
  assert [s["reason"] for s in skipped] == ["outside_base", "outside_base"]
  assert "--allow-outside-base" in skipped[0]["detail"]
  assert _prepare("--src", src, "--out", tmp_path / "out2", "--allow-outside-base") == 0
  assert len(records.open_split(tmp_path / "out2", "train")) == 5


def test_cc3m_tsv_paths_stay_inside_the_image_folder(tmp_path):
  _jpeg(tmp_path / "images" / "a.jpg")
  _jpeg(tmp_path / "secret.jpg")
  (tmp_path / "cc.tsv").write_text("caption\timage\na red thing\ta.jpg\nsecret\t../secret.jpg\n")
  summary = prepare.prepare_cc3m(tmp_path / "cc.tsv", tmp_path / "out", images=tmp_path / "images")
  assert summary["skipped"]["train"] == {"outside_base": 1}


def test_missing_source_is_one_line_and_debug_adds_the_traceback(tmp_path, capsys):
  assert _prepare("--src", tmp_path / "nope.jsonl", "--out", tmp_path / "out") == 2
  err = capsys.readouterr().err
  assert err == f"error: --src {tmp_path / 'nope.jsonl'} does not exist\n"
  assert _prepare("--src", tmp_path / "nope.jsonl", "--out", tmp_path / "out", "--debug") == 2
  err = capsys.readouterr().err
  assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: --src")
  assert not (tmp_path / "out").exists()


# --- encodings and quotes: one bad line is one skipped row, never the end of the run -------------

def test_a_line_that_is_not_utf8_is_one_skipped_row(tmp_path, capsys):
  _jpeg(tmp_path / "a.jpg")
  jsonl = tmp_path / "d.jsonl"
  jsonl.write_bytes(b'{"image": "a.jpg", "caption": "first"}\n'
                    b'{"image": "a.jpg", "caption": "caf\xe9 latin-1"}\n'
                    b'{"image": "a.jpg", "caption": "third"}\n')
  csv_file = tmp_path / "d.csv"
  csv_file.write_bytes(b"image,caption\na.jpg,first\na.jpg,na\xefve\na.jpg,third\n")
  for src, line in ((jsonl, 2), (csv_file, 3)):
    out = tmp_path / f"out_{src.suffix[1:]}"
    assert _prepare("--src", src, "--out", out) == 0, capsys.readouterr().err
    assert "2 written, 1 skipped of 3" in capsys.readouterr().out
    assert [r["captions"] for r in records.open_split(out, "train")] == [["first"], ["third"]]
    [skip] = _skipped(out)
    assert skip["source"] == f"{src.name}:{line}" and skip["reason"] == "bad_row"
    assert skip["detail"].startswith("not UTF-8 text (byte 0x") and "save the file as UTF-8" in skip["detail"]


def test_a_header_that_is_not_utf8_is_one_line(tmp_path, capsys):
  src = tmp_path / "d.csv"
  src.write_bytes(b"im\xe4ge,caption\na.jpg,x\n")
  assert _prepare("--src", src, "--out", tmp_path / "out") == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {src}:1: cannot read the header line: not UTF-8 text") and err.count("\n") == 1
  assert not (tmp_path / "out").exists()


def test_a_byte_order_mark_keeps_the_first_row(tmp_path):
  _jpeg(tmp_path / "a.jpg")
  bom = b"\xef\xbb\xbf"
  (tmp_path / "d.csv").write_bytes(bom + b"image,caption\r\na.jpg,one\r\na.jpg,two\r\n")  # Excel's "CSV UTF-8"
  (tmp_path / "d.jsonl").write_bytes(bom + b'{"image": "a.jpg", "caption": "one"}\n{"image": "a.jpg", "caption": "two"}\n')
  for name in ("d.csv", "d.jsonl"):
    summary = prepare.prepare_jsonl(tmp_path / name, tmp_path / f"out_{name}")
    assert summary["skipped"]["train"] == {}
    assert [r["captions"] for r in records.open_split(tmp_path / f"out_{name}", "train")] == [["one"], ["two"]]


def test_an_unterminated_quote_skips_its_row_not_the_rest(tmp_path):
  _jpeg(tmp_path / "a.jpg")
  (tmp_path / "d.csv").write_text('image,caption\na.jpg,"quoted, fine"\na.jpg,"never closed\n'
                                  'a.jpg,after\na.jpg,"a ""quote"" inside"\n')
  summary = prepare.prepare_jsonl(tmp_path / "d.csv", tmp_path / "out")
  assert summary["skipped"]["train"] == {"bad_row": 1}
  assert [r["captions"] for r in records.open_split(tmp_path / "out", "train")] == [
      ["quoted, fine"], ["after"], ['a "quote" inside']]
  [skip] = _skipped(tmp_path / "out")
  assert skip["source"] == "d.csv:3" and "quoted field is not closed on this line" in skip["detail"]


def test_old_mac_line_endings_and_tsv_lines(tmp_path):
  _jpeg(tmp_path / "images" / "a.jpg")
  (tmp_path / "mac.csv").write_bytes(b"image,caption\ra.jpg,one\ra.jpg,two\r")
  summary = prepare.prepare_jsonl(tmp_path / "mac.csv", tmp_path / "out", images=tmp_path / "images")
  assert summary["splits"]["train"]["num_examples"] == 2
  # CC3M's TSV reads its lines alike: a non-UTF-8 line is one bad row
  (tmp_path / "cc.tsv").write_bytes(b"\xef\xbb\xbfcaption\timage\na red thing\ta.jpg\nbad \xff\ta.jpg\nblue\ta.jpg\n")
  summary = prepare.prepare_cc3m(tmp_path / "cc.tsv", tmp_path / "out_cc", images=tmp_path / "images")
  assert summary["splits"]["train"]["num_examples"] == 2 and summary["skipped"]["train"] == {"bad_row": 1}
  assert _skipped(tmp_path / "out_cc")[0]["source"] == "cc.tsv:3"
