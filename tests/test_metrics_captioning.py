"""Captioning metrics equal pycocoevalcap called directly; empty captions; no leaked Java process."""

import math
import os
import sys

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor as PycocoMeteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from bridgejax.evaluation import captioning

# Hand-made cases: ordinary captions, punctuation-heavy text, empty predictions (first, middle and
# last, so the tokenizer's line alignment is exercised), a prediction that is only punctuation, a
# prediction with a newline, unicode, and a prediction equal to a reference.
PREDICTIONS = {
    "e0": "",
    101: "A dog runs on the grass.",
    102: "Two men, talking (loudly)!! -- \"outside\"; e.g. at 5:30 p.m.?",
    103: "...",
    104: "a cat sitting on a mat",
    105: "",
    106: "A man's bike isn't red\nit is blue",
    107: "café with naïve décor & a piano",
    108: "a plate of food with broccoli and rice",
    "e1": "",
}
REFERENCES = {
    "e0": ["A bird flying in the sky.", "bird in the sky"],
    101: ["A dog is running on grass.", "The dog runs.", "a brown dog running across a field"],
    102: ["Two men talk.", "men are talking; loudly", "Two men (friends) talking outside at 5:30."],
    103: ["a plate of food"],
    104: ["A cat sits on a mat.", "cat, mat", "a small cat on a red mat"],
    105: ["an empty room", "a room with nothing in it"],
    106: ["A man's bike is blue.", "the bike isn't red, it's blue"],
    107: ["a cafe with a piano", "café interior with a piano"],
    108: ["a plate of food with broccoli and rice", "rice and broccoli on a plate"],
    "e1": ["a street at night", "cars on a street"],
}


def _java_children(name: str) -> set[int]:
  """Pids of this process's children whose command line mentions `name` (Linux /proc)."""
  pids = set()
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        cmdline = f.read().decode(errors="replace")
    except (OSError, ValueError, IndexError):
      continue
    if ppid == os.getpid() and name in cmdline:
      pids.add(int(pid))
  return pids


@pytest.fixture(scope="module", autouse=True)
def no_java_left_behind():
  """Set up first, torn down last: every Java process this module started has ended."""
  before = _java_children("java")
  yield
  assert _java_children("java") <= before


@pytest.fixture(scope="module")
def meteor():
  with captioning.Meteor() as m:
    yield m
  assert m._proc.poll() is not None


@pytest.fixture(scope="module")
def pycoco_meteor():
  m = PycocoMeteor()
  yield m
  m.__del__()  # pycocoevalcap's only way to end its process


def _pycocoevalcap(predictions, references, meteor):
  """The reference: what COCOEvalCap.evaluate does (without SPICE)."""
  tokenizer = PTBTokenizer()
  gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
  res = tokenizer.tokenize({k: [{"caption": v}] for k, v in predictions.items()})
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  meteor_score, _ = meteor.compute_score(gts, res)
  rouge, _ = Rouge().compute_score(gts, res)
  cider, _ = Cider().compute_score(gts, res)
  return {"BLEU-1": bleu[0], "BLEU-2": bleu[1], "BLEU-3": bleu[2], "BLEU-4": bleu[3],
          "METEOR": meteor_score, "ROUGE-L": rouge, "CIDEr": cider}


def test_equals_pycocoevalcap(meteor, pycoco_meteor):
  ours = captioning.score(PREDICTIONS, REFERENCES, meteor=meteor)
  reference = _pycocoevalcap(PREDICTIONS, REFERENCES, pycoco_meteor)
  assert set(ours) == set(captioning.METRICS) | {"SPICE"}
  assert ours["SPICE"] is None and "SPICE" in captioning.UNAVAILABLE
  for name in captioning.METRICS:
    assert ours[name] == reference[name], name  # same code on the same tokens: exactly equal
  assert 0 < ours["BLEU-1"] < 1 and ours["CIDEr"] > 0


def test_equals_pycocoevalcap_on_subsets(meteor, pycoco_meteor):
  # CIDEr's idf and BLEU's corpus statistics depend on the set; check a few other sets too.
  for keys in ([101, 102, 104], [103, 105, "e0"], [108], [106, 107, 108, "e1"]):
    preds = {k: PREDICTIONS[k] for k in keys}
    refs = {k: REFERENCES[k] for k in keys}
    ours = captioning.score(preds, refs, meteor=meteor)
    reference = _pycocoevalcap(preds, refs, pycoco_meteor)
    for name in captioning.METRICS:
      assert ours[name] == reference[name], (keys, name)


def test_empty_prediction_is_scored_not_dropped(meteor):
  corpus, per_id = captioning.score_details(PREDICTIONS, REFERENCES, meteor=meteor)
  assert set(per_id) == set(PREDICTIONS)
  for key in ("e0", 105, "e1", 103):  # 103 is "...", empty after tokenization
    assert per_id[key]["METEOR"] == 0.0
    assert per_id[key]["ROUGE-L"] == 0.0
    assert per_id[key]["CIDEr"] == 0.0
    assert per_id[key]["BLEU-1"] < 1e-6
  # Dropping the empty predictions would raise every score (no brevity penalty, fewer zeros).
  kept = [k for k in PREDICTIONS if PREDICTIONS[k].strip(". ")]
  dropped = captioning.score({k: PREDICTIONS[k] for k in kept}, {k: REFERENCES[k] for k in kept}, meteor=meteor)
  for name in ("BLEU-1", "METEOR", "ROUGE-L"):
    assert corpus[name] < dropped[name], name


def test_all_empty_predictions_score_zero(meteor):
  preds = {k: "" for k in REFERENCES}
  result = captioning.score(preds, REFERENCES, meteor=meteor)
  for name in captioning.METRICS:
    assert result[name] == 0.0, name


def test_perfect_prediction(meteor):
  refs = {1: ["a dog runs on the grass"], 2: ["two cats sleep on a red sofa"], 3: ["a man rides a horse"]}
  preds = {k: v[0] for k, v in refs.items()}
  result = captioning.score(preds, refs, meteor=meteor)
  for n in range(1, 5):
    assert math.isclose(result[f"BLEU-{n}"], 1.0, rel_tol=1e-6)
  assert result["ROUGE-L"] == 1.0
  assert result["METEOR"] > 0.9


def test_line_breaks_inside_captions_do_not_misalign(meteor):
  # pycocoevalcap only replaces '\n'; the PTB tokenizer also splits lines at most of these.
  seps = ("\r", "\r\n", "\u2028", "\x0b", "\x0c", "\u2029", "\x85")
  preds, spaced, refs = {}, {}, {}
  for i, sep in enumerate(seps):
    preds[i], spaced[i], refs[i] = f"a dog{sep}runs", "a dog runs", ["a dog is running", "dog"]
    preds[f"only{i}"], spaced[f"only{i}"], refs[f"only{i}"] = sep, "", ["nothing here"]
  preds["cat"], spaced["cat"], refs["cat"] = "a cat", "a cat", ["a cat sits"]
  ours, per_id = captioning.score_details(preds, refs, meteor=meteor)
  assert (ours, per_id) == captioning.score_details(spaced, refs, meteor=meteor)
  assert per_id["cat"]["ROUGE-L"] > 0 and all(per_id[i]["ROUGE-L"] > 0 for i in range(len(seps)))


def test_meteor_protocol_survives_separators_in_text(meteor):
  gts = {1: ["a dog ||| runs", "a dog\nruns"], 2: ["a cat"]}
  res = {1: ["a ||| dog\nruns"], 2: ["a cat"]}
  score, per_id = meteor.compute_score(gts, res)
  assert len(per_id) == 2 and per_id[1] > 0.5 and 0 <= score <= 1
  # The process is still in sync afterwards.
  assert meteor.compute_score({1: ["a cat"]}, {1: ["a cat"]})[0] == 1.0


def _fake_meteor(command, **kwargs):
  """A Meteor whose subprocess is `command` instead of the jar (exercises the process handling)."""
  return captioning.Meteor(command=command, **kwargs)


# Speaks METEOR's stdio protocol: a stats line per SCORE line; per-segment scores and the corpus
# score after an EVAL line. Lets the tests below run without the jar's start-up.
FAKE_METEOR = """
import sys
for line in sys.stdin:
  if line.startswith("SCORE"):
    print("1.0 2.0", flush=True)
  elif line.startswith("EVAL"):
    for _ in range(line.count("|||") + 1):
      print("0.5", flush=True)
"""


def test_score_closes_the_meteor_it_starts(monkeypatch):
  started = []

  class Recording(captioning.Meteor):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, command=[sys.executable, "-c", FAKE_METEOR], **kwargs)
      started.append(self)

  monkeypatch.setattr(captioning, "Meteor", Recording)
  result = captioning.score({1: "a dog runs", 2: ""}, {1: ["a dog is running"], 2: ["a cat"]})
  assert result["METEOR"] == 0.5
  assert len(started) == 1 and started[0]._proc.poll() is not None


def test_close_ends_the_process_and_is_idempotent():
  m = _fake_meteor(["cat"])  # lingers until its stdin closes, like the jar
  assert m.pid in _java_children("cat")
  m.close()
  m.close()
  assert m._proc.poll() is not None and m.pid not in _java_children("cat")
  with pytest.raises(RuntimeError, match="closed"):
    m.compute_score({1: ["a"]}, {1: ["a"]})


def test_context_manager_and_garbage_collection_close():
  with _fake_meteor(["cat"]) as m:
    proc = m._proc
  assert proc.poll() is not None
  m = _fake_meteor(["cat"])
  proc = m._proc
  del m
  import gc
  gc.collect()
  assert proc.poll() is not None


def test_hung_process_times_out_and_is_killed():
  m = _fake_meteor(["sleep", "1000"], timeout=0.5, close_timeout=0.5)  # never answers
  with pytest.raises(TimeoutError):
    m.compute_score({1: ["a dog"]}, {1: ["a dog"]})
  assert m._proc.poll() is not None  # killed, not leaked


def test_dead_process_raises_instead_of_hanging():
  m = _fake_meteor(["true"], timeout=30)  # exits at once
  with pytest.raises(RuntimeError, match="exited early|died"):
    m.compute_score({1: ["a dog"]}, {1: ["a dog"]})
  assert m._proc.poll() is not None


def test_tokenizer_matches_pycocoevalcap():
  captions = {k: [v] + REFERENCES[k] for k, v in PREDICTIONS.items()}
  ours = captioning.ptb_tokenize(captions)
  reference = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
  assert ours == reference


def test_mismatched_ids_are_named():
  with pytest.raises(ValueError, match=r"missing from predictions: \[3\].*missing from references: \['x'\]"):
    captioning.score({1: "a", 2: "b", "x": "c"}, {1: ["a"], 2: ["b"], 3: ["c"]})


@pytest.mark.parametrize("preds,refs,error", [
    ({1: ["a dog"]}, {1: ["a dog"]}, TypeError),
    ({1: "a dog"}, {1: "a dog"}, TypeError),
    ({1: "a dog"}, {1: []}, ValueError),
    ({}, {}, ValueError),
])
def test_bad_input(preds, refs, error):
  with pytest.raises(error):
    captioning.score(preds, refs)


@pytest.mark.parametrize("text,fromage,first", [
    ("A dog runs on the grass. Then it sleeps.", "A dog runs on the grass.", "A dog runs on the grass"),
    ("  a dog\nQ: what is it?", "a dog", "a dog"),
    ("a dog. a cat\nmore", "a dog. a cat", "a dog"),  # FROMAGe's code: a newline wins over a period
    ("no delimiter at all  ", "no delimiter at all", "no delimiter at all"),
    ("", "", ""),
    (".", ".", ""),
    ("\n", "", ""),
])
def test_cut_caption(text, fromage, first):
  assert captioning.cut_caption(text) == fromage
  assert captioning.cut_caption(text, rule="first") == first


def test_cut_caption_rejects_unknown_rule():
  with pytest.raises(ValueError, match="rule"):
    captioning.cut_caption("a", rule="nope")
