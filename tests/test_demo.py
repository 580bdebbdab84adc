"""The README's main command, end to end: train.py on configs/demo.py trains a bridge on the toy
world, evaluates it on held-out images and writes the metric JSON and the report."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_trains_and_evaluates(tmp_path):
  """The demo command, shortened (fewer steps and toy images) to keep the suite fast: it generates
  the data, trains with validation, evaluates the final checkpoint and writes every output."""
  workdir, data = tmp_path / "demo", tmp_path / "toy_data"
  result = subprocess.run(
      [sys.executable, "train.py", "--config", "configs/demo.py", "--workdir", str(workdir),
       f"--config.data.dir={data}", "--config.total_steps=60", "--config.eval_every_steps=30", "--config.log_every_steps=10",
       "--config.checkpoint_every_steps=30", "--config.data.toy.num_train=1000", "--config.data.toy.num_val=64",
       "--config.data.toy.num_test=64", "--config.data.val_examples=64"], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "trained to step" in result.stdout and "sample captions (generated | true):" in result.stdout

  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  train = [r for r in records if "train/caption_loss" in r]
  assert [r["step"] for r in train][-1] == 60
  # Measured at lr 1e-3: 1.95 at step 10 -> 1.80 at step 60; the full demo ends near 1.3.
  # This checks language-level learning only: the image conditioning of captions is not yet
  # learned in the demo's budget (see the training issue), so no retrieval or BLEU bound is
  # claimed here.
  mean = lambda rows: sum(r["train/caption_loss"] for r in rows) / len(rows)
  assert mean(train[-2:]) < 0.97 * mean(train[:2]), [r["train/caption_loss"] for r in train]
  assert any("val/i2t_R@1" in r for r in records)
  for task in ("caption", "retrieval"):
    report = json.load(open(workdir / "eval" / f"{task}.json"))
    assert report["checkpoint_step"] == 60 and report["dataset"]["split"] == "test"
    assert all(v is None or 0.0 <= v <= 1.0 for v in report["metrics"].values()), report["metrics"]
    assert len(json.load(open(workdir / "eval" / f"{task}_predictions.json"))) > 0
  assert os.path.getsize(workdir / "eval" / "report.html") > 10_000
