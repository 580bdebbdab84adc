"""bridgejax.toy.pretrain_clip: the toy CLIP's attribute targets follow the drawn scene, windows
see the full tower's positions, the mimetic start attends locally, and the recipe runs end to end
into a tower that loads like a real one."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from bridgejax import weights
from bridgejax.models.clip import CLIPVisionTransformer
from bridgejax.toy import pretrain, pretrain_clip as pc, world
from bridgejax.toy.scene import BACKGROUNDS, IMAGE_SIZE, render, shape_coverage


def test_shape_coverage_partitions_the_image_as_drawn():
  for index in range(6):
    scene = world.scene_of("val", index)
    per_pixel = shape_coverage(scene, IMAGE_SIZE)  # (1 + shapes, 112, 112)
    pixels = np.asarray(render(scene), np.int32)
    for i, shape in enumerate(scene.shapes, start=1):  # pixels wholly inside shape i have its colour
      inside = per_pixel[i] == 1.0
      assert inside.sum() > 100 and np.all(np.abs(pixels[inside] - np.asarray(shape.rgb)) <= 1)
    if scene.background != "checkered":
      empty = per_pixel[0] == 1.0
      assert np.all(np.abs(pixels[empty] - np.asarray(BACKGROUNDS[scene.background])) <= 1)
    per_patch = shape_coverage(scene, 16)  # the patch grid: the mean over each 7x7 patch
    np.testing.assert_allclose(per_patch, per_pixel.reshape(-1, 16, 7, 16, 7).mean((2, 4)), atol=1e-9)
    np.testing.assert_allclose(per_patch.sum(0), 1.0, atol=1e-9)


def test_scene_targets_follow_the_scene():
  targets = pc.scene_targets("val", 12)
  for i in range(12):
    scene = world.scene_of("val", i)
    assert targets.count[i] + 1 == len(scene.shapes) == int(targets.patch_centre[i].sum())
    assert pc.BACKGROUNDS[targets.background[i]] == scene.background
    for s in scene.shapes:
      r, c = int(s.cy // 7), int(s.cx // 7)  # the patch holding the centre is the shape's
      assert targets.patch_centre[i, r, c] == 1
      assert pc.KINDS[targets.patch_kind[i, r, c] - 1] == s.kind
      assert pc.COLORS[targets.patch_color[i, r, c] - 1] == s.color
      assert pc.SIZES[targets.patch_size[i, r, c] - 1] == s.size
      assert targets.kind_set[i, pc.KINDS.index(s.kind)] == 1 and targets.color_set[i, pc.COLORS.index(s.color)] == 1
      assert pc.KINDS[targets.cell_kind[i, 3 * s.row + s.col] - 1] == s.kind
    assert targets.kind_set[i].sum() == len({s.kind for s in scene.shapes})
    assert np.sum(targets.cell_kind[i] > 0) == len(scene.shapes)
    # "none" exactly where no shape covers a quarter of the patch
    shape_cover = shape_coverage(scene, 16)[1:].max(0)
    np.testing.assert_array_equal(targets.patch_kind[i] > 0, shape_cover >= pc.MIN_COVER)


def test_shape_windows_hold_their_shape_inside_the_grid():
  rng = np.random.default_rng(0)
  targets = pc.scene_targets("val", 20)
  for centres in targets.windows:
    for _ in range(5):
      top, left = pc.shape_window(rng, centres)
      assert 0 <= top <= pc.GRID - pc.WINDOW and 0 <= left <= pc.GRID - pc.WINDOW
      assert any(top <= cy < top + pc.WINDOW and left <= cx < left + pc.WINDOW for cy, cx in centres)


def test_windows_use_the_full_towers_positions():
  config = pc.TOY_CLIP
  tower = CLIPVisionTransformer(config)
  params = jax.jit(tower.init)(jax.random.key(0), jnp.zeros((1, 3, 112, 112)))["params"]
  pixels = np.random.default_rng(0).normal(size=(2, 3, 112, 112)).astype(np.float32)
  top, left = np.array([0, 5]), np.array([8, 3])
  windows = np.stack([pixels[i, :, t * 7:(t + 8) * 7, l * 7:(l + 8) * 7] for i, (t, l) in enumerate(zip(top, left))])
  window_model = pc.window_model(config)  # jitted: op by op, a tower's forward takes seconds on a CPU
  out = jax.jit(lambda p, w, t, l: pc.window_forward(window_model, p, w, t, l))(params, windows, top, left)
  full = jax.jit(lambda p, x: tower.apply({"params": p}, x).hidden_states[0])(params, pixels)  # (2, 257, D)
  for i, (t, l) in enumerate(zip(top, left)):
    cells = (np.arange(t, t + 8)[:, None] * 16 + np.arange(l, l + 8)[None]).reshape(-1)
    np.testing.assert_allclose(out.hidden_states[0][i], full[i, np.concatenate([[0], 1 + cells])], atol=1e-5)


def test_mimetic_start_attends_locally():
  """At the mimetic start a first-layer patch query scores its grid neighbours above far patches."""
  config = pc.TOY_CLIP
  tower = CLIPVisionTransformer(config)
  params = pc.mimetic_start(jax.jit(tower.init)(jax.random.key(0), jnp.zeros((1, 3, 112, 112)))["params"], config,
                            seed=0)
  np.testing.assert_allclose(params["pos_embed"], pc.sincos_2d(64, 16))
  x = np.asarray(params["pos_embed"][1:])  # a blank image: tokens differ only by position
  x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
  attn = params["layer_0"]["attn"]
  q, k = x @ np.asarray(attn["q_proj"]["kernel"]), x @ np.asarray(attn["k_proj"]["kernel"])
  rows, cols = np.divmod(np.arange(256), 16)
  distance = np.abs(rows[:, None] - rows[None]) + np.abs(cols[:, None] - cols[None])
  for h in range(config.num_heads):
    f = slice(32 * h, 32 * (h + 1))
    logits = q[:, f] @ k[:, f].T / np.sqrt(32)
    assert logits[distance <= 1].mean() > logits[distance >= 8].mean() + 1.0


def test_pretrain_clip_runs_end_to_end_into_a_loadable_tower(tmp_path):
  args = ["--out", str(tmp_path), "--parts", "clip", "--num-images", "60", "--clip-images", "24",
          "--clip-dense-steps", "2", "--clip-scene-steps", "2", "--clip-scene-batch", "8"]
  assert pretrain.main(args) == 0
  summary = json.loads((tmp_path / "pretrain_summary.json").read_text())["clip"]
  assert summary["dense_steps"] == 2 and np.isfinite(summary["dense_loss"]) and np.isfinite(summary["scene_loss"])
  tower = weights.load_vision_tower(os.path.join(tmp_path, "clip"))
  assert tower(np.zeros((1, 3, 112, 112), np.float32)).hidden_states[-1].shape == (1, 257, 64)
