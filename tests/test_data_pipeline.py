"""The grain pipeline: fixed shapes, deterministic shuffles per seed, disjoint shards per process,
exact resumption from iterator state, worker processes that change nothing, padded eval passes."""

import io
import json
import types

import numpy as np
import pytest
from PIL import Image

from bridgejax.data import pipeline, prepare, records

NUM = 26  # records in the fixture: not a multiple of 4, so shard cuts and padding are exercised
WORDS = ["a", "red", "blue", "green", "circle", "square", "star", "above", "below", "the", "and",
         "very", "long", "caption", "that", "goes", "on"]


def _tokenizer(tmp_path):
  """The real bridgejax tokenizer over a word-level HF tokenizer.json made here."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  from bridgejax.weights import load_tokenizer
  vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"] + WORDS)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  path = tmp_path / "tok"
  path.mkdir()
  tok.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}))
  return load_tokenizer(str(path))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """A jsonl dataset of NUM tiny images whose pixel value encodes the record (and 2 captions)."""
  root = tmp_path_factory.mktemp("pipeline")
  lines = []
  for i in range(NUM):
    image = Image.new("RGB", (20 + i % 3, 16), (i * 9, 255 - i * 9, 7))
    out = io.BytesIO()
    image.save(out, "PNG")
    (root / f"{i}.png").write_bytes(out.getvalue())
    caps = [f"a red circle {WORDS[i % len(WORDS)]}", "a blue square"]
    lines.append(json.dumps({"image": f"{i}.png", "captions": caps, "id": f"r{i}"}))
  long = " ".join(["very long caption that goes on"] * 8)
  lines[3] = json.dumps({"image": "3.png", "caption": long, "id": "r3"})
  (root / "d.jsonl").write_text("\n".join(lines))
  prepare.prepare_jsonl(root / "d.jsonl", root / "ds")
  return root / "ds", _tokenizer(root)


def _train(data, **kw):
  ds_dir, tok = data
  kw = {"batch_size": 4, "seed": 0, "image_size": 16, "shard_index": 0, "shard_count": 1, **kw}
  return pipeline.train_dataset(ds_dir, "train", tok, **kw)


def _indices(loader, steps):
  it = iter(loader)
  return [next(it)["index"].tolist() for _ in range(steps)]


def test_batches_have_fixed_shapes_and_ret_ends_every_text(data):
  _, tok = data
  batch = _train(data)[0]
  assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == np.float32
  assert batch["text_ids"].shape == batch["text_mask"].shape == (4, 24)
  assert batch["text_ids"].dtype == batch["text_mask"].dtype == np.int32
  for ids, mask in zip(batch["text_ids"], batch["text_mask"]):
    n = mask.sum()
    assert mask[:n].all() and not mask[n:].any()  # right padded
    assert ids[0] == tok.bos_id and ids[n - 1] == tok.ret_id and (ids[n:] == tok.pad_id).all()
  # the 60-word caption is cut to 24 tokens and still ends with [RET]
  loader = _train(data, batch_size=NUM)
  b = loader[0]
  row = list(b["index"]).index(3)
  assert b["text_mask"][row].all() and b["text_ids"][row, -1] == tok.ret_id
  assert tok.decode(b["text_ids"][row]).startswith("very long caption")


def test_image_is_the_records_image(data):
  ds_dir, _ = data
  batch = _train(data)[0]
  split = records.open_split(ds_dir, "train")
  from bridgejax.data.image import clip_preprocess, decode_image
  for row, index in enumerate(batch["index"]):
    expected = clip_preprocess(decode_image(split[int(index)]["image"]), 16)
    np.testing.assert_array_equal(batch["image"][row], expected)


def test_shuffle_is_deterministic_per_seed_and_differs_across_seeds(data):
  a, b, c = (_indices(_train(data, seed=s), 6) for s in (0, 0, 1))
  assert a == b and a != c
  epoch = sum(a, [])[:24]  # 6 batches of one 26-record epoch
  assert len(set(epoch)) == 24
  assert sorted(sum(_indices(_train(data, batch_size=2), 13), [])) == list(range(NUM))
  # the next epoch is shuffled again
  two = sum(_indices(_train(data, batch_size=2), 26), [])
  assert sorted(two[:NUM]) == sorted(two[NUM:]) == list(range(NUM)) and two[:NUM] != two[NUM:]


def test_processes_get_disjoint_equal_shards(data):
  shards = [sum(_indices(_train(data, batch_size=2, shard_index=p, shard_count=4), 3), []) for p in range(4)]
  flat = sum(shards, [])
  assert len(flat) == len(set(flat)) == 24  # 26 records cut to 24: 6 per process, disjoint


def test_resume_from_saved_state_continues_at_the_next_example(data, tmp_path):
  loader = _train(data)
  it = iter(loader)
  for _ in range(9):  # past the end of the first epoch (26 // 4 = 6 batches)
    next(it)
  pipeline.save_iterator_state(it, tmp_path / "data_state.json")
  expected = [next(it) for _ in range(3)]
  resumed = iter(_train(data))
  pipeline.restore_iterator_state(resumed, tmp_path / "data_state.json")
  for want in expected:
    got = next(resumed)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  # the state is the same on every process: process 0's copy restores process 1 at the same step
  other = iter(_train(data, shard_index=1, shard_count=2))
  other.set_state({**json.loads((tmp_path / "data_state.json").read_text()), "shard_count": 2})
  np.testing.assert_array_equal(next(other)["index"], _train(data, shard_index=1, shard_count=2)[9]["index"])
  with pytest.raises(ValueError, match="seed"):
    iter(_train(data, seed=3)).set_state(json.loads((tmp_path / "data_state.json").read_text()))


def test_captions_are_drawn_anew_each_epoch(data):
  loader = _train(data, batch_size=NUM)
  e0, e1, e2 = (dict(zip(b["index"].tolist(), map(tuple, b["text_ids"]))) for b in (loader[0], loader[1], loader[2]))
  assert any(e0[i] != e1[i] or e0[i] != e2[i] for i in e0)


def test_empty_batch_size_is_refused(data):
  with pytest.raises(ValueError, match="must be positive"):
    _train(data, batch_size=0)


def test_worker_processes_give_the_same_batches_and_portable_state(data):
  plain = _train(data)
  it = iter(_train(data, worker_count=1))
  try:
    for step in range(2):
      np.testing.assert_array_equal(next(it)["image"], plain[step]["image"])
    state = it.get_state()
  finally:
    it.close()
  resumed = iter(plain)  # saved with a worker, restored without: the same stream
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["index"], plain[2]["index"])


def test_eval_pass_is_ordered_padded_and_equal_across_processes(data):
  ds_dir, tok = data
  seen, counts = [], []
  for p in range(3):
    batches = list(pipeline.eval_dataset(ds_dir, "train", batch_size=4, image_size=16, shard_index=p,
                                         shard_count=3, tokenizer=tok, captions_per_image=3))
    counts.append(len(batches))
    for b in batches:
      assert b["image"].shape == (4, 3, 16, 16) and b["caption_ids"].shape == (4, 3, 24)
      seen += b["index"][b["valid"]].tolist()
      assert (b["index"][~b["valid"]] == -1).all()
    b = batches[0]
    assert b["id"][0] == f"r{p}" and b["caption_valid"][0].tolist() == [True, True, False]
  assert len(set(counts)) == 1  # 26 records over 3 processes: 9, 9, 8 -> 3 batches each
  assert sorted(seen) == list(range(NUM))


def test_image_resize_reaches_training_and_eval_batches(data, tmp_path):
  """data.image_resize / an eval task's image_resize (the thesis protocol's): the squashed image,
  not the cropped one."""
  from bridgejax.data.image import clip_preprocess, decode_image
  from bridgejax.evaluation.evaluators.common import task_batches
  from configs import base
  _, tok = data
  lines = []
  for i in range(4):  # wide gradients: squashing and cropping see different pixels
    pixels = np.tile(np.linspace(0, 255, 40 + 8 * i, dtype=np.uint8)[None, :, None], (16, 1, 3))
    Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    lines.append(json.dumps({"image": f"{i}.png", "caption": "a gradient", "id": f"g{i}"}))
  (tmp_path / "g.jsonl").write_text("\n".join(lines))
  prepare.prepare_jsonl(tmp_path / "g.jsonl", tmp_path / "ds")
  split = records.open_split(tmp_path / "ds", "train")
  squashed = lambda i: clip_preprocess(decode_image(split[i]["image"]), 16, "squash")
  batch = pipeline.train_dataset(tmp_path / "ds", "train", tok, batch_size=4, image_size=16, shard_index=0,
                                 shard_count=1, image_resize="squash")[0]
  for row, index in enumerate(batch["index"]):
    np.testing.assert_array_equal(batch["image"][row], squashed(int(index)))
  evals = pipeline.eval_dataset(tmp_path / "ds", "train", batch_size=4, image_size=16, shard_index=0, shard_count=1,
                                image_resize="squash")[0]
  np.testing.assert_array_equal(evals["image"][1], squashed(1))
  assert np.abs(evals["image"][1] - clip_preprocess(decode_image(split[1]["image"]), 16)).max() > 0.1
  thesis = base.get_config("eval=thesis").evals.caption
  assert thesis.image_resize == "squash" and base.get_config().evals.caption.image_resize == "clip"
  engine = types.SimpleNamespace(round_batch=lambda n: n, model=types.SimpleNamespace(
      vision=types.SimpleNamespace(config=types.SimpleNamespace(image_size=16))))
  evals = next(task_batches(engine, tmp_path / "ds", "train", 4, thesis, "caption"))
  np.testing.assert_array_equal(evals["image"][1], squashed(1))
