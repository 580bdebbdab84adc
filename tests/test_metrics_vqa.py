"""The official VQA accuracy: normalisation, leave-one-out averaging, the per-type score."""

import hashlib
import json
import random
import re

import pytest

from bridgejax.evaluation import vqa


def _straightforward_accuracy(prediction, humans, processing="official"):
  """An independent transcription of vqaEval.py's loop: the 10 subsets of 9 humans, explicitly."""
  def punct(text):
    out = text
    for p in vqa.PUNCT:
      out = out.replace(p, "" if (p + " " in text or " " + p in text or re.search(r"\d,\d", text)) else " ")
    return re.sub(r"(?!<=\d)(\.)(?!\d)", "", out, count=32)

  def digit_article(text):
    words = [vqa.MANUAL_MAP.get(w, w) for w in text.lower().split()]
    return " ".join(vqa.CONTRACTIONS.get(w, w) for w in words if w not in ("a", "an", "the"))

  def clean(text):
    return text.replace("\n", " ").replace("\t", " ").strip()

  if processing == "official":
    prediction, humans = clean(prediction), [clean(h) for h in humans]
    if len(set(humans)) > 1:
      humans = [digit_article(punct(h)) for h in humans]
      prediction = digit_article(punct(prediction))
  else:
    prediction = digit_article(punct(clean(prediction)))
    if len(set(humans)) > 1:
      humans = [punct(h) for h in humans]
  accs = []
  for left_out in range(len(humans)):
    others = humans[:left_out] + humans[left_out + 1:]
    accs.append(min(1.0, sum(h == prediction for h in others) / 3))
  return sum(accs) / len(accs)


@pytest.mark.parametrize("matches,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_ten_choose_nine_averaging(matches, expected):
  # By hand, m matching humans out of 10: the 10 - m subsets that leave out a non-matching human see
  # m matches, the m subsets that leave out a matching human see m - 1:
  #   m=1: 9/10 * 1/3 + 1/10 * 0 = 0.3;  m=2: 8/10 * 2/3 + 2/10 * 1/3 = 0.6;
  #   m=3: 7/10 * 1 + 3/10 * 2/3 = 0.9;  m=4: 6/10 * 1 + 4/10 * 1 = 1.0.
  others = ["blue", "green", "yellow", "pink", "black", "white", "grey", "brown", "orange", "purple"]
  humans = ["red"] * matches + others[:10 - matches]
  assert vqa.accuracy("red", humans) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("raw,normalised", [
    ("Two", "2"),
    ("two dogs", "2 dogs"),
    ("none", "0"),
    ("ten", "10"),
    ("The dog", "dog"),
    ("a red ball", "red ball"),
    ("an apple", "apple"),
    ("dont", "don't"),
    ("isnt", "isn't"),
    ("Yes.", "yes"),
    ("yes!", "yes"),
    ("3.5", "3.5"),  # a period before a digit stays
    ("1,000", "1000"),  # digit,digit: all punctuation is deleted rather than spaced
    ("red-white", "red white"),  # no "- " / " -": replaced by a space
    ("red - white", "red white"),  # "- " present: deleted
    ("(red)", "red"),
    ("what?", "what"),
    ("  padded\tanswer\n", "padded answer"),
    ("it's", "it's"),  # the apostrophe is not in the punctuation list
])
def test_normalize_answer(raw, normalised):
  assert vqa.normalize_answer(raw) == normalised


def test_processing_applies_only_when_humans_disagree():
  disagreeing = ["2"] * 5 + ["3"] * 5
  assert vqa.accuracy("two", disagreeing) == 1.0
  assert vqa.accuracy("Two.", disagreeing) == 1.0
  unanimous = ["2"] * 10
  assert vqa.accuracy("2", unanimous) == 1.0
  assert vqa.accuracy("two", unanimous) == 0.0  # the official script compares raw strings here
  assert vqa.accuracy(" 2\n", unanimous) == 1.0  # but it does strip
  # Legacy (pre-2021) script: the prediction is always normalised, the humans never digit-mapped.
  assert vqa.accuracy("two", unanimous, processing="legacy") == 1.0
  assert vqa.accuracy("2", ["two"] * 5 + ["2"] * 5, processing="legacy") == 1.0
  assert vqa.accuracy("2", ["two"] * 5 + ["2"] * 5) == 1.0  # official normalises the humans too


def test_yes_no_and_contractions():
  humans = ["yes"] * 7 + ["no"] * 3
  assert vqa.accuracy("Yes", humans) == 1.0
  assert vqa.accuracy("no", humans) == pytest.approx(0.9)
  humans = ["don't know"] * 2 + ["no"] * 8
  assert vqa.accuracy("dont know", humans) == pytest.approx(0.6)


def test_equals_straightforward_reimplementation():
  words = ["yes", "Yes", "no", "2", "two", "Two", "the dog", "a dog", "dog", "dog.", "dont", "don't", "1,000",
           "1000", "3.5", "red-white", "red white", "(red)", "none", "0", "zero", "hello!", "x; y", "U.S.", ""]
  rng = random.Random(0)
  for _ in range(2000):
    pool = rng.sample(words, rng.randint(1, 4))
    humans = [rng.choice(pool) for _ in range(10)]
    prediction = rng.choice(words + [rng.choice(humans)])
    for processing in ("official", "legacy"):
      assert vqa.accuracy(prediction, humans, processing=processing) == \
          _straightforward_accuracy(prediction, humans, processing), (prediction, humans, processing)


def test_period_strip_count_quirk():
  # The official script passes re.UNICODE (= 32) as `count`: at most 32 periods are removed.
  assert vqa.process_punctuation("." * 40) == "." * 8


def test_score_per_answer_type():
  questions = {
      1: {"answers": ["yes"] * 10, "answer_type": "yes/no"},
      2: {"answers": ["2"] * 2 + ["3"] * 8, "answer_type": "number"},
      3: {"answers": ["red"] * 10, "answer_type": "other"},
      4: {"answers": ["blue"] * 4 + ["navy"] * 6, "answer_type": "other"},
  }
  predictions = {1: "yes", 2: "two", 3: "green", 4: "Blue"}
  result = vqa.score(predictions, questions)
  assert result == pytest.approx({"overall": (1.0 + 0.6 + 0.0 + 1.0) / 4, "yes/no": 1.0, "number": 0.6,
                                  "other": 0.5})
  only_yes_no = vqa.score({1: "no"}, {1: questions[1]})
  assert only_yes_no == {"overall": 0.0, "yes/no": 0.0, "number": None, "other": None}


def test_score_errors_name_missing_ids():
  questions = {1: {"answers": ["yes"] * 10, "answer_type": "yes/no"},
               2: {"answers": ["no"] * 10, "answer_type": "yes/no"}}
  with pytest.raises(ValueError, match=r"missing from predictions: \[2\]"):
    vqa.score({1: "yes"}, questions)
  with pytest.raises(ValueError, match="answer_type"):
    vqa.score({1: "yes"}, {1: {"answers": ["yes"] * 10}})
  with pytest.raises(TypeError):
    vqa.accuracy("yes", "yes")
  with pytest.raises(ValueError, match="processing"):
    vqa.accuracy("yes", ["yes"] * 10, processing="nope")


@pytest.mark.parametrize("prediction,humans,expected", [
    ("yes it is a dog", ["yes"] * 10, "yes"),
    ("red and white stripes", ["red"] * 8 + ["red and white"] * 2, "red and white"),
    ("two", ["2"] * 10, "two"),
    ("  many   spaces here  ", ["a b"] * 10, "many spaces"),
    ("", ["yes"] * 10, ""),
])
def test_truncate_to_reference_length(prediction, humans, expected):
  assert vqa.truncate_to_reference_length(prediction, humans) == expected


def test_tables_are_the_official_ones():
  # The tables were checked equal (==) to the dicts/lists of vqaEval.py at GT-Vision-Lab/VQA
  # master a013f00; this digest pins them against accidental edits.
  tables = [sorted(vqa.CONTRACTIONS.items()), sorted(vqa.MANUAL_MAP.items()), list(vqa.ARTICLES),
            list(vqa.PUNCT), vqa.PERIOD_STRIP.pattern, vqa.COMMA_STRIP.pattern]
  digest = hashlib.sha256(json.dumps(tables).encode()).hexdigest()
  assert digest == "6739373c985adbacded9b51583f2334e55783586564ca463a1bea56aaf592181"
  assert len(vqa.CONTRACTIONS) == 120 and vqa.CONTRACTIONS["dont"] == "don't"
  assert all("\u2019" not in k + v for k, v in vqa.CONTRACTIONS.items())  # straight apostrophes (fixed in 458a8b2)
