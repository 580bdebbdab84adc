"""bridgejax.toy.probe: the probe is a ridge regression, its labels follow the scene, and what the
shipped toy CLIP sees."""

import numpy as np

from bridgejax import weights
from bridgejax.toy import probe, world


def test_ridge_probe_is_ridge_regression_and_reads_only_what_is_there():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(300, 5))
  y = np.argmax(x[:, :3], axis=1)  # a linear read-out of the first three features
  y[:20] = -1  # undefined labels are left out
  assert probe.ridge_probe_accuracy(x[:200], y[:200], x[200:], y[200:], ridge=1e-3) >= 0.9
  noise = rng.integers(3, size=300)
  assert probe.ridge_probe_accuracy(x[:200], noise[:200], x[200:], noise[200:]) < 0.55
  # the closed form is ridge regression: least squares on rows augmented with sqrt(ridge) * I
  fit = x[20:200]
  a = np.concatenate([(fit - fit.mean(0)) / (fit.std(0) + 1e-6), np.ones((len(fit), 1))], 1)
  augmented = np.concatenate([a, np.sqrt(4.0) * np.eye(6)])
  targets = np.concatenate([np.eye(3)[y[20:200]], np.zeros((6, 3))])
  w = np.linalg.lstsq(augmented, targets, rcond=None)[0]
  expected = np.mean(np.argmax(a @ w, 1) == y[20:200])
  assert probe.ridge_probe_accuracy(fit, y[20:200], fit, y[20:200], ridge=4.0) == expected


def test_probe_labels_follow_the_scene_and_neighbours_count_agreement():
  scenes = [world.example("val", i, image=False, num_questions=0, dialog_rounds=0)["scene"] for i in range(40)]
  labels = probe.probe_labels(scenes)
  for i, scene in enumerate(scenes):
    assert list(world.BACKGROUNDS)[labels["background"][i]] == scene["background"]
    assert labels["count"][i] + 1 == len(scene["shapes"])
    single = len(scene["shapes"]) == 1
    assert (labels["kind"][i] >= 0) == (labels["cell"][i] >= 0) == single
    if single:
      s = scene["shapes"][0]
      assert world.KINDS[labels["kind"][i]] == s["kind"] and list(world.COLORS)[labels["color"][i]] == s["color"]
      assert labels["cell"][i] == 3 * s["row"] + s["col"]
  # two identical features are each other's nearest neighbour
  features = np.eye(4)[[0, 0, 1, 1]] + 0.01 * np.arange(4)[:, None]
  four = [{"background": b, "shapes": [{"color": "red", "kind": k}]}
          for b, k in (("white", "star"), ("white", "star"), ("gray", "circle"), ("black", "circle"))]
  agreement = probe.neighbour_agreement(features, four)
  assert agreement["background"] == 0.5 and agreement["kind_set"] == 1.0 and agreement["color_set"] == 1.0


def test_shipped_toy_clip_sees_shape_kind_size_colour_and_background():
  """1200 val images fit, 600 test images scored (the CLI's 3000 / 2000 measure colour 100, kind 91,
  size 97, count 80, background 99). Measured here: colour 100, kind 89.5 (chance 14), size 96.8,
  count 77.8, background 99.5; the nearest neighbour shares the kind set 30% of the time (6.5 for
  the earlier contrastive-only tower, whose kind probe read 22)."""
  result = probe.probe_tower(weights.load_vision_tower(probe.ASSETS_CLIP), num_fit=1200, num_test=600)
  assert result["probe_color"] >= 0.98 and result["probe_kind"] >= 0.87 and result["probe_size"] >= 0.93, result
  assert result["probe_background"] >= 0.97 and result["probe_count"] >= 0.75, result
  assert result["neighbour_kind_set"] >= 0.2 and result["neighbour_background"] >= 0.8, result
