"""The toy world is deterministic, its text is true of its images, and it prepares into every
task's records (captions, VQA, VisDial) over the same images."""

import io
import re
import time

import numpy as np
from PIL import Image

from bridgejax import pic2word
from bridgejax.data import records
from bridgejax.toy import pretrain, world
from bridgejax.toy.prepare import prepare_toy
from bridgejax.toy.questions import question_pool
from bridgejax.toy.scene import COLORS, IMAGE_SIZE, KINDS, NUMBER_WORDS, PLURAL, RELATIONS, make_scene
from bridgejax.toy.words import reference, relation


def test_same_seed_same_bytes_other_seed_other_world():
  a, b = world.example("val", 7), world.example("val", 7)
  assert a == b  # image bytes, captions, questions, dialog: all equal
  assert world.example("val", 7, seed=1)["image"] != a["image"]
  assert world.example("test", 7)["image"] != a["image"] and world.example("val", 8)["image"] != a["image"]
  # random access: example i does not depend on the ones before it
  assert list(world.examples("train", 3, start=5)) == [world.example("train", i) for i in (5, 6, 7)]


def test_images_show_the_scene():
  for i in range(40):
    ex = world.example("train", i, num_questions=0, dialog_rounds=0)
    image = np.asarray(Image.open(io.BytesIO(ex["image"])))
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    scene = make_scene(world.rng_for("train", i, 0))
    assert scene.to_dict() == ex["scene"]
    for s in scene.shapes:  # the shape's colour is at its centre
      pixel = image[int(round(s.cy)), int(round(s.cx))].astype(int)
      assert np.abs(pixel - np.array(s.rgb)).max() <= 3, (i, s)
      row, col = int(s.cy // (IMAGE_SIZE / 3)), int(s.cx // (IMAGE_SIZE / 3))
      assert (row, col) == (s.row, s.col)


def _words(text):
  return set(re.findall(r"[a-z]+", text))


def test_text_is_true_of_the_scene():
  colors, kinds = set(COLORS), set(KINDS) | {PLURAL[k] for k in KINDS}
  singular = {p: k for k, p in PLURAL.items()}
  for i in range(60):
    ex = world.example("val", i)
    shapes = ex["scene"]["shapes"]
    present_colors = {s["color"] for s in shapes}
    present_kinds = {s["kind"] for s in shapes} | {PLURAL[s["kind"]] for s in shapes}
    assert len(ex["captions"]) == 5
    for c in ex["captions"]:
      assert _words(c) & colors <= present_colors and _words(c) & kinds <= present_kinds, (c, shapes)
      for m in re.finditer(r"\b(two|three) shapes\b", c):
        assert NUMBER_WORDS.index(m.group(1)) == len(shapes), c
      for m in re.finditer(r"\b(two|three) (\w+) (\w+)", c):  # "two red circles"
        if m.group(2) in colors:
          kind = singular[m.group(3)]
          n = sum(s["color"] == m.group(2) and s["kind"] == kind for s in shapes)
          assert NUMBER_WORDS.index(m.group(1)) == n, c
    for q in ex["questions"]:
      assert q["answer_type"] in ("yes/no", "number", "other") and len(q["answers"]) == 10
      assert q["multiple_choice_answer"] in q["answers"]
      if q["question"] in ("How many shapes are there?", "How many shapes are in the image?",
                           "How many objects are there?"):
        assert q["multiple_choice_answer"] == str(len(shapes))
      m = re.fullmatch(r"What color is the (\w+)\?", q["question"])
      if m and m.group(1) in KINDS:
        assert q["multiple_choice_answer"] == next(s["color"] for s in shapes if s["kind"] == m.group(1))
    d = ex["dialog"]
    assert d["caption"] in ex["captions"] and len(d["rounds"]) == 10
    for r in d["rounds"]:
      assert len(r["options"]) == len(set(r["options"])) == 100 and r["options"][r["gt_index"]] == r["answer"]
      assert not r["question"].endswith("?")
    assert len(d["dense_relevance"]) == 100 and d["dense_relevance"][d["rounds"][d["dense_round_index"]]["gt_index"]] == 1


def test_relations_in_questions_hold():
  checked = 0
  for i in range(80):
    scene = make_scene(world.rng_for("test", i, 0))
    for q in question_pool(scene, np.random.default_rng(i)):
      m = re.fullmatch(r"is \{R\} (above|over|below|under|beneath|to the left of|left of|to the right of|right of) "
                       r"the (.+)\?", q.text)
      if not m:
        continue
      a = scene.shapes[q.subject]
      b = next(j for j in range(len(scene.shapes)) if reference(scene, j) == "the " + m.group(2))
      rel = next(k for k, words in RELATIONS.items() if m.group(1) in words)
      assert (q.answers[0] == "yes") == (rel in relation(a, scene.shapes[b]))
      checked += 1
  assert checked > 20


def test_language_is_varied_and_generation_fast():
  start = time.perf_counter()
  exs = list(world.examples("train", 400, num_questions=0, dialog_rounds=0))
  elapsed = time.perf_counter() - start
  captions = [c for e in exs for c in e["captions"]]
  assert len(set(captions)) > 0.8 * len(captions)
  assert len({c.split()[0] for c in captions}) >= 6  # several templates and openings
  assert elapsed < 20, f"{elapsed:.1f}s for 400 training images"  # ~1 s on a free core


def test_prepare_toy_writes_every_task_over_shared_images(tmp_path):
  summary = prepare_toy(tmp_path / "toy", num_train=12, num_val=6, num_test=4)
  splits = summary["splits"]
  assert splits["train"]["num_examples"] == 12 and splits["val"]["num_examples"] == 6
  assert splits["visdial_test"]["num_examples"] == 4 and splits["vqa_val"]["num_examples"] == 30
  val, vqa, dial = (records.open_split(tmp_path / "toy", s) for s in ("val", "vqa_val", "visdial_val"))
  q = vqa[7]
  assert q["image"] == val[q["question_id"] // 100]["image"] == world.example("val", 1)["image"]
  assert dial[2]["image"] == val[2]["image"] and dial[2]["rounds"] == world.example("val", 2)["dialog"]["rounds"]
  assert records.open_split(tmp_path / "toy", "train")[3]["captions"] == world.example("train", 3)["captions"]
  # the same seed prepares the same bytes
  prepare_toy(tmp_path / "again", num_train=12, num_val=6, num_test=4)
  for f in ("train-00000-of-00001.array_record", "vqa_val-00000-of-00001.array_record"):
    assert (tmp_path / "toy" / f).read_bytes() == (tmp_path / "again" / f).read_bytes()


def test_toy_data_made_by_an_older_version_gets_its_missing_splits(tmp_path, capsys):
  import json

  import ml_collections

  from bridgejax.toy.prepare import TOY_SPLITS, ensure_toy_data
  toy = ml_collections.ConfigDict(dict(num_train=6, num_val=3, num_test=2, seed=0))
  config = ml_collections.ConfigDict({"data": {"dir": str(tmp_path / "toy"), "toy": toy}})
  ensure_toy_data(config)
  assert set(TOY_SPLITS) <= set(records.load_info(tmp_path / "toy")["splits"])
  before = (tmp_path / "toy" / "vqa_test-00000-of-00001.array_record").read_bytes()
  ensure_toy_data(config)  # complete: nothing to do
  assert "again" not in capsys.readouterr().out
  info_path = tmp_path / "toy" / records.INFO_FILE  # an older version wrote no compose splits
  info = json.loads(info_path.read_text())
  info["splits"] = {k: v for k, v in info["splits"].items() if not k.startswith("compose_")}
  info_path.write_text(json.dumps(info))
  ensure_toy_data(config)
  assert "again (it lacks compose_val, compose_test)" in capsys.readouterr().out
  assert {"compose_val", "compose_test"} <= set(records.load_info(tmp_path / "toy")["splits"])
  assert (tmp_path / "toy" / "vqa_test-00000-of-00001.array_record").read_bytes() == before
  # any other dataset in data.dir (the demo's setup on your own data) is never touched
  own = tmp_path / "own"
  own.mkdir()
  (own / records.INFO_FILE).write_text(json.dumps({"format": "bridgejax-records", "version": 1, "source": "jsonl", "splits": {"train": {}}}))
  config.data.dir = str(own)
  ensure_toy_data(config)
  assert sorted(p.name for p in own.iterdir()) == [records.INFO_FILE]


def test_relative_captions_are_true_and_in_the_composed_querys_form():
  """'a photo of {the scene with one attribute changed} , but {the scene's value}': what comes
  before 'but' names another value of the attribute, the modification is the benchmark's own text
  for the scene's value, so the description is true of the scene, as a composed query is of its target."""
  before, after = pic2word.QUERY_TEMPLATE.split(pic2word.WORD)
  seen = set()
  for i in range(60):
    texts = world.composition_texts("train", i)
    relative = [t for t in texts if " , but " in t]
    assert len(relative) == 3 and all(t.startswith(before.rstrip()) for t in relative), texts
    scene = make_scene(world.rng_for("train", i, 7))
    s, background = scene.shapes[0], scene.background
    own = {"color": s.color, "kind": s.kind, "background": background}
    for t in relative:
      described, modification = t.split(" , ", 1)
      attribute = next(a for a, v in own.items() if modification == world.modification_text(a, v))
      seen.add(attribute)
      words = _words(described)
      if attribute == "background":
        assert f"on a {background} background" not in described and "background" in described, t
      else:
        assert own[attribute] not in words and words & set(world.COMPOSE_ATTRIBUTES[attribute]), t
      for other in set(own) - {attribute}:  # the other attributes, where said, are the scene's
        said = words & set(world.COMPOSE_ATTRIBUTES[other])
        assert said <= {own[other]} or other == "background", t
      assert after.format(modification).strip().endswith(modification)
    captions = [t for t in texts if " , but " not in t and not t.startswith("Q:")]  # true of the scene
    assert len(captions) == 4 and all(_words(t) & set(COLORS) <= {s.color} for t in captions), texts
  assert seen == set(world.COMPOSE_ATTRIBUTES)


def test_the_dataset_never_says_pic2words_words():
  """'a photo of' and 'but' are the LM corpus's words only (pretrain.corpus): every prepared split
  keeps the texts it had, and the composed benchmark's queries are the only place 'but' appears."""
  for split in ("train", "val", "test"):
    for ex in world.examples(split, 40, image=False):
      texts = ex["captions"] + [q["question"] for q in ex["questions"]] + [ex["dialog"]["caption"]]
      texts += [r["question"] + " " + r["answer"] for r in ex["dialog"]["rounds"]]
      assert not any("photo" in _words(t) or "but" in _words(t) for t in texts), ex["id"]
  photo = world.pic2word_texts(world.rng_for("train", 0, world.PHOTO), world.scene_of("train", 0))
  assert len(photo) == 1 and photo[0].startswith(world.PHOTO_PREFIX)


def test_pic2word_words_are_an_option_of_the_lm_corpus():
  """The shipped recipe's corpus has none of them (so it rebuilds the shipped assets); with
  pic2word=True every scene row gains a photo caption and each train index a composition row."""
  plain, words = pretrain.corpus(20), pretrain.corpus(20, pic2word=True)
  said = lambda rows: [t for row in rows for t in row if t.startswith(world.PHOTO_PREFIX)]
  assert not said(plain) and len(words) == 2 * len(plain)
  assert [row[:-1] for row in words[:20]] == plain and len(said(words[:20])) == 20
  assert all(any(" , but " in t for t in row) for row in words[20:])
