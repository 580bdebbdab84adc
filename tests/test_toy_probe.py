"""bridgejax.toy.probe: the probe is a logistic regression, its labels follow the scene, and what the
shipped toy CLIP sees."""

import numpy as np

from bridgejax import weights
from bridgejax.toy import probe, world
from bridgejax.toy.scene import BACKGROUNDS, COLORS, KINDS


def test_logistic_regression_is_stationary_and_the_probe_reads_only_what_is_there():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(300, 5))
  y = np.argmax(x[:, :3], axis=1)  # a linear read-out of the first three features
  y[:20] = -1  # undefined labels are left out
  assert probe.logistic_probe_accuracy(x[:200], y[:200], x[200:], y[200:]) >= 0.9
  noise = rng.integers(3, size=300)
  assert probe.logistic_probe_accuracy(x[:200], noise[:200], x[200:], noise[200:]) < 0.55
  # the fit is the penalised optimum: the gradient, computed independently, vanishes
  a = np.concatenate([x[20:200], np.ones((180, 1))], 1)
  w = probe.fit_logistic_regression(a, y[20:200], 3, l2=0.01)
  p = np.exp(a @ w) / np.exp(a @ w).sum(1, keepdims=True)
  gradient = a.T @ (p - np.eye(3)[y[20:200]]) / 180 + 2 * 0.01 * np.concatenate([w[:-1], 0 * w[-1:]])
  assert np.abs(gradient).max() < 1e-5


def test_probe_reads_an_ordinal_scalar_that_least_squares_masks():
  """Count is ordinal: a tower may hold it as one monotone feature. Softmax read-outs (the tower's own
  heads, downstream bridges) separate its three classes; least squares onto one-hot labels, the
  probe used before, masks the middle class (Hastie et al., ESL 4.2)."""
  rng = np.random.default_rng(1)
  scalar = rng.uniform(0, 3, size=(600, 1))
  y = np.floor(scalar[:, 0]).astype(int)
  x = np.concatenate([scalar, rng.normal(size=(600, 3))], 1)
  assert probe.logistic_probe_accuracy(x[:400], y[:400], x[400:], y[400:]) >= 0.95
  a = np.concatenate([x[:400], np.ones((400, 1))], 1)
  least_squares = np.linalg.lstsq(a, np.eye(3)[y[:400]], rcond=None)[0]
  assert np.mean(np.argmax(a @ least_squares, 1) == y[:400]) < 0.8


def test_probe_labels_follow_the_scene_and_neighbours_count_agreement():
  scenes = [world.example("val", i, image=False, num_questions=0, dialog_rounds=0)["scene"] for i in range(40)]
  labels = probe.probe_labels(scenes)
  for i, scene in enumerate(scenes):
    assert list(BACKGROUNDS)[labels["background"][i]] == scene["background"]
    assert labels["count"][i] + 1 == len(scene["shapes"])
    single = len(scene["shapes"]) == 1
    assert (labels["kind"][i] >= 0) == (labels["cell"][i] >= 0) == single
    if single:
      s = scene["shapes"][0]
      assert KINDS[labels["kind"][i]] == s["kind"] and list(COLORS)[labels["color"][i]] == s["color"]
      assert labels["cell"][i] == 3 * s["row"] + s["col"]
  # two identical features are each other's nearest neighbour
  features = np.eye(4)[[0, 0, 1, 1]] + 0.01 * np.arange(4)[:, None]
  four = [{"background": b, "shapes": [{"color": "red", "kind": k}]}
          for b, k in (("white", "star"), ("white", "star"), ("gray", "circle"), ("black", "circle"))]
  agreement = probe.neighbour_agreement(features, four)
  assert agreement["background"] == 0.5 and agreement["kind_set"] == 1.0 and agreement["color_set"] == 1.0


def test_shipped_toy_clip_sees_shape_kind_size_colour_count_and_background():
  """The goals (kind >= 90%, count >= 90%, background >= 95%) on 1200 val images fit and 600 test
  images scored (the CLI's 3000 / 2000 measure colour 100, kind 91.8, size 96.9, count 98.2,
  background 100). Measured here: colour 100, kind 92.1 (chance 14), size 96.3, count 97.2,
  background 100, the kind of the shape under a patch token 88.7 (40 / 40 images); the nearest
  neighbour shares the kind set 41% of the time (8% for the earlier contrastive-only tower, whose
  kind probe read 22 and patch kind 12)."""
  result = probe.probe_tower(weights.load_vision_tower(probe.ASSETS_CLIP), num_fit=1200, num_test=600,
                             patch_images=(40, 40))
  assert result["probe_color"] >= 0.98 and result["probe_kind"] >= 0.90 and result["probe_size"] >= 0.93, result
  assert result["probe_background"] >= 0.95 and result["probe_count"] >= 0.90, result
  assert result["probe_patch_kind"] >= 0.85, result
  assert result["neighbour_kind_set"] >= 0.3 and result["neighbour_background"] >= 0.9, result
