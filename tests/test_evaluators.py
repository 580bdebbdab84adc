"""The evaluator registry: every task type is one module declaring an EVALUATOR, and a new one is
one new file. The docs' example (docs/evaluation.md, "Adding a task type") is dropped into the
package as it is printed there and evaluates a run end to end: JSON, table columns, report."""

import json
import os
import shutil
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import tiny_eval_world as tw  # noqa: E402

from bridgejax.evaluation import evaluators, report, table  # noqa: E402
from bridgejax.evaluation.evaluators import REGISTRY, base  # noqa: E402
from registry_helper import docs_example, dropped_in  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_task_type_declares_itself_in_its_own_module():
  assert list(REGISTRY) == ["caption", "retrieval", "vqa", "visdial", "compose"]  # display order
  for name, evaluator in REGISTRY.items():
    assert evaluator.type == name and evaluator.run.__module__ == f"bridgejax.evaluation.evaluators.{name}"
    assert "standard" in evaluator.protocols and evaluator.columns
    assert not set(evaluator.keys) & set(base.COMMON_KEYS), name  # a type's keys are its own
    for protocol, preset in evaluator.protocols.items():  # every preset names only real keys
      assert set(preset) <= set(base.COMMON_KEYS) | set(evaluator.keys), (name, protocol)
  assert evaluators.protocols() == ["standard", "thesis"]


def test_reading_a_config_does_not_load_jax():
  """configs/base.py builds config.evals from the declarations; jax loads when a task runs."""
  import subprocess
  code = ("import sys; sys.path.insert(0, '.'); from configs import base; base.get_config(); "
          "import bridgejax.evaluation.evaluators as e; print(sorted(e.REGISTRY), 'jax' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
  assert out.split("]")[-1].strip() == "False", out


@pytest.fixture()
def diversity(monkeypatch):
  """The docs' diversity.py, dropped into the evaluators package."""
  with dropped_in(monkeypatch, evaluators, "diversity", docs_example("evaluation.md", "## Adding a task type")) as found:
    yield found


def test_a_new_task_type_is_one_file(diversity):
  from bridgejax.evaluation.run import evaluate
  config = tw.config()
  config.evals = {"diversity": evaluators.eval_task("diversity", data=tw.world()["data"], split="val",
                                                    batch_size=4, max_examples=5, max_new_tokens=4,
                                                    report_examples=2, progress=False)}
  workdir = tempfile.mkdtemp()
  # the checkpoint alone: other tests evaluate the shared workdir, and their eval/ would show in the report
  shutil.copytree(tw.workdir_with_checkpoint(), workdir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("eval"))
  results = evaluate(config, workdir, quiet=True)
  summary = json.load(open(os.path.join(workdir, "eval", "diversity.json")))
  assert summary == json.loads(json.dumps(results["diversity"]))
  assert summary["protocol"] == "custom" and summary["counts"] == {"images": 5}  # split val, not the preset's test
  assert 0 < summary["metrics"]["distinct"] <= 1 and summary["metrics"]["mean_words"] >= 0
  lines = table.table([workdir]).splitlines()
  assert "distinct" in lines[0] and "words" in lines[0]
  assert "<h2>" not in report.render(workdir).split("<h2>Metrics</h2>")[1]  # no section declared, none drawn
  with pytest.raises(ValueError, match=r"eval task type 'diversity' has no key\(s\) \['num_beams'\]"):
    evaluators.eval_task("diversity", num_beams=2)
