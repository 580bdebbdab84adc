"""examples/own_data.md runs as written: its ```bash blocks (all but `serve`, which starts a server)
on a folder of toy-world images with CSV captions, made here, in a scratch folder holding links to
train.py, eval.py and configs/."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bridgejax.toy import world
from bridgejax.toy.scene import make_scene, render
from bridgejax.toy.words import caption

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "own_data.md"


def _commands() -> list[str]:
  blocks = re.findall(r"```bash\n(.*?)```", EXAMPLE.read_text(), re.S)
  lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
  return [line.strip() for line in lines if line.strip() and not line.startswith("python -m bridgejax.serve")]


def _photos(folder: Path, split: str, count: int, start: int) -> None:
  """`count` toy-world images with one caption each, listed in folder/SPLIT.csv."""
  with open(folder / f"{split}.csv", "w", newline="") as f:
    rows = csv.writer(f)
    rows.writerow(["image", "caption"])
    for i in range(start, start + count):
      rng = world.rng_for(split, i, 0)
      scene = make_scene(rng)
      render(scene).save(folder / f"img_{i:04d}.png")
      rows.writerow([f"img_{i:04d}.png", caption(rng, scene)])


@pytest.mark.slow  # six processes, two programs compiled from scratch: about a minute of CPU
def test_the_example_runs_from_a_folder_of_images_to_an_exported_bridge(tmp_path):
  commands = _commands()
  assert [c.split()[:3] for c in commands] == [
      ["python", "-m", "bridgejax.prepare"], ["python", "-m", "bridgejax.prepare"],
      ["python", "-m", "bridgejax.features"], ["python", "train.py", "--config"],
      ["python", "eval.py", "--config"], ["python", "-m", "bridgejax.export"]]
  photos = tmp_path / "my_photos"
  photos.mkdir()
  _photos(photos, "train", 16, 1)
  _photos(photos, "test", 8, 101)
  for name in ("train.py", "eval.py", "configs"):
    (tmp_path / name).symlink_to(ROOT / name)
  env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
  for command in commands:
    done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    if "bridgejax.features" in command:
      assert re.search(r"cached features of 16 images in .* s .* MB", done.stdout), done.stdout
  info = json.loads((tmp_path / "data/mine/dataset_info.json").read_text())
  assert {s: info["splits"][s]["num_examples"] for s in ("train", "test")} == {"train": 16, "test": 8}
  trained = json.loads((tmp_path / "runs/mine/train_summary.json").read_text())
  assert trained["step"] == 20 and not trained["skipped_steps"]
  for task in ("caption", "retrieval"):
    assert json.loads((tmp_path / f"runs/mine/eval/{task}.json").read_text())["metrics"]
  assert (tmp_path / "bridges/mine/model.safetensors").exists() and (tmp_path / "bridges/mine/README.md").exists()
