"""The documentation: `mkdocs build --strict` passes (mkdocs.yml: every broken link, missing page,
anchor or docstring problem is a warning, and --strict fails on warnings), every relative link of
README.md reaches a file, and CI runs exactly the test command the README's quick start gives."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _readme():
  with open(README, encoding="utf-8") as f:
    return f.read()


def test_docs_build_strict(tmp_path):
  if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None:
    pytest.fail("mkdocs is not installed: pip install -e '.[test]' (or '.[docs]')")
  site = tmp_path / "site"
  env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
  result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  assert (site / "index.html").exists()
  for page in ("ablation", "toy_world", "own_data", "api/model", "api/bridges", "api/toy_world"):
    assert (site / page / "index.html").exists(), page
  # the API pages are rendered from the docstrings, not left as `::: module` lines
  bridges = (site / "api" / "bridges" / "index.html").read_text(encoding="utf-8")
  assert ":::" not in bridges and "bridgejax.bridges.crossatt" in bridges


def test_readme_relative_links_reach_files():
  targets = LINK.findall(_readme())
  relative = [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]
  assert len(relative) >= 20, relative  # the README's links to docs/ pages
  missing = [t for t in relative if not os.path.exists(os.path.join(ROOT, t.split("#")[0]))]
  assert not missing, f"README.md links to paths that do not exist: {missing}"


def test_ci_runs_the_readme_test_command():
  quick_start = _readme().split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
  readme_cmds = re.findall(r"python -m pytest[^\n&;]*", quick_start)
  assert len(readme_cmds) == 1, readme_cmds
  with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
    ci_cmds = [line.strip() for line in f if line.strip().startswith("python -m pytest")]
  assert ci_cmds == [readme_cmds[0].strip()]
