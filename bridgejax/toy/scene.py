"""The toy world's scenes and their pixels: 1-3 shapes (7 kinds, 8 colours, 2 sizes) in distinct
cells of a 3x3 grid on one of 4 backgrounds, drawn anti-aliased at IMAGE_SIZE.

    scene = make_scene(np.random.default_rng(0))
    png = png_bytes(render(scene))                 # what an example's "image" holds
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
from typing import Any

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
