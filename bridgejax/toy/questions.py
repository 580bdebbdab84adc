"""The toy world's questions: VQAv2-style questions with ten "human" answers, and VisDial-style
dialogs with candidate answers and dense relevance, from one pool of questions per scene.

    vqa(scene, np.random.default_rng(0))          # 5 questions: {question, answers [10], ...}
    dialog(scene, rng, caption_text)              # {caption, rounds [10], dense_*}
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from bridgejax.toy.scene import (BACKGROUNDS, COLORS, KINDS, NUMBER_WORDS, PLURAL, RELATIONS, SIZE_WORDS, SIZES,
                                 Scene)
from bridgejax.toy.words import _a, _pick, position_phrases, reference, relation


# --- Questions -----------------------------------------------------------------------------------
# A question knows its true meaning and every way to say it, so that the ten "human" answers,
# the VisDial candidates and their relevance all follow from one place.

@dataclasses.dataclass
class Question:
  text: str                    # with "{R}" where the main referent goes
  ref: str | None              # "the red circle"; None if the question has no main referent
  subject: int | None          # index of the shape referred to, for "it" in dialogs
  answer_type: str             # "yes/no" | "number" | "other"
  question_type: str           # the VQAv2-style prefix ("is there a", "how many", ...)
  answers: tuple[str, ...]     # correct answers, canonical (shortest) first
  wrong: tuple[str, ...]       # plausible wrong answers (same kind of answer)

  def render(self, pronoun: bool = False) -> str:
    return self.text.replace("{R}", "it" if pronoun else (self.ref or ""))


def _yes_no(truth: bool, there: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
  yes = ("yes", "yeah", "yes there is" if there else "yes it is", "yep")
  no = ("no", "nope", "no there is not" if there else "no it is not", "no it isn't")
  return (yes, no) if truth else (no, yes)


def _number(n: int) -> tuple[str, ...]:
  return (str(n), NUMBER_WORDS[n], f"{n} shapes" if n != 1 else "1 shape")


def _other_shapes(rng, exclude: str, k: int = 3) -> tuple[str, ...]:
  return tuple(str(x) for x in rng.permutation([x for x in KINDS if x != exclude])[:k])


def _other_colors(rng, exclude: str, k: int = 3) -> tuple[str, ...]:
  return tuple(str(x) for x in rng.permutation([x for x in COLORS if x != exclude])[:k])


def question_pool(scene: Scene, rng: np.random.Generator) -> list[Question]:
  """Every question the generator can ask about this scene (several phrasings each)."""
  qs: list[Question] = []
  shapes, n = scene.shapes, len(scene.shapes)
  present = {(s.color, s.kind) for s in shapes}
  # yes/no: existence, half of them false
  s = shapes[int(rng.integers(n))]
  fake_color = (str(rng.choice(_other_colors(rng, s.color))), s.kind)
  for color, kind in ((s.color, s.kind), fake_color):
    truth = (color, kind) in present
    yes, no = _yes_no(truth, there=True)
    text = _pick(rng, ("is there {a} {c} {k}?", "do you see {a} {c} {k}?", "can you see {a} {c} {k}?",
                       "is there any {c} {k} in the picture?"))
    art = "an" if color[0] in "aeiou" else "a"
    qs.append(Question(text.format(a=art, c=color, k=kind), None, None, "yes/no",
                       "is there a" if text.startswith("is there") else text.split(" {")[0], yes, no))
  absent = [k for k in KINDS if k not in {x.kind for x in shapes}]
  if absent:
    k = str(rng.choice(absent))
    yes, no = _yes_no(False, there=True)
    qs.append(Question(f"are there any {PLURAL[k]}?", None, None, "yes/no", "are there", yes, no))
  bg = str(rng.choice(list(BACKGROUNDS)))
  qs.append(Question(f"is the background {bg}?", None, None, "yes/no", "is the",
                     *_yes_no(bg == scene.background)))
  # attribute and relation questions about shapes with a unique description
  for i, s in enumerate(shapes):
    ref = reference(scene, i)
    if ref is None:
      continue
    color = s.color if rng.random() < 0.5 else str(rng.choice(_other_colors(rng, s.color)))
    qs.append(Question(f"is {{R}} {color}?", ref, i, "yes/no", "is the", *_yes_no(color == s.color)))
    size = str(rng.choice(SIZES))
    qs.append(Question(f"is {{R}} {_pick(rng, SIZE_WORDS[size])}?", ref, i, "yes/no", "is the",
                       *_yes_no(size == s.size)))
    if (cref := reference(scene, i, without="color")) is not None:
      qs.append(Question(_pick(rng, ("what color is {R}?", "what is the color of {R}?",
                                     "which color does {R} have?")), cref, i, "other",
                         "what color is the", (s.color, f"it is {s.color}", f"{s.color} color"),
                         _other_colors(rng, s.color)))
    if (kref := reference(scene, i, without="kind")) is not None:
      qs.append(Question(_pick(rng, ("what shape is {R}?", "what kind of shape is {R}?")), kref, i,
                         "other", "what shape is the", (s.kind, f"a {s.kind}", f"it is a {s.kind}"),
                         _other_shapes(rng, s.kind)))
    if (sref := reference(scene, i, without="size")) is not None:
      qs.append(Question(_pick(rng, ("what size is {R}?", "is {R} big or small?")), sref, i, "other",
                         "what size is the", SIZE_WORDS[s.size] + (f"it is {s.size}",),
                         SIZE_WORDS["big" if s.size == "small" else "small"]))
    where = position_phrases(s.row, s.col)
    wrong_cells = [(r, c) for r in range(3) for c in range(3) if (r, c) != (s.row, s.col)]
    qs.append(Question(_pick(rng, ("where is {R}?", "where is {R} located?")), ref, i, "other",
                       "where is the", where,
                       tuple(position_phrases(*wrong_cells[j])[0] for j in rng.permutation(8)[:3])))
    for j, t in enumerate(shapes):
      tref = reference(scene, j)
      if j == i or tref is None:
        continue
      rel = str(rng.choice(list(RELATIONS)))
      qs.append(Question(f"is {{R}} {_pick(rng, RELATIONS[rel])} {tref}?", ref, i, "yes/no", "is the",
                         *_yes_no(rel in relation(s, t))))
      # "what is above the blue square?" when exactly one shape is
      for rel in relation(s, t):
        if sum(rel in relation(u, t) for u in shapes) == 1:
          obj = (f"{s.color} {s.kind}", _a(f"{s.color} {s.kind}"), s.kind)
          wrong = (f"{t.color} {t.kind}",) + tuple(f"{c} {s.kind}" for c in _other_colors(rng, s.color, 2))
          qs.append(Question(f"what is {_pick(rng, RELATIONS[rel])} {tref}?", None, None, "other",
                             "what is", obj, wrong))
  # numbers
  qs.append(Question(_pick(rng, ("how many shapes are there?", "how many shapes are in the image?",
                                 "how many objects are there?")), None, None, "number", "how many",
                     _number(n), tuple(str(k) for k in range(1, 4) if k != n)))
  for attr, value in (("kind", str(rng.choice([s.kind for s in shapes] + list(KINDS[:2])))),
                      ("color", str(rng.choice([s.color for s in shapes] + ["red", "blue"])))):
    count = sum(getattr(s, attr) == value for s in shapes)
    what = PLURAL[value] if attr == "kind" else f"{value} shapes"
    qs.append(Question(f"how many {what} are there?", None, None, "number", "how many",
                       _number(count), tuple(str(k) for k in range(0, 4) if k != count)))
  return qs


def _human_answers(rng: np.random.Generator, q: Question, n: int = 10) -> list[str]:
  """Ten annotators: most give the short answer, some paraphrase, a few get it wrong."""
  out = []
  for _ in range(n):
    u = rng.random()
    if u < 0.7 or len(q.answers) == 1:
      out.append(q.answers[0])
    elif u < 0.95:
      out.append(_pick(rng, q.answers[1:]))
    else:
      out.append(_pick(rng, q.wrong))
  return out


def vqa(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[dict[str, Any]]:
  """n distinct VQAv2-style questions, about 38% yes/no, 12% number, 50% other (VQAv2's mix)."""
  pool = question_pool(scene, rng)
  by_type = {t: [q for q in pool if q.answer_type == t] for t in ("yes/no", "number", "other")}
  out, seen = [], set()
  # Mostly drawn by type; if the draws keep hitting asked questions, the rest of the pool fills in.
  draws = [by_type[t][int(rng.integers(len(by_type[t])))]
           for t in rng.choice(list(by_type), size=6 * n, p=[0.38, 0.12, 0.50]) if by_type[t]]
  for q in draws + [pool[j] for j in rng.permutation(len(pool))]:
    text = q.render()
    if text in seen:
      continue
    seen.add(text)
    answers = _human_answers(rng, q)
    counts = {a: answers.count(a) for a in answers}
    out.append({"question": text[0].upper() + text[1:], "question_type": q.question_type,
                "answer_type": q.answer_type, "answers": answers,
                "multiple_choice_answer": max(counts, key=lambda a: (counts[a], a == q.answers[0]))})
    if len(out) == n:
      break
  return out


def _all_answers() -> list[str]:
  """Every answer string the world can produce: the pool VisDial candidates are drawn from."""
  pool = ["yes", "yeah", "yep", "yes it is", "yes there is", "no", "nope", "no it is not",
          "no it isn't", "no there is not"]
  for k in range(4):
    pool += _number(k)
  for c in COLORS:
    pool += [c, f"it is {c}", f"{c} color"] + [f"{c} {k}" for k in KINDS]
  for k in KINDS:
    pool += [k, f"a {k}", f"it is a {k}"]
  pool += [w for words in SIZE_WORDS.values() for w in words] + ["it is small", "it is big"]
  pool += [p for r in range(3) for c in range(3) for p in position_phrases(r, c)]
  return list(dict.fromkeys(pool))


_ANSWER_POOL = _all_answers()


_FAMILIES = ({"yes", "yeah", "yep"}, {"no", "nope"})


def _overlaps(candidate: str, answers: tuple[str, ...]) -> bool:
  """Whether a candidate says (part of) a correct answer: such a candidate is never offered as
  a wrong option, so a dialog's candidates are right or wrong, never in between."""
  c = f" {candidate} "
  for a in answers:
    if f" {a} " in c or c in f" {a} ":
      return True
  first = candidate.split()[0]
  return any(first in fam and answers[0] in fam for fam in _FAMILIES)


@functools.lru_cache(maxsize=4096)
def _wrong_pool(answers: tuple[str, ...]) -> tuple[str, ...]:
  return tuple(a for a in _ANSWER_POOL if not _overlaps(a, answers))


def dialog(scene: Scene, rng: np.random.Generator, caption_text: str, *, rounds: int = 10,
           options: int = 100) -> dict[str, Any]:
  """A VisDial-style dialog: lowercase questions without "?" (as VisDial stores them), "it" for
  the shape talked about just before, and `options` candidate answers per round with the truth
  at gt_index; one round has dense relevance (1 for every correct candidate, 0 otherwise)."""
  pool = question_pool(scene, rng)
  order = rng.permutation(len(pool))
  out, seen, previous_subject = [], set(), None
  for j in order:
    q = pool[j]
    pronoun = q.ref is not None and q.subject == previous_subject and rng.random() < 0.6
    text = q.render(pronoun).rstrip("?")
    if text in seen:
      continue
    seen.add(text)
    previous_subject = q.subject
    truth = _pick(rng, q.answers)
    correct = set(q.answers)
    paraphrases = [a for a in q.answers if a != truth][: int(rng.integers(0, 3))]
    plausible = [a for a in dict.fromkeys(q.wrong) if not _overlaps(a, q.answers)]
    rest = [a for a in _wrong_pool(q.answers) if a not in plausible]
    fill = [rest[k] for k in rng.permutation(len(rest))[: options - 1 - len(paraphrases) - len(plausible)]]
    cands = [truth] + paraphrases + plausible + fill
    cands = [cands[k] for k in rng.permutation(len(cands))]
    out.append({"question": text, "answer": truth, "options": cands, "gt_index": cands.index(truth),
                "relevance": [1.0 if c in correct else 0.0 for c in cands]})
    if len(out) == rounds:
      break
  dense = int(rng.integers(len(out)))
  relevance = out[dense]["relevance"]
  for r in out:
    del r["relevance"]
  return {"caption": caption_text, "rounds": out, "dense_round_index": dense,
          "dense_relevance": relevance}
