"""The toy world: small images of coloured shapes with true captions, questions and dialogs.

Pure and deterministic: everything about example `i` of a split comes from
np.random.default_rng((seed, split, i, purpose)), so any example can be made alone (random
access, parallel generation) and the same seed gives the same bytes.

A scene is 1-3 shapes (7 kinds, 8 colours, 2 sizes) in distinct cells of a 3x3 grid on one of
4 backgrounds. The grid makes every statement decidable at a glance: A is "above" B iff A's row
is higher, "to the left of" iff its column is; "in the top left corner" names the cell. Shapes
get a little position, size, rotation and colour jitter so that a model must learn the
categories, not the pixels. Text never says anything the image does not show.

    ex = example("val", 12)        # {"id", "image" (PNG bytes), "captions" [5], "questions" [5],
                                   #  "dialog" {caption, rounds [10], dense_*}, "scene"}
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 112
_SS = 2  # drawn at 2x and box-downsampled: anti-aliased edges at a small cost

KINDS = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon")
PLURAL = {k: k + "s" for k in KINDS} | {"cross": "crosses"}
COLORS = {"red": (215, 40, 40), "orange": (240, 135, 20), "yellow": (235, 215, 40),
          "green": (40, 165, 60), "blue": (45, 85, 215), "purple": (135, 60, 185),
          "pink": (240, 130, 185), "brown": (125, 80, 40)}
SIZES = ("small", "big")
SIZE_WORDS = {"small": ("small", "little", "tiny"), "big": ("big", "large")}
BACKGROUNDS = {"white": (242, 242, 242), "gray": (128, 128, 128), "black": (22, 22, 22),
               "checkered": None}
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
RELATIONS = {"above": ("above", "over"), "below": ("below", "under", "beneath"),
             "left": ("to the left of", "left of"), "right": ("to the right of", "right of")}
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
SPLITS = {"train": 0, "val": 1, "test": 2}
_CAPTION, _SCENE, _QUESTIONS, _DIALOG = 1, 0, 2, 3


@dataclasses.dataclass(frozen=True)
class Shape:
  kind: str
  color: str
  size: str
  row: int
  col: int
  cx: float      # centre and radius in pixels of the IMAGE_SIZE image
  cy: float
  radius: float
  angle: float   # degrees
  rgb: tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Scene:
  background: str
  shapes: tuple[Shape, ...]

  def to_dict(self) -> dict[str, Any]:
    return {"background": self.background,
            "shapes": [{"kind": s.kind, "color": s.color, "size": s.size, "row": s.row, "col": s.col}
                       for s in self.shapes]}


def rng_for(split: str, index: int, purpose: int, seed: int = 0) -> np.random.Generator:
  if split not in SPLITS:
    raise ValueError(f"unknown toy split {split!r}; one of {list(SPLITS)}")
  return np.random.default_rng((seed, SPLITS[split], index, purpose))


# --- Scenes and pixels ---------------------------------------------------------------------------

def make_scene(rng: np.random.Generator) -> Scene:
  n = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
  cells = rng.choice(9, size=n, replace=False)
  background = str(rng.choice(list(BACKGROUNDS)))
  cell = IMAGE_SIZE / 3
  shapes = []
  for i, c in enumerate(cells):
    kind, color = str(rng.choice(KINDS)), str(rng.choice(list(COLORS)))
    if i and rng.random() < 0.3:  # repeat a kind or colour now and then: counting gets interesting
      other = shapes[int(rng.integers(i))]
      kind, color = (other.kind, color) if rng.random() < 0.5 else (kind, other.color)
    size = str(rng.choice(SIZES))
    radius = rng.uniform(8.0, 10.0) if size == "small" else rng.uniform(14.0, 16.0)
    row, col = divmod(int(c), 3)
    slack = cell / 2 - radius - 1.5
    cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
    cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
    rgb = tuple(min(255, max(0, v + int(j))) for v, j in zip(COLORS[color], rng.integers(-12, 13, 3)))
    shapes.append(Shape(kind, color, size, row, col, float(cx), float(cy), float(radius),
                        float(rng.uniform(-10, 10)), rgb))
  return Scene(background, tuple(shapes))


def _polygon(kind: str, r: float) -> list[tuple[float, float]]:
  """Unit shapes (pointing up), scaled so that all kinds look about equally large."""
  ring = lambda n, rad, start=-90: [(rad * math.cos(math.radians(start + 360 * k / n)),
                                     rad * math.sin(math.radians(start + 360 * k / n))) for k in range(n)]
  if kind == "square":
    s = 0.82 * r
    return [(-s, -s), (s, -s), (s, s), (-s, s)]
  if kind == "triangle":
    return [(x, y + 0.15 * r) for x, y in ring(3, 1.15 * r)]
  if kind == "star":
    outer, inner = ring(5, 1.15 * r), ring(5, 0.47 * r, start=-54)
    return [p for pair in zip(outer, inner) for p in pair]
  if kind == "cross":
    a, w = r, 0.34 * r
    return [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w),
            (-a, -w), (-w, -w)]
  if kind == "diamond":
    return [(0, -1.1 * r), (0.78 * r, 0), (0, 1.1 * r), (-0.78 * r, 0)]
  if kind == "hexagon":
    return ring(6, r, start=0)
  raise ValueError(f"no polygon for {kind!r}")


@functools.cache
def _checkered() -> Image.Image:
  size = IMAGE_SIZE * _SS
  checks = np.add.outer(np.arange(size) // (14 * _SS), np.arange(size) // (14 * _SS)) % 2
  return Image.fromarray(np.where(checks[..., None] == 1, 222, 178).repeat(3, -1).astype(np.uint8))


def _draw(draw: ImageDraw.ImageDraw, s: Shape, fill) -> None:
  """Draws shape s at _SS times IMAGE_SIZE, filled with `fill`."""
  cx, cy, r = s.cx * _SS, s.cy * _SS, s.radius * _SS
  if s.kind == "circle":
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    return
  t = math.radians(s.angle)
  pts = [(cx + x * math.cos(t) - y * math.sin(t), cy + x * math.sin(t) + y * math.cos(t))
         for x, y in _polygon(s.kind, r)]
  draw.polygon(pts, fill=fill)


def render(scene: Scene) -> Image.Image:
  size = IMAGE_SIZE * _SS
  if scene.background == "checkered":
    image = _checkered().copy()
  else:
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
  draw = ImageDraw.Draw(image)
  for s in scene.shapes:
    _draw(draw, s, s.rgb)
  return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def shape_coverage(scene: Scene, grid: int) -> np.ndarray:
  """(len(shapes) + 1, grid, grid): the fraction of each cell of a grid x grid partition of the
  image that each shape covers (index 0: the background), from the same drawing as `render`."""
  size = IMAGE_SIZE * _SS
  ids = Image.new("L", (size, size), 0)
  draw = ImageDraw.Draw(ids)
  for i, s in enumerate(scene.shapes):  # later shapes cover earlier ones, as in render
    _draw(draw, s, i + 1)
  ids = np.asarray(ids)
  step = size // grid
  onehot = ids[..., None] == np.arange(len(scene.shapes) + 1)  # (size, size, K)
  return onehot.reshape(grid, step, grid, step, -1).mean(axis=(1, 3)).transpose(2, 0, 1)


def png_bytes(image: Image.Image) -> bytes:
  out = io.BytesIO()
  image.save(out, "PNG", compress_level=1)  # 3x faster than the default, files ~20% larger
  return out.getvalue()


# --- Words ---------------------------------------------------------------------------------------

def _a(phrase: str) -> str:
  return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _pick(rng: np.random.Generator, options):
  return options[int(rng.integers(len(options)))]


def position_phrases(row: int, col: int) -> tuple[str, ...]:
  """Ways to say where a cell is: short answer first."""
  if (row, col) == (1, 1):
    return ("center", "in the center", "in the middle", "middle")
  if row == 1:
    return (COLS[col], f"on the {COLS[col]}", f"on the {COLS[col]} side")
  if col == 1:
    return (ROWS[row], f"at the {ROWS[row]}", f"{ROWS[row]} middle")
  corner = f"{ROWS[row]} {COLS[col]}"
  return (corner, f"in the {corner} corner", f"{corner} corner")


def _where(rng: np.random.Generator, s: Shape) -> str:
  """A prepositional position phrase for captions ("in the top left corner", "on the left")."""
  return _pick(rng, [p for p in position_phrases(s.row, s.col) if p.split()[0] in ("in", "on", "at")])


def noun_phrase(rng: np.random.Generator, s: Shape, *, p_size: float = 0.6, p_color: float = 0.9) -> str:
  words = []
  if rng.random() < p_size:
    words.append(_pick(rng, SIZE_WORDS[s.size]))
  if rng.random() < p_color:
    words.append(s.color)
  return " ".join(words + [s.kind])


def relation(a: Shape, b: Shape) -> list[str]:
  """The relations that hold of a with respect to b."""
  out = []
  if a.row < b.row:
    out.append("above")
  if a.row > b.row:
    out.append("below")
  if a.col < b.col:
    out.append("left")
  if a.col > b.col:
    out.append("right")
  return out


def _matches(s: Shape, attrs: dict[str, str]) -> bool:
  return all(getattr(s, k) == v for k, v in attrs.items())


def reference(scene: Scene, i: int, without: str | None = None) -> str | None:
  """The shortest definite description that picks out shape i alone ("the red circle"), not
  using attribute `without`; None if none does (two identical shapes)."""
  s = scene.shapes[i]
  for keys in (("kind",), ("color", "kind"), ("size", "kind"), ("size", "color", "kind"),
               ("color",), ("size",), ("size", "color")):
    if without in keys:
      continue
    attrs = {k: getattr(s, k) for k in keys}
    if sum(_matches(t, attrs) for t in scene.shapes) == 1:
      words = [attrs[k] for k in ("size", "color") if k in attrs]
      return "the " + " ".join(words + [attrs.get("kind", "shape")])
  return None


def _group_list(rng: np.random.Generator, scene: Scene) -> str:
  """'two red circles and a small blue star': identical (colour, kind) shapes counted together."""
  groups: dict[tuple[str, str], list[Shape]] = {}
  for s in scene.shapes:
    groups.setdefault((s.color, s.kind), []).append(s)
  parts = []
  for (color, kind), members in groups.items():
    if len(members) == 1:
      parts.append(_a(noun_phrase(rng, members[0])))
    else:
      parts.append(f"{NUMBER_WORDS[len(members)]} {color} {PLURAL[kind]}")
  return _join(parts)


def _join(parts: list[str]) -> str:
  return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(rng: np.random.Generator, scene: Scene) -> str:
  """One true caption, from one of several templates and paraphrases."""
  shapes, n = scene.shapes, len(scene.shapes)
  bg = f"on a {scene.background} background"
  prefix = _pick(rng, ("", "", "", "a picture of ", "an image of ", "a drawing of ", "there is ",
                       "we can see ", "this image shows "))
  order = [shapes[i] for i in rng.permutation(n)]
  t = int(rng.integers(4)) if n == 1 else int(rng.integers(6))
  if n == 1:
    s = shapes[0]
    body = [_a(noun_phrase(rng, s)),
            f"{_a(noun_phrase(rng, s))} {_where(rng, s)}",
            f"{_a(noun_phrase(rng, s))} {bg}",
            f"{_pick(rng, ('a single', 'one', 'only one'))} {noun_phrase(rng, s, p_color=1.0)}"][t]
  elif t == 0:
    body = _group_list(rng, scene)
  elif t == 1:
    body = f"{NUMBER_WORDS[n]} shapes: {_join([_a(noun_phrase(rng, s)) for s in order])}"
  elif t in (2, 3):  # a relation between two shapes, the third (if any) by position
    a, b = order[0], order[1]
    rel = _pick(rng, relation(a, b))
    if t == 2:
      body = f"{_a(noun_phrase(rng, a))} {_pick(rng, RELATIONS[rel])} {_a(noun_phrase(rng, b))}"
    else:
      inverse = {"above": "below", "below": "above", "left": "right", "right": "left"}[rel]
      body = (f"{_a(noun_phrase(rng, b))} with {_a(noun_phrase(rng, a))} "
              f"{_pick(rng, RELATIONS[rel])} it")
      rel = inverse
    if n == 3:
      c = order[2]
      body += f" and {_a(noun_phrase(rng, c))} {_where(rng, c)}"
  elif t == 4:
    body = _join([f"{_a(noun_phrase(rng, s))} {_where(rng, s)}"
                  for s in order])
  else:
    body = f"{NUMBER_WORDS[n]} shapes {bg}"
    prefix = _pick(rng, ("", "there are ", "we can see "))
  if "background" not in body and rng.random() < 0.25:
    body += f" {bg}"
  if prefix == "there is " and not body.startswith(("a ", "an ", "one ", "only ")):
    prefix = "there are "
  return prefix + body


def captions(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[str]:
  """n distinct captions when the world has that many to say (tries a bounded number of times)."""
  out: list[str] = []
  for _ in range(8 * n):
    c = caption(rng, scene)
    if c not in out:
      out.append(c)
    if len(out) == n:
      break
  while len(out) < n:  # a one-shape scene may have fewer distinct short captions: repeat
    out.append(out[len(out) % max(1, len(out))])
  return out


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


# --- Examples ------------------------------------------------------------------------------------

def scene_of(split: str, index: int, seed: int = 0) -> Scene:
  """The scene of example `index` of `split`."""
  return make_scene(rng_for(split, index, _SCENE, seed))


def example(split: str, index: int, *, seed: int = 0, num_captions: int = 5, num_questions: int = 5,
            dialog_rounds: int = 10, image: bool = True) -> dict[str, Any]:
  """Everything about example `index` of `split`; a pure function of its arguments."""
  scene = scene_of(split, index, seed)
  caps = captions(scene, rng_for(split, index, _CAPTION, seed), num_captions)
  qrng = rng_for(split, index, _QUESTIONS, seed)
  drng = rng_for(split, index, _DIALOG, seed)
  return {"id": f"toy-{split}-{index:06d}", "index": index, "scene": scene.to_dict(),
          "image": png_bytes(render(scene)) if image else None, "captions": caps,
          "questions": vqa(scene, qrng, num_questions) if num_questions else [],
          "dialog": dialog(scene, drng, _pick(drng, caps), rounds=dialog_rounds) if dialog_rounds else None}


def examples(split: str, num: int, *, seed: int = 0, start: int = 0, **kwargs) -> Iterator[dict[str, Any]]:
  for i in range(start, start + num):
    yield example(split, i, seed=seed, **kwargs)


# --- Composed retrieval (Pic2Word's task) --------------------------------------------------------
# A query is a reference image and a modification text; its target is the reference with exactly
# the named attribute changed, everything else (position, size, rotation, colour jitter) equal.

_COMPOSE, _COMPOSE_EDIT = 4, 5
COMPOSE_ATTRIBUTES = {"color": tuple(COLORS), "kind": KINDS, "background": tuple(BACKGROUNDS)}


def modification_text(attribute: str, value: str) -> str:
  """'but blue', 'but a star', 'but on a black background'."""
  return {"color": f"but {value}", "kind": f"but {_a(value)}", "background": f"but on a {value} background"}[attribute]


def edit_scene(scene: Scene, attribute: str, value: str) -> Scene:
  """The scene with its background or its first shape's colour or kind set to `value`, all else equal
  (a new colour keeps the shape's colour jitter)."""
  if attribute == "background":
    return dataclasses.replace(scene, background=value)
  s = scene.shapes[0]
  if attribute == "color":
    jitter = np.subtract(s.rgb, COLORS[s.color])
    s = dataclasses.replace(s, color=value, rgb=tuple(int(min(255, max(0, v + j))) for v, j in zip(COLORS[value], jitter)))
  else:
    s = dataclasses.replace(s, kind=value)
  return dataclasses.replace(scene, shapes=(s,) + scene.shapes[1:])


def composed_example(split: str, index: int, *, seed: int = 0, image: bool = True) -> dict[str, Any]:
  """Composed-retrieval query `index` of `split`, a pure function of its arguments: a one-shape
  reference scene (the first shape of a scene of its own), a modification of one attribute to
  another value, and the target scene; PNG bytes of both unless image=False."""
  full = make_scene(rng_for(split, index, _COMPOSE, seed))
  reference = Scene(full.background, full.shapes[:1])
  rng = rng_for(split, index, _COMPOSE_EDIT, seed)
  attribute = str(rng.choice(list(COMPOSE_ATTRIBUTES)))
  current = reference.background if attribute == "background" else getattr(reference.shapes[0], attribute)
  value = str(rng.choice([v for v in COMPOSE_ATTRIBUTES[attribute] if v != current]))
  target = edit_scene(reference, attribute, value)
  pixels = lambda scene: png_bytes(render(scene)) if image else None
  return {"id": f"toy-compose-{split}-{index:06d}", "index": index, "attribute": attribute, "value": value,
          "modification": modification_text(attribute, value), "reference_scene": reference.to_dict(),
          "target_scene": target.to_dict(), "reference_image": pixels(reference), "target_image": pixels(target)}


# --- Pic2Word's words, for the toy LM's corpus only ----------------------------------------------
# Pic2Word prompts "a photo of *" in training and "a photo of * , but blue" at query time. For the
# toy LM to read those prompts as sentences rather than letters, its corpus says them too: each
# train scene once as "a photo of ..." and, in rows of their own, one-shape scenes described in the
# composed query's form ("a photo of a red circle , but blue" for a blue circle) beside their
# captions and questions. The dataset (example, composed_example) never says them: its bytes stay.

PHOTO_PREFIX = "a photo of "
_CAPTION_PREFIXES = ("a picture of ", "an image of ", "a drawing of ", "there is ", "there are ",
                     "we can see ", "this image shows ")
PHOTO, _COMPOSITION, _COMPOSITION_TEXT = 6, 7, 8  # rng purposes


def photo_caption(rng: np.random.Generator, scene: Scene) -> str:
  """A true caption said as Pic2Word's prompt says it: 'a photo of a red circle on the left'."""
  text = caption(rng, scene)
  for prefix in _CAPTION_PREFIXES:
    if text.startswith(prefix):
      text = text[len(prefix):]
      break
  return PHOTO_PREFIX + text


def relative_caption(rng: np.random.Generator, scene: Scene, attribute: str) -> str:
  """A true description of a one-shape `scene` in the composed query's form: a photo of the scene
  with `attribute` set to another value, then ', but' the scene's own value."""
  own = scene.background if attribute == "background" else getattr(scene.shapes[0], attribute)
  other = str(rng.choice([v for v in COMPOSE_ATTRIBUTES[attribute] if v != own]))
  changed = edit_scene(scene, attribute, other)
  s = changed.shapes[0]
  # the changed attribute is always said, so that the 'but' contradicts something named
  said = noun_phrase(rng, s, p_color=1.0 if attribute == "color" else 0.9)
  if attribute == "background":
    said = f"{said} on a {changed.background} background"
  return f"{PHOTO_PREFIX}{_a(said)} , {modification_text(attribute, own)}"


def pic2word_texts(rng: np.random.Generator, scene: Scene, relative: int = 0) -> list[str]:
  """What a train scene's LM row adds: one 'a photo of' caption and, for a one-shape scene,
  `relative` descriptions in the composed query's form (0 in the shipped recipe: relative
  descriptions inside scene rows cost the bridges most of their captioning, docs/toy_world.md)."""
  texts = [photo_caption(rng, scene)]
  if len(scene.shapes) == 1:
    texts += [relative_caption(rng, scene, str(rng.choice(list(COMPOSE_ATTRIBUTES)))) for _ in range(relative)]
  return texts


def composition_texts(split: str, index: int, *, seed: int = 0, relative: int = 3) -> list[str]:
  """One LM row's texts about one-shape scene `index` of its own (as composed queries draw theirs):
  `relative` descriptions in the composed query's form, its captions, a photo caption and
  questions with their answers, so that what follows 'but' agrees with the rest of the row."""
  full = make_scene(rng_for(split, index, _COMPOSITION, seed))
  scene = Scene(full.background, full.shapes[:1])
  rng = rng_for(split, index, _COMPOSITION_TEXT, seed)
  texts = [relative_caption(rng, scene, str(rng.choice(list(COMPOSE_ATTRIBUTES)))) for _ in range(relative)]
  texts += captions(scene, rng, 3) + [photo_caption(rng, scene)]
  texts += [f"Q: {q['question']}\nA: {q['multiple_choice_answer']}" for q in vqa(scene, rng, 3)]
  return texts
