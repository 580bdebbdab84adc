"""The toy CLIP's pretraining recipe: a tower that sees what the toy captions talk about.

The tower is CLIPVisionModel-shaped (width 64, 4 layers, 2 heads; 112 px, patch 7: a 16x16 grid
and 257 tokens, ViT-L/14's token geometry at 224). Contrastive training alone (CLIP's symmetric
InfoNCE against a small text tower, 400 steps) taught it colour and nothing else: linear probes
from the pooled CLS read colour 99.8%, shape kind 22% (chance 14), count 74%, background 96%. Small
shapes (16-32 px) on four backgrounds are a hard, slow signal for a ViT to find. The recipe, chosen
by measurement on this world (`python -m bridgejax.toy.probe`), is two phases under one optimiser
and schedule; every head and the text tower are thrown away afterwards:

1. **Dense attributes on windows** (`dense_steps`). 8x8-patch windows around one shape of a train
   image, each window's patch tokens at the position embeddings of its place in the full grid (so
   the full-image tower is the same function). Every patch token at the penultimate layer, what
   the bridges read, predicts the kind, colour and size of the shape covering it (or "none": a
   patch belongs to a shape it is >= 25% covered by) and whether a shape's centre lies in it
   (what counting needs); the window's CLS predicts the set of kinds and of colours in it. A
   window costs ~1/7 of a full image, so this phase sees 7x more shapes.
2. **Whole scenes** (`scene_steps`). Full images in many small batches (640 of 32), with CLIP's
   contrastive loss against the text tower, the CLS predicting count, background, the kind and
   colour sets and each grid cell's kind, and the patch heads kept on.

Start: 2-D sine-cosine position embeddings and mimetic attention (Trockman & Kolter 2023: W_q W_k^T
≈ 0.7 Z + 0.7 I per head, W_v W_o ≈ 0.4 Z - 0.4 I), so that first-layer attention is local.

What each choice bought, measured on the 2-core CPU with `python -m bridgejax.toy.probe` (logistic
probes from the pooled CLS, fit on 3000 val images, scored on 2000 test images; kind on one-shape
images, chance 14%; count chance 40%). Rows marked "ridge" were read by the earlier least-squares
probe, which underrates count: count is ordinal, and least squares onto one-hot labels masks the
middle class (the same tower read count 80% by ridge, 87.8% by logistic regression):
  * contrastive only, 400 full-image steps (366 s): kind 22%, count 74%, background 96%;
  * CLS kind supervision, 400 full-image steps (ridge): kind 19%;
  * per-patch kind on full images, batch 32, sine-cosine + mimetic start: kind 45% after 800 steps;
  * random (not shape-centred) windows, default start: per-patch kind 18% after 1000 window steps;
  * shape-centred windows, sine-cosine + mimetic start: kind 45 / 76 / 87% after 1000 / 2000 /
    3000 window steps (ridge; per-patch kind 68 / 86 / 91%);
  * 3000 window steps, then 400 whole-scene steps at batch 48 (765 s): colour 100%, kind 90.5%,
    size 95.9%, count 87.8%, background 99.4%, cell 28%. Variants of it (ridge): a window-CLS count
    of shape centres in phase 1 and 440 scene steps, count 88% and kind 85%; the count loss
    weighted 3x in phase 2, count 86% and background 82%. Count and kind traded off;
  * the same images in phase 2 as 640 steps at batch 32 (731 s): kind 89.5%, size 98.9%, count
    96.7%, background 100%. The pooled CLS was short of updates, not of capacity;
  * the shipped recipe, that and 3600 window steps (768 s): colour 100%, kind 91.8%, size 96.9%,
    count 98.2%, background 100%, cell 35.7%; the nearest neighbour shares the kind set 45.8% of
    the time.
"""

from __future__ import annotations

import dataclasses
import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
from tqdm import tqdm

from bridgejax.data.image import clip_preprocess
from bridgejax.losses import contrastive_loss
from bridgejax.models.clip import CLIPVisionConfig, CLIPVisionTransformer, EncoderLayer
from bridgejax.toy import scene as toy_scene, world

# Width 64 and 2 heads (not ViT-like 128/4): on a 2-core CPU the attention maps of 257 tokens
# dominate a step, and this size pretrains in minutes and keeps the demo's frozen forward cheap.
TOY_CLIP = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_layers=4, num_heads=2,
                            image_size=toy_scene.IMAGE_SIZE, patch_size=7)
GRID = TOY_CLIP.grid_size
WINDOW = 8  # patches per side of a phase-1 window
KINDS, COLORS = toy_scene.KINDS, list(toy_scene.COLORS)
SIZES, BACKGROUNDS = toy_scene.SIZES, list(toy_scene.BACKGROUNDS)
MIN_COVER = 0.25  # a patch belongs to the shape covering at least this much of it


# --------------------------------------------------------------------------- data


def render_pool(split: str, num_images: int, seed: int = 0) -> tuple[np.ndarray, list[dict]]:
  """(N, 3, 112, 112) CLIP-normalised images of a toy split and their scenes (Scene.to_dict())."""
  pixels, scenes = [], []
  for ex in tqdm(world.examples(split, num_images, seed=seed, num_questions=0, dialog_rounds=0),
                 total=num_images, desc=f"render toy {split} images", leave=False):
    pixels.append(clip_preprocess(Image.open(io.BytesIO(ex["image"])), toy_scene.IMAGE_SIZE))
    scenes.append(ex["scene"])
  return np.stack(pixels), scenes


@dataclasses.dataclass
class Targets:
  """What the attribute heads predict for N images. Patch maps (N, 16, 16) hold 0 for "no shape",
  else 1 + the index of the covering shape's kind / colour / size."""
  patch_kind: np.ndarray
  patch_color: np.ndarray
  patch_size: np.ndarray
  patch_centre: np.ndarray  # (N, 16, 16) 1 where a shape's centre lies
  count: np.ndarray        # (N,) number of shapes - 1
  background: np.ndarray   # (N,)
  kind_set: np.ndarray     # (N, 7) multi-hot
  color_set: np.ndarray    # (N, 8) multi-hot
  cell_kind: np.ndarray    # (N, 9) 0 for an empty cell, else 1 + kind
  windows: list[list[tuple[float, float]]]  # per image, each shape's centre in patch units (row, col)


def scene_targets(split: str, num_images: int, seed: int = 0) -> Targets:
  """Targets of the first num_images scenes of a split, the scenes `world.example` draws."""
  n = num_images
  t = Targets(*(np.zeros((n, GRID, GRID), np.int32) for _ in range(3)), np.zeros((n, GRID, GRID), np.float32),
              np.zeros(n, np.int32),
              np.zeros(n, np.int32), np.zeros((n, len(KINDS)), np.float32),
              np.zeros((n, len(COLORS)), np.float32), np.zeros((n, 9), np.int32), [])
  for i in range(n):
    scene = world.scene_of(split, i, seed)
    cover = toy_scene.shape_coverage(scene, GRID)  # (1 + shapes, 16, 16), 0 = background
    owner = np.where(cover[1:].max(0) >= MIN_COVER, cover[1:].argmax(0) + 1, 0)  # (16, 16)
    for field, values in (("patch_kind", [KINDS.index(s.kind) for s in scene.shapes]),
                          ("patch_color", [COLORS.index(s.color) for s in scene.shapes]),
                          ("patch_size", [SIZES.index(s.size) for s in scene.shapes])):
      getattr(t, field)[i] = np.asarray([0] + [1 + v for v in values])[owner]
    t.count[i], t.background[i] = len(scene.shapes) - 1, BACKGROUNDS.index(scene.background)
    for s in scene.shapes:
      t.kind_set[i, KINDS.index(s.kind)] = t.color_set[i, COLORS.index(s.color)] = 1
      t.cell_kind[i, 3 * s.row + s.col] = 1 + KINDS.index(s.kind)
      t.patch_centre[i, int(s.cy // TOY_CLIP.patch_size), int(s.cx // TOY_CLIP.patch_size)] = 1
    t.windows.append([(s.cy / TOY_CLIP.patch_size, s.cx / TOY_CLIP.patch_size) for s in scene.shapes])
  return t


def shape_window(rng: np.random.Generator, centres: list[tuple[float, float]]) -> tuple[int, int]:
  """Top-left (row, col) in patches of a WINDOW-sized window around a random one of the shapes,
  jittered by up to 1.5 patches and kept inside the grid."""
  cy, cx = centres[rng.integers(len(centres))]
  place = lambda c: int(np.clip(round(c - WINDOW / 2 + rng.uniform(-1.5, 1.5)), 0, GRID - WINDOW))
  return place(cy), place(cx)


# --------------------------------------------------------------------------- model


class TextTower(nn.Module):
  """A small transformer text encoder for contrastive pretraining (discarded afterwards): token
  and position embeddings, CLIP encoder layers, the final-LayerNorm state of the last token."""

  vocab_size: int
  length: int
  width: int = 128
  layers: int = 2
  embed_dim: int = 128

  @nn.compact
  def __call__(self, ids, mask):  # (B, T) -> (B, E)
    c = CLIPVisionConfig(hidden_size=self.width, intermediate_size=4 * self.width, num_layers=self.layers,
                         num_heads=4, image_size=7, patch_size=7)  # only the layer sizes are used
    x = nn.Embed(self.vocab_size, self.width)(ids) + self.param(
        "pos_embed", nn.initializers.normal(0.01), (self.length, self.width))
    for i in range(self.layers):  # padding is attended to: harmless for this throwaway encoder
      x = EncoderLayer(c, name=f"layer_{i}")(x)
    x = nn.LayerNorm()(x)
    last = jnp.take_along_axis(x, (jnp.sum(mask, axis=1) - 1)[:, None, None], axis=1)[:, 0]
    return nn.Dense(self.embed_dim, use_bias=False)(last)


class AttributeHeads(nn.Module):
  """Linear read-outs (discarded afterwards): per patch token of the penultimate layer, its shape's
  kind / colour / size (or none); from the pooled CLS, the scene's attributes."""

  @nn.compact
  def __call__(self, out):  # out: VisionOutput of the tower
    patches = out.hidden_states[-2][:, 1:]  # (B, P, D)
    pooled = out.pooler_output  # (B, D)
    dense = lambda n, name, x: nn.Dense(n, name=name)(x)
    return {"patch_kind": dense(len(KINDS) + 1, "patch_kind", patches),
            "patch_color": dense(len(COLORS) + 1, "patch_color", patches),
            "patch_size": dense(len(SIZES) + 1, "patch_size", patches),
            "patch_centre": dense(1, "patch_centre", patches)[..., 0],
            "kind_set": dense(len(KINDS), "kind_set", pooled), "color_set": dense(len(COLORS), "color_set", pooled),
            "count": dense(3, "count", pooled),
            "background": dense(len(BACKGROUNDS), "background", pooled),
            "cell_kind": dense(9 * (len(KINDS) + 1), "cell_kind", pooled).reshape(-1, 9, len(KINDS) + 1)}


def sincos_2d(width: int, grid: int) -> np.ndarray:
  """(1 + grid², width) position embeddings: zeros for CLS, then sin/cos of row and column."""
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  omega = 1.0 / 10000 ** (np.arange(width // 4) / (width // 4))
  parts = [f(c.reshape(-1, 1) * omega[None]) for c in (rows, cols) for f in (np.sin, np.cos)]
  return np.concatenate([np.zeros((1, width)), np.concatenate(parts, 1)]).astype(np.float32)


def mimetic_start(params: dict, config: CLIPVisionConfig, seed: int) -> dict:
  """Tower params with sine-cosine positions and mimetic attention weights (module docstring)."""
  d, heads = config.hidden_size, config.num_heads
  f = d // heads
  rng = np.random.default_rng(seed)
  factor = lambda m, k: (lambda u, s, vt: (u[:, :k] * np.sqrt(s[:k]), vt[:k].T * np.sqrt(s[:k])))(*np.linalg.svd(m))
  params = dict(params, pos_embed=jnp.asarray(sincos_2d(d, config.grid_size)))
  for i in range(config.num_layers):
    attn = {k: dict(v) for k, v in params[f"layer_{i}"]["attn"].items()}
    wq, wk = np.zeros((d, d), np.float32), np.zeros((d, d), np.float32)
    for h in range(heads):  # q·k is scaled by f**-0.5 in the layer: undo it, so q·k ≈ x M x
      a, b = factor(0.7 * rng.normal(size=(d, d)) / np.sqrt(d) + 0.7 * np.eye(d), f)
      wq[:, h * f:(h + 1) * f], wk[:, h * f:(h + 1) * f] = a * f**0.25, b * f**0.25
    wv, wo = factor(0.4 * rng.normal(size=(d, d)) / np.sqrt(d) - 0.4 * np.eye(d), d)
    for name, kernel in (("q_proj", wq), ("k_proj", wk), ("v_proj", wv), ("out_proj", wo.T)):
      attn[name]["kernel"] = jnp.asarray(kernel, jnp.float32)
    params[f"layer_{i}"] = dict(params[f"layer_{i}"], attn=attn)
  return params


def window_model(config: CLIPVisionConfig) -> CLIPVisionTransformer:
  """The tower on WINDOW x WINDOW-patch windows; it takes the full tower's params (window_forward)."""
  return CLIPVisionTransformer(dataclasses.replace(config, image_size=WINDOW * config.patch_size))


def window_forward(window_tower: CLIPVisionTransformer, params: dict, windows, top, left):
  """The full tower's params applied to windows (B, 3, 56, 56) cut at patch (top, left) (B,) each:
  each window's patches get the position embeddings of their place in the full 16x16 grid."""
  def one(window, top, left):
    cells = (top + jnp.arange(WINDOW))[:, None] * GRID + (left + jnp.arange(WINDOW))[None, :]  # (8, 8)
    pos = params["pos_embed"]
    placed = dict(params, pos_embed=jnp.concatenate([pos[:1], pos[1 + cells.reshape(-1)]]))
    return jax.tree.map(lambda t: t[0], window_tower.apply({"params": placed}, window[None]))
  return jax.vmap(one)(windows, top, left)


# --------------------------------------------------------------------------- training


def _xent(logits, labels, none_weight: float = 1.0):
  """Mean cross-entropy, "none" labels (0) weighted by none_weight."""
  weight = jnp.where(labels > 0, 1.0, none_weight)
  return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels) * weight) / jnp.sum(weight)


def attribute_loss(heads: dict, batch: dict, *, scene: bool):
  """Patch heads (background patches weighted 0.3: most patches are background) and the set heads;
  with scene=True also count, background and cell kinds."""
  flat = lambda x: x.reshape(x.shape[0], -1)
  loss = sum(_xent(heads[k], flat(batch[k]), 0.3) for k in ("patch_kind", "patch_color", "patch_size"))
  bce = lambda k: jnp.mean(optax.sigmoid_binary_cross_entropy(heads[k], batch[k]))
  loss += bce("kind_set") + bce("color_set")
  # x10: one to three centre patches among 64-256, so the mean BCE is small
  loss += jnp.mean(optax.sigmoid_binary_cross_entropy(heads["patch_centre"], flat(batch["patch_centre"]))) * 10
  if scene:
    loss += sum(_xent(heads[k], batch[k]) for k in ("count", "background", "cell_kind"))
  labels = flat(batch["patch_kind"])
  patch_kind_acc = jnp.sum((heads["patch_kind"].argmax(-1) == labels) * (labels > 0)) / jnp.maximum(
      jnp.sum(labels > 0), 1)
  return loss, patch_kind_acc


def pretrain_clip(pixels, targets: Targets, caption_ids, caption_mask, vocab_size: int, *, dense_steps: int,
                  scene_steps: int, dense_batch: int = 64, scene_batch: int = 32, lr: float = 2e-3, seed: int = 0):
  """Vision tower params (CLIPVisionModel layout, no projection) after the two phases.

  pixels (N, 3, 112, 112) with their Targets and tokenised captions caption_ids, caption_mask
  (N, captions per image, T), encoded once before training. Returns (params, final losses)."""
  text_length = caption_ids.shape[-1]
  config = dataclasses.replace(TOY_CLIP, projection_dim=128)
  vision = CLIPVisionTransformer(config)
  window_tower = window_model(config)
  text, heads = TextTower(vocab_size, text_length), AttributeHeads()
  rng = jax.random.key(seed)
  size = config.image_size
  vision_params = vision.init(rng, jnp.zeros((1, 3, size, size)))["params"]
  params = {"vision": mimetic_start(vision_params, config, seed),
            "heads": heads.init(rng, vision.apply({"params": vision_params}, jnp.zeros((1, 3, size, size))))["params"],
            "text": text.init(rng, jnp.zeros((1, text_length), jnp.int32), jnp.ones((1, text_length), jnp.int32))["params"],
            "logit_scale": jnp.asarray(np.log(1 / 0.07), jnp.float32)}
  steps = dense_steps + scene_steps
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 20, 1), steps, lr * 0.05)
  tx = optax.adamw(schedule, weight_decay=0.05)
  opt_state = tx.init(params)

  def dense_loss(params, batch):
    out = window_forward(window_tower, params["vision"], batch["pixels"], batch["top"], batch["left"])
    return attribute_loss(heads.apply({"params": params["heads"]}, out), batch, scene=False)

  def scene_loss(params, batch):
    out = vision.apply({"params": params["vision"]}, batch["pixels"])
    txt = text.apply({"params": params["text"]}, batch["ids"], batch["mask"])
    contrastive, _ = contrastive_loss(out.image_embeds, txt, params["logit_scale"], max_scale=100.0)
    attributes, acc = attribute_loss(heads.apply({"params": params["heads"]}, out), batch, scene=True)
    return contrastive + attributes, acc

  def make_step(loss_fn):
    @jax.jit
    def step(params, opt_state, batch):
      (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss, acc
    return step

  data_rng = np.random.default_rng(seed)
  fields = ("patch_kind", "patch_color", "patch_size", "patch_centre", "kind_set", "color_set", "count", "background", "cell_kind")
  p = config.patch_size
  step, loss = make_step(dense_loss), None
  progress = tqdm(range(dense_steps), desc="toy CLIP 1/2: shape windows")
  for i in progress:
    rows = data_rng.integers(len(pixels), size=dense_batch)
    places = np.asarray([shape_window(data_rng, targets.windows[r]) for r in rows])
    batch = {"pixels": np.stack([pixels[r, :, t * p:(t + WINDOW) * p, l * p:(l + WINDOW) * p]
                                 for r, (t, l) in zip(rows, places)]), "top": places[:, 0], "left": places[:, 1]}
    for k in ("patch_kind", "patch_color", "patch_size", "patch_centre"):
      batch[k] = np.stack([getattr(targets, k)[r, t:t + WINDOW, l:l + WINDOW] for r, (t, l) in zip(rows, places)])
    batch["kind_set"] = _present(batch["patch_kind"], len(KINDS))
    batch["color_set"] = _present(batch["patch_color"], len(COLORS))
    params, opt_state, loss, acc = step(params, opt_state, batch)
    if i % 50 == 0 or i == dense_steps - 1:
      progress.set_postfix(loss=f"{float(loss):.3f}", patch_kind=f"{100 * float(acc):.0f}%")
  dense_final = None if loss is None else float(loss)

  step, loss = make_step(scene_loss), None
  progress = tqdm(range(scene_steps), desc="toy CLIP 2/2: whole scenes")
  for i in progress:
    rows = data_rng.choice(len(pixels), scene_batch, replace=False)  # distinct images: true negatives
    pick = [data_rng.integers(caption_ids.shape[1]) for _ in rows]  # one caption per image
    ids, mask = caption_ids[rows, pick], caption_mask[rows, pick]
    batch = {"pixels": pixels[rows], "ids": ids, "mask": mask} | {k: getattr(targets, k)[rows] for k in fields}
    params, opt_state, loss, acc = step(params, opt_state, batch)
    if i % 20 == 0 or i == scene_steps - 1:
      progress.set_postfix(loss=f"{float(loss):.3f}", patch_kind=f"{100 * float(acc):.0f}%")
  tower = {k: v for k, v in params["vision"].items() if k != "visual_projection"}
  return tower, {"dense_loss": dense_final, "scene_loss": None if loss is None else float(loss)}


def _present(patch_labels: np.ndarray, n: int) -> np.ndarray:
  """(B, n) multi-hot of the classes (1..n) present in (B, ...) label maps."""
  onehot = patch_labels.reshape(len(patch_labels), -1)[..., None] == np.arange(1, n + 1)
  return onehot.any(1).astype(np.float32)
