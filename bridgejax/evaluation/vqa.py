r"""VQA accuracy, equal to the official VQA evaluation script (GT-Vision-Lab/VQA,
PythonEvaluationTools/vqaEvaluation/vqaEval.py; tables copied verbatim and checked equal).

The official procedure for one question (master, commit a013f00 "Fixed processing answers bug", 2021),
`processing="official"` here:
  * predicted and human answers: '\n' and '\t' -> ' ', strip;
  * only if the humans do not all agree (`len(set(answers)) > 1`), both the human answers and the
    prediction go through `processPunctuation` then `processDigitArticle` (lowercase, split on
    whitespace, number words -> digits through `MANUAL_MAP`, drop the articles a/an/the, restore
    apostrophes through `CONTRACTIONS`) = `normalize_answer`. When all humans gave the same answer
    nothing is normalised and the comparison is exact: "Yes" or "yes." do not match ten "yes";
  * accuracy = mean over the leave-one-human-out subsets of min(#matching humans in the subset / 3, 1).

`processing="legacy"` is the script before that fix (commit c4e6a0e, 2017; the copy in LAVIS and
many VLM code bases): the prediction is always normalised; the human answers only get
`processPunctuation`, and only when they disagree.

Quirks kept on purpose because the official numbers contain them: `PERIOD_STRIP`'s lookbehind is
mistyped as a lookahead (`(?!<=\d)`), and its `sub` is passed `re.UNICODE` (= 32) as `count`, so at
most 32 periods are removed; the punctuation rule checks the *input* text for "p " / " p" / digit,digit
when deciding between deleting a mark and replacing it by a space.

Scale: accuracies are fractions in [0, 1], unrounded (the official script reports
round(100 * mean, 2); multiply by 100 to compare).
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence

from bridgejax.errors import UserError
from bridgejax.evaluation import check_same_ids

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've",
    "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've",
    "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
              "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
PUNCT = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")

ANSWER_TYPES = ("yes/no", "number", "other")


def process_punctuation(text: str) -> str:
  """The official `processPunctuation`."""
  out = text
  for p in PUNCT:
    if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return PERIOD_STRIP.sub("", out, 32)  # the official passes re.UNICODE (= 32) as `count`


def process_digit_article(text: str) -> str:
  """The official `processDigitArticle`."""
  words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in ARTICLES]
  return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(answer: str) -> str:
  """The official full processing of an answer: newline/tab -> space, strip, `process_punctuation`,
  `process_digit_article`. (Whether `accuracy` applies it depends on the answers; see above.)"""
  return process_digit_article(process_punctuation(_clean(answer)))


def _check_answers(human_answers: Sequence[str]) -> None:
  if isinstance(human_answers, str) or not all(isinstance(a, str) for a in human_answers):
    raise TypeError(f"human answers must be a list of str, got {human_answers!r}")
  if len(human_answers) < 2:
    raise ValueError(f"the leave-one-out VQA accuracy needs at least 2 human answers (VQAv2 has 10), "
                     f"got {len(human_answers)}")


def _clean(answer: str) -> str:
  return answer.replace("\n", " ").replace("\t", " ").strip()


def accuracy(prediction: str, human_answers: Sequence[str], *, processing: str = "official") -> float:
  """Official VQA accuracy of one predicted answer against the human answers (10 in VQAv2).

  Mean over the len(human_answers) subsets that leave one human out of min(#matches / 3, 1); with
  10 humans, m matching answers give (10 - m) / 10 * min(m / 3, 1) + m / 10 * min((m - 1) / 3, 1),
  e.g. 0.3 for m=1, 0.6 for m=2, 0.9 for m=3, 1.0 for m>=4. `processing`: "official" (the current
  script) or "legacy" (before 2021); see the module docstring for when answers are normalised.
  """
  _check_answers(human_answers)
  if processing == "official":
    predicted, humans = _clean(prediction), [_clean(a) for a in human_answers]
    if len(set(humans)) > 1:
      predicted, humans = normalize_answer(predicted), [normalize_answer(a) for a in humans]
  elif processing == "legacy":
    predicted, humans = normalize_answer(prediction), list(human_answers)
    if len(set(humans)) > 1:
      humans = [process_punctuation(a) for a in humans]
  else:
    raise UserError(f"unknown processing {processing!r}; use 'official' or 'legacy'")
  matches = sum(a == predicted for a in humans)
  total = 0.0
  for a in humans:  # leave this human out: the other humans match `matches - (a matched)` times
    total += min(1.0, (matches - (a == predicted)) / 3)
  return total / len(humans)


def truncate_to_reference_length(prediction: str, human_answers: Sequence[str]) -> str:
  """FROMAGe's VQA post-processing: keep the first n whitespace-separated words of the generation,
  n = the word count of the longest human answer (words of the raw answers, split on whitespace)."""
  _check_answers(human_answers)
  n = max(len(a.split()) for a in human_answers)
  return " ".join(prediction.split()[:n])


def score(predictions: Mapping[Hashable, str], questions: Mapping[Hashable, Mapping], *,
          processing: str = "official") -> dict[str, float | None]:
  """Official VQA accuracy over a set of questions.

  predictions: {question_id: predicted answer (already truncated if the protocol asks for it)}.
  questions: {question_id: {"answers": [10 human answers as str], "answer_type": "yes/no" | "number"
  | "other"}} (VQAv2's annotation records work once their answer dicts are reduced to strings).
  processing: "official" or "legacy", as in `accuracy`.
  Returns {"overall", "yes/no", "number", "other"} (+ any other answer type present): mean accuracy,
  0-1 scale, unrounded; an answer type with no questions is None.
  """
  check_same_ids(predictions, questions, ("predictions", "questions"))
  if not predictions:
    raise ValueError("no predictions to score")
  per_type: dict[str, list[float]] = {t: [] for t in ANSWER_TYPES}
  overall = []
  for qid, question in questions.items():
    if "answers" not in question or "answer_type" not in question:
      raise ValueError(f"question {qid!r} needs 'answers' and 'answer_type'; it has {sorted(question)}")
    prediction = predictions[qid]
    if not isinstance(prediction, str):
      raise TypeError(f"prediction for question {qid!r} is a {type(prediction).__name__}, not a str")
    acc = accuracy(prediction, question["answers"], processing=processing)
    overall.append(acc)
    per_type.setdefault(question["answer_type"], []).append(acc)
  result: dict[str, float | None] = {"overall": sum(overall) / len(overall)}
  for answer_type, accs in per_type.items():
    result[answer_type] = sum(accs) / len(accs) if accs else None
  return result
