"""The toy world: small images of coloured shapes with true captions, questions and dialogs.

Pure and deterministic: everything about example `i` of a split comes from
np.random.default_rng((seed, split, i, purpose)), so any example can be made alone (random
access, parallel generation) and the same seed gives the same bytes.

A scene is 1-3 shapes (7 kinds, 8 colours, 2 sizes) in distinct cells of a 3x3 grid on one of
4 backgrounds. The grid makes every statement decidable at a glance: A is "above" B iff A's row
is higher, "to the left of" iff its column is; "in the top left corner" names the cell. Shapes
get a little position, size, rotation and colour jitter so that a model must learn the
categories, not the pixels. Text never says anything the image does not show.

The world's parts: scene.py (shapes, scenes, pixels), words.py (captions), questions.py (VQA
questions and VisDial dialogs); here, the examples of each split, composed retrieval's queries and
Pic2Word's words for the toy LM.

    ex = example("val", 12)        # {"id", "image" (PNG bytes), "captions" [5], "questions" [5],
                                   #  "dialog" {caption, rounds [10], dense_*}, "scene"}
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np

from bridgejax.toy.questions import dialog, vqa
from bridgejax.toy.scene import BACKGROUNDS, COLORS, KINDS, Scene, make_scene, png_bytes, render
from bridgejax.toy.words import _a, _pick, caption, captions, noun_phrase

SPLITS = {"train": 0, "val": 1, "test": 2}
_CAPTION, _SCENE, _QUESTIONS, _DIALOG = 1, 0, 2, 3


def rng_for(split: str, index: int, purpose: int, seed: int = 0) -> np.random.Generator:
  if split not in SPLITS:
    raise ValueError(f"unknown toy split {split!r}; one of {list(SPLITS)}")
  return np.random.default_rng((seed, SPLITS[split], index, purpose))


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
