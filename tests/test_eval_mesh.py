"""Evaluation on the training mesh: a run trained on 8 (fake CPU) devices evaluates all four tasks
there, batches split over 'data' (sizes that do not divide it padded), and gets what one device gets."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import tiny_eval_world as tw  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_final_eval_on_8_devices_equals_one_device(tmp_path):
  out, world = tmp_path / "out.json", tmp_path / "world.json"
  world.write_text(json.dumps(tw.world()))  # built once per pytest process, shared with the other eval tests
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "eval_mesh_helper.py"), str(tmp_path / "run"),
                         str(out), str(world)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(out.read_text())
  assert result["devices"] == 8 and result["step"] == 2
  assert result["frozen_devices"] == [8]  # loaded straight onto the mesh
  assert result["mesh_trainable_devices"] == [8] and result["trainable_devices"] == [1]  # restored where used
  mesh, single = result["mesh"], result["single"]
  for task, metrics in single["metrics"].items():
    assert set(mesh["metrics"][task]) == set(metrics)
    for key, value in metrics.items():
      if isinstance(value, float):
        np.testing.assert_allclose(mesh["metrics"][task][key], value, rtol=1e-5, atol=1e-6, err_msg=f"{task} {key}")
      else:
        assert mesh["metrics"][task][key] == value, (task, key)
  # generated captions and answers, VisDial ranks and choices, retrieval ranks: all identical
  for task, predictions in single["predictions"].items():
    assert len(predictions) == 5
    assert mesh["predictions"][task] == predictions, task
