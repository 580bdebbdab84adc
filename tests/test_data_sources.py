"""Each source prepares from fixtures in its real on-disk format and reads back the right
examples; missing, truncated and corrupt images are skipped and counted, never fatal."""

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from bridgejax.data import prepare, records
from bridgejax.data.image import ImageError, decode_image, read_image_file


def _image_bytes(seed: int, fmt: str = "JPEG", size=(40, 30)) -> bytes:
  rng = np.random.default_rng(seed)
  pixels = np.clip(rng.normal(128, 40, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, fmt)
  return out.getvalue()


def _truncated(seed: int) -> bytes:
  data = _image_bytes(seed)
  return data[: len(data) // 2]


def _write(path, data: bytes):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)
  return path


def _decoded(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# --- the decoding guard --------------------------------------------------------------------------

@pytest.mark.parametrize("data,reason", [
    (b"", "empty"), (b"<html>404 not found</html>", "corrupt"), (None, "truncated")])
def test_decode_image_turns_every_failure_into_image_error(data, reason):
  data = _truncated(0) if data is None else data
  with pytest.raises(ImageError) as e:
    decode_image(data, "x.jpg")
  assert e.value.reason == reason and "x.jpg" in str(e.value)


def test_missing_file_and_good_images(tmp_path):
  with pytest.raises(ImageError) as e:
    read_image_file(tmp_path / "nope.jpg")
  assert e.value.reason == "missing"
  for fmt in ("JPEG", "PNG", "WEBP"):
    assert decode_image(_image_bytes(1, fmt)).mode == "RGB"
  gray = io.BytesIO()
  Image.new("L", (9, 7), 100).save(gray, "PNG")
  assert decode_image(gray.getvalue()).size == (9, 7)


# --- CC3M ----------------------------------------------------------------------------------------

def _img2dataset_tar(path, samples):
  """samples: (key, {ext: bytes})."""
  with tarfile.open(path, "w") as tar:
    for key, files in samples:
      for ext, data in files.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


def _meta(key, caption, status="success"):
  return json.dumps({"url": f"http://x/{key}.jpg", "key": key, "status": status, "caption": caption,
                     "error_message": None, "width": 40, "height": 30}).encode()


def test_cc3m_webdataset_shards(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  src = tmp_path / "cc3m"
  src.mkdir()
  good = {k: _image_bytes(i) for i, k in enumerate(["000000000", "000000001", "000010000"])}
  _img2dataset_tar(src / "00000.tar", [
      ("000000000", {"jpg": good["000000000"], "txt": b"a dog on a beach", "json": _meta("000000000", "a dog on a beach")}),
      ("000000001", {"jpg": good["000000001"], "txt": b"a red car", "json": _meta("000000001", "a red car")}),
      ("000000002", {"jpg": _truncated(5), "txt": b"cut off", "json": _meta("000000002", "cut off")}),
      ("000000003", {"txt": b"no image", "json": _meta("000000003", "no image")}),
  ])
  # img2dataset's parquet lists every row, failed downloads included (they are not in the tar).
  pq.write_table(pa.table({"key": ["000000000", "000000001", "000000002", "000000003", "000000004"],
                           "url": [f"http://x/{i}" for i in range(5)],
                           "caption": ["a", "b", "c", "d", "e"],
                           "status": ["success"] * 4 + ["failed_to_download"],
                           "error_message": [None] * 4 + ["HTTP 404"]}), src / "00000.parquet")
  _img2dataset_tar(src / "00001.tar", [
      ("000010000", {"jpg": good["000010000"], "txt": b"", "json": _meta("000010000", "caption from json")})])
  summary = prepare.prepare_cc3m(src, tmp_path / "out", workers=0)
  assert summary["skipped"]["train"] == {"truncated": 1, "missing": 1, "download_failed": 1}
  split = records.open_split(tmp_path / "out", "train")
  assert len(split) == 3
  got = {r["id"]: r for r in split}
  assert got["000000000"]["captions"] == ["a dog on a beach"]
  assert got["000010000"]["captions"] == ["caption from json"]  # empty .txt: the json caption
  for key, data in good.items():
    np.testing.assert_array_equal(_decoded(got[key]["image"]), _decoded(data))
  skipped = [json.loads(l) for l in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
  assert {s["reason"] for s in skipped} == {"truncated", "missing", "download_failed"}


def test_cc3m_broken_tar_shard_is_counted_not_fatal(tmp_path):
  src = tmp_path / "shards"
  src.mkdir()
  _img2dataset_tar(src / "00000.tar", [(f"{i:09d}", {"jpg": _image_bytes(i), "txt": b"caption"}) for i in range(3)])
  data = (src / "00000.tar").read_bytes()
  (src / "00000.tar").write_bytes(data[: len(data) - 2500])  # download of the shard cut short
  summary = prepare.prepare_cc3m(src, tmp_path / "out")
  skipped = summary["skipped"]["train"]
  assert summary["splits"]["train"]["num_examples"] >= 1 and skipped.get("corrupt") == 1


def test_cc3m_parquet_and_folders(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  src = tmp_path / "cc3m"
  _write(src / "00000" / "000000000.jpg", _image_bytes(0))
  _write(src / "00000" / "000000001.jpg", b"\x00garbage")
  pq.write_table(pa.table({"key": ["000000000", "000000001", "000000002", "000000003"],
                           "caption": ["a cat", "garbage", "gone", "failed"], "url": ["u"] * 4,
                           "status": ["success", "success", "success", "failed_to_download"],
                           "error_message": [None, None, None, "timeout"]}), src / "00000.parquet")
  summary = prepare.prepare_cc3m(src, tmp_path / "out")
  assert summary["skipped"]["train"] == {"corrupt": 1, "missing": 1, "download_failed": 1}
  assert [r["captions"] for r in records.open_split(tmp_path / "out", "train")] == [["a cat"]]


def test_cc3m_parquet_with_image_bytes(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"key": ["0", "1"], "caption": ["one", "two"], "status": ["success"] * 2,
                           "jpg": [_image_bytes(0), _truncated(1)]}), tmp_path / "00000.parquet")
  summary = prepare.prepare_cc3m(tmp_path / "00000.parquet", tmp_path / "out")
  assert summary["splits"]["train"]["num_examples"] == 1 and summary["skipped"]["train"] == {"truncated": 1}


def test_cc3m_original_tsv_and_image_folder(tmp_path):
  # Google's TSV: caption <TAB> url, no header; images named by row number.
  (tmp_path / "Train_GCC-training.tsv").write_text(
      "a bird in the sky\thttp://a\nmissing image\thttp://b\na broken file\thttp://c\nsunset\thttp://d\n")
  _write(tmp_path / "images" / "000000000.jpg", _image_bytes(0))
  _write(tmp_path / "images" / "000000002.jpg", _truncated(2))
  _write(tmp_path / "images" / "3.png", _image_bytes(3, "PNG"))
  summary = prepare.prepare_cc3m(tmp_path / "Train_GCC-training.tsv", tmp_path / "out",
                                 images=tmp_path / "images", split="val")
  assert summary["skipped"]["val"] == {"missing": 1, "truncated": 1}
  split = records.open_split(tmp_path / "out", "val")
  assert [(r["id"], r["captions"][0], r["meta"]["url"]) for r in split] == [
      ("0", "a bird in the sky", "http://a"), ("3", "sunset", "http://d")]


def test_fromage_style_tsv_with_header(tmp_path):
  (tmp_path / "cc3m_val.tsv").write_text("caption\timage\na fox\tfox.jpg\nno file\tnone.jpg\n")
  _write(tmp_path / "imgs" / "fox.jpg", _image_bytes(7))
  summary = prepare.prepare_cc3m(tmp_path / "cc3m_val.tsv", tmp_path / "out", images=tmp_path / "imgs")
  assert summary["splits"]["train"]["num_examples"] == 1 and summary["skipped"]["train"] == {"missing": 1}


# --- COCO ----------------------------------------------------------------------------------------

def _karpathy(tmp_path):
  entries = []
  for i, (split, folder) in enumerate([("train", "train2014"), ("restval", "val2014"), ("val", "val2014"),
                                        ("test", "val2014"), ("test", "val2014")]):
    cocoid = 1000 + i
    filename = f"COCO_{folder}_{cocoid:012d}.jpg"
    if i != 4:  # the last test image is missing on disk
      _write(tmp_path / "coco" / folder / filename, _image_bytes(i))
    n = 6 if i == 0 else 5  # some COCO images have more than five captions
    entries.append({"filepath": folder, "filename": filename, "imgid": i, "split": split, "cocoid": cocoid,
                    "sentids": list(range(i * 10, i * 10 + n)),
                    "sentences": [{"tokens": ["a", "b"], "raw": f"Caption {j} of image {i}.",
                                   "imgid": i, "sentid": i * 10 + j} for j in range(n)]})
  path = tmp_path / "coco" / "dataset_coco.json"
  path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
  return path


def test_coco_karpathy(tmp_path):
  summary = prepare.prepare_coco(_karpathy(tmp_path), tmp_path / "out")
  assert {k: v["num_examples"] for k, v in summary["splits"].items()} == {"train": 2, "val": 1, "test": 1}
  assert summary["skipped"]["test"] == {"missing": 1}
  train = list(records.open_split(tmp_path / "out", "train"))
  assert [r["meta"]["image_id"] for r in train] == [1000, 1001]  # restval joins train
  assert len(train[0]["captions"]) == 6 and train[0]["captions"][2] == "Caption 2 of image 0."
  test = records.open_split(tmp_path / "out", "test")[0]
  assert test["id"] == "1003" and len(test["captions"]) == 5
  np.testing.assert_array_equal(_decoded(test["image"]), _decoded(_image_bytes(3)))


def test_coco_karpathy_restval_apart(tmp_path):
  summary = prepare.prepare_coco(_karpathy(tmp_path), tmp_path / "out", restval_into_train=False)
  assert summary["splits"]["restval"]["num_examples"] == 1 and summary["splits"]["train"]["num_examples"] == 1


def test_coco_captions_val2017(tmp_path):
  images = [{"id": 139, "file_name": "000000000139.jpg", "width": 40, "height": 30},
            {"id": 285, "file_name": "000000000285.jpg", "width": 40, "height": 30}]
  anns = [{"id": k, "image_id": 139 if k < 5 else 285, "caption": f"cap {k} "} for k in range(10)]
  _write(tmp_path / "val2017" / "000000000139.jpg", _image_bytes(0))
  _write(tmp_path / "val2017" / "000000000285.jpg", _truncated(1))
  (tmp_path / "captions_val2017.json").write_text(json.dumps(
      {"info": {}, "licenses": [], "images": images, "annotations": anns}))
  summary = prepare.prepare_coco(tmp_path / "captions_val2017.json", tmp_path / "out", images=tmp_path / "val2017")
  assert summary["splits"]["val"]["num_examples"] == 1 and summary["skipped"]["val"] == {"truncated": 1}
  assert records.open_split(tmp_path / "out", "val")[0]["captions"] == [f"cap {k}" for k in range(5)]


# --- VQAv2 ---------------------------------------------------------------------------------------

def test_vqav2_questions_annotations_and_image_table(tmp_path):
  for image_id in (42, 73):
    _write(tmp_path / "val2014" / f"COCO_val2014_{image_id:012d}.jpg", _image_bytes(image_id))
  questions = [{"image_id": 42, "question": "What color is the cat?", "question_id": 42000},
               {"image_id": 42, "question": "Is it raining?", "question_id": 42001},
               {"image_id": 73, "question": "How many dogs?", "question_id": 73000},
               {"image_id": 99, "question": "Image missing?", "question_id": 99000}]
  types = {42000: ("other", "what color is the", "black"), 42001: ("yes/no", "is it", "no"),
           73000: ("number", "how many", "2"), 99000: ("yes/no", "is", "yes")}
  anns = [{"question_id": q["question_id"], "image_id": q["image_id"], "answer_type": types[q["question_id"]][0],
           "question_type": types[q["question_id"]][1], "multiple_choice_answer": types[q["question_id"]][2],
           "answers": [{"answer": types[q["question_id"]][2] if j < 8 else "other", "answer_confidence": "yes",
                        "answer_id": j + 1} for j in range(10)]} for q in questions]
  qfile, afile = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", tmp_path / "v2_mscoco_val2014_annotations.json"
  qfile.write_text(json.dumps({"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
                               "license": {}, "data_subtype": "val2014", "questions": questions}))
  afile.write_text(json.dumps({"info": {}, "license": {}, "data_subtype": "val2014", "annotations": anns}))
  summary = prepare.prepare_vqav2(qfile, tmp_path / "out", images=[tmp_path / "val2014"], annotations=afile)
  assert summary["splits"]["val"]["num_examples"] == 3 and summary["splits"]["val-images"]["num_examples"] == 2
  assert summary["skipped"]["val-images"] == {"missing": 1}
  assert summary["skipped"]["val"] == {"image_unusable": 1}
  split = records.open_split(tmp_path / "out", "val")
  q = split[0]
  assert (q["question_id"], q["question"], q["answer_type"], q["multiple_choice_answer"]) == (
      42000, "What color is the cat?", "other", "black")
  assert q["answers"] == ["black"] * 8 + ["other"] * 2 and len(q["answer_confidences"]) == 10
  assert split[1]["image"] == q["image"]  # one stored copy per image
  np.testing.assert_array_equal(_decoded(split[2]["image"]), _decoded(_image_bytes(73)))


def test_vqav2_test_split_without_annotations(tmp_path):
  _write(tmp_path / "test2015" / "COCO_test2015_000000000001.jpg", _image_bytes(1))
  qfile = tmp_path / "v2_OpenEnded_mscoco_test-dev2015_questions.json"
  qfile.write_text(json.dumps({"data_subtype": "test-dev2015",
                               "questions": [{"image_id": 1, "question": "Why?", "question_id": 1000}]}))
  summary = prepare.prepare_vqav2(qfile, tmp_path / "out", images=tmp_path / "test2015")
  q = records.open_split(tmp_path / "out", "test-dev")[0]
  assert summary["splits"]["test-dev"]["num_examples"] == 1 and q["answers"] == [] and q["answer_type"] == ""


# --- VisDial -------------------------------------------------------------------------------------

def test_visdial_v1_with_dense_annotations(tmp_path):
  questions = ["is it sunny", "how many people", "any animals"]
  answers = [f"answer {k}" for k in range(120)]
  rng = np.random.default_rng(0)

  def rounds(n):
    return [{"question": r % 3, "answer": r, "answer_options": [int(x) for x in rng.permutation(120)[:100]],
             "gt_index": 0} for r in range(n)]
  dialogs = [{"image_id": 185565, "caption": "two people on a beach", "dialog": rounds(10)},
             {"image_id": 284024, "caption": "a cat", "dialog": rounds(10)},
             {"image_id": 500000, "caption": "missing image", "dialog": rounds(10)}]
  for d in dialogs:  # gt_index must point at the answer among the options
    for r in d["dialog"]:
      r["answer_options"][r["gt_index"]] = r["answer"]
  (tmp_path / "visdial_1.0_val.json").write_text(json.dumps(
      {"version": "1.0", "split": "val2018", "data": {"questions": questions, "answers": answers, "dialogs": dialogs}}))
  for image_id in (185565, 284024):
    _write(tmp_path / "VisualDialog_val2018" / f"VisualDialog_val2018_{image_id:012d}.jpg", _image_bytes(image_id % 97))
  dense = [{"image_id": 185565, "round_id": 3, "gt_relevance": [0.5] * 100}]
  (tmp_path / "dense.json").write_text(json.dumps(dense))
  summary = prepare.prepare_visdial(tmp_path / "visdial_1.0_val.json", tmp_path / "out",
                                    images=[tmp_path / "VisualDialog_val2018"], dense=tmp_path / "dense.json")
  assert summary["splits"]["val"]["num_examples"] == 2 and summary["skipped"]["val"] == {"missing": 1}
  d = records.open_split(tmp_path / "out", "val")[0]
  assert d["image_id"] == 185565 and d["caption"] == "two people on a beach" and len(d["rounds"]) == 10
  r = d["rounds"][4]
  assert r["question"] == "how many people" and r["answer"] == "answer 4" and len(r["options"]) == 100
  assert r["options"][r["gt_index"]] == r["answer"]
  assert d["dense_round_index"] == 2 and d["dense_relevance"] == [0.5] * 100  # round_id is 1-based
  assert records.open_split(tmp_path / "out", "val")[1]["dense_round_index"] == -1


# --- users' own data, the CLI --------------------------------------------------------------------

def test_jsonl_and_csv(tmp_path):
  _write(tmp_path / "photos" / "a.jpg", _image_bytes(0))
  _write(tmp_path / "photos" / "b.png", _image_bytes(1, "PNG"))
  _write(tmp_path / "photos" / "c.jpg", _truncated(2))
  lines = [{"image": "photos/a.jpg", "caption": "first"}, {"image": "photos/b.png", "captions": ["second", "2nd"], "id": "b"},
           {"image": "photos/c.jpg", "caption": "broken"}, {"image": "photos/d.jpg", "caption": "missing"},
           {"image": "photos/a.jpg", "caption": ""}]
  (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n{not json\n")
  summary = prepare.prepare_jsonl(tmp_path / "data.jsonl", tmp_path / "out")
  assert summary["skipped"]["train"] == {"truncated": 1, "missing": 1, "no_caption": 1, "bad_row": 1}
  assert [(r["id"], r["captions"]) for r in records.open_split(tmp_path / "out", "train")] == [
      ("1", ["first"]), ("b", ["second", "2nd"])]
  (tmp_path / "data.csv").write_text('image,caption\nphotos/a.jpg,"a, with comma"\nphotos/d.jpg,x\n')
  summary = prepare.prepare_jsonl(tmp_path / "data.csv", tmp_path / "out", split="val")
  assert [r["captions"] for r in records.open_split(tmp_path / "out", "val")] == [["a, with comma"]]
  assert set(records.load_info(tmp_path / "out")["splits"]) == {"train", "val"}  # added, not replaced


def test_existing_split_needs_overwrite(tmp_path):
  _write(tmp_path / "a.jpg", _image_bytes(0))
  (tmp_path / "d.jsonl").write_text(json.dumps({"image": "a.jpg", "caption": "x"}) + "\n")
  prepare.prepare_jsonl(tmp_path / "d.jsonl", tmp_path / "out")
  with pytest.raises(records.RecordError, match="overwrite"):
    prepare.prepare_jsonl(tmp_path / "d.jsonl", tmp_path / "out")
  prepare.prepare_jsonl(tmp_path / "d.jsonl", tmp_path / "out", overwrite=True)
  assert len(records.open_split(tmp_path / "out", "train")) == 1
  assert sorted(p.name for p in (tmp_path / "out").glob("*.array_record")) == ["train-00000-of-00001.array_record"]


def test_cli_with_worker_processes_reports_skips(tmp_path):
  for i in range(6):
    _write(tmp_path / f"{i}.jpg", _image_bytes(i) if i != 3 else _truncated(i))
  (tmp_path / "d.jsonl").write_text("".join(json.dumps({"image": f"{i}.jpg", "caption": f"c{i}"}) + "\n" for i in range(7)))
  out = subprocess.run([sys.executable, "-m", "bridgejax.prepare", "jsonl", "--src", str(tmp_path / "d.jsonl"),
                        "--out", str(tmp_path / "out"), "--workers", "2", "--shard-mb", "1"],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "5 written, 2 skipped of 7" in out.stdout and "truncated" in out.stdout and "missing" in out.stdout
  # order is kept with workers: the records are in file order
  assert [r["id"] for r in records.open_split(tmp_path / "out", "train")] == ["1", "2", "3", "5", "6"]
  bad = subprocess.run([sys.executable, "-m", "bridgejax.prepare", "coco", "--src", str(tmp_path / "nope.json"),
                        "--out", str(tmp_path / "o2")], capture_output=True, text=True, timeout=60)
  assert bad.returncode == 2 and "nope.json" in bad.stderr


def test_max_size_reencodes_large_images(tmp_path):
  _write(tmp_path / "big.jpg", _image_bytes(0, size=(300, 200)))
  _write(tmp_path / "small.jpg", small := _image_bytes(1, size=(50, 40)))
  (tmp_path / "d.jsonl").write_text("".join(json.dumps({"image": f, "caption": "c"}) + "\n" for f in ("big.jpg", "small.jpg")))
  prepare.prepare_jsonl(tmp_path / "d.jsonl", tmp_path / "out", max_size=64)
  big, kept = records.open_split(tmp_path / "out", "train")
  assert Image.open(io.BytesIO(big["image"])).size == (96, 64) and kept["image"] == small


def test_small_shards_roll_over(tmp_path):
  for i in range(5):
    _write(tmp_path / f"{i}.png", _image_bytes(i, "PNG", size=(64, 64)))
  (tmp_path / "d.jsonl").write_text("".join(json.dumps({"image": f"{i}.png", "caption": f"c{i}"}) + "\n" for i in range(5)))
  summary = prepare.prepare_jsonl(tmp_path / "d.jsonl", tmp_path / "out", shard_bytes=20000)
  assert len(summary["splits"]["train"]["files"]) > 1
  assert [r["captions"][0] for r in records.open_split(tmp_path / "out", "train")] == [f"c{i}" for i in range(5)]
