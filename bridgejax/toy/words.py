"""The toy world's words: true captions of a scene, and the phrases questions reuse (where a shape
is, a noun phrase, the relations between two shapes, the shortest description of one). Text never
says anything the image does not show.

    captions(scene, np.random.default_rng(0))     # 5 true captions: 'a red circle over a red square', ...
"""

from __future__ import annotations

import numpy as np

from bridgejax.toy.scene import COLS, NUMBER_WORDS, PLURAL, RELATIONS, ROWS, SIZE_WORDS, Scene, Shape


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
