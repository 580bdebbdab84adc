r"""The fault suite's probe: one command a user could type, what it must answer, and what it must
leave alone.

    probe = Probe(["train.py", "--config", "configs/demo.py", ...], code=2,
                  line=r"^error: --config.optim.lr=-1\.0 .*", unchanged=[workdir])
    run_probe(probe)   # asserts the exit code, the one line on stderr, and that every file under
                       # each `unchanged` path has the bytes it had before (and none appeared or went)

`line` is a regular expression for the last line of stderr; with `one_line` (the default for a
user error, exit status 2) stderr must be that line alone, never a traceback (progress bars aside).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import subprocess
import sys

PROGRESS = re.compile(r"^\s*[\w ]+:\s+\d+%\|")  # a tqdm bar (train:  25%|██▌ ...), not a message
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Probe:
  argv: list[str]                 # after `python`: a script or -m module and its arguments
  code: int                       # the expected exit status
  line: str                       # regex for the last line of stderr
  unchanged: list[str] = dataclasses.field(default_factory=list)  # paths whose every file must keep its bytes
  one_line: bool | None = None    # stderr is exactly `line` (default: when code == 2)
  env: dict = dataclasses.field(default_factory=dict)
  timeout: float = 180


def tree_hash(path: str) -> dict[str, str]:
  """{relative path: sha256} of every file under `path` (a file: itself); {} if absent."""
  path = os.fspath(path)
  if os.path.isfile(path):
    return {".": _sha(path)}
  out = {}
  for folder, dirs, files in os.walk(path):
    dirs.sort()
    for name in sorted(files):
      full = os.path.join(folder, name)
      if os.path.isfile(full):
        out[os.path.relpath(full, path)] = _sha(full)
  return out


def _sha(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def run(argv, *, env=None, timeout=180, **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, env={**os.environ, **(env or {})}, **kwargs)


def run_probe(probe: Probe) -> subprocess.CompletedProcess:
  before = {p: tree_hash(p) for p in map(str, probe.unchanged)}
  result = run(probe.argv, env=probe.env, timeout=probe.timeout)
  shown = f"$ python {' '.join(map(str, probe.argv))}\nstatus {result.returncode}\nstderr:\n{result.stderr[-4000:]}"
  assert result.returncode == probe.code, shown
  lines = [l for l in result.stderr.splitlines() if l.strip() and not PROGRESS.match(l)]
  assert lines, shown
  assert re.search(probe.line, lines[-1]), f"last line does not match {probe.line!r}\n{shown}"
  if probe.one_line if probe.one_line is not None else probe.code == 2:
    assert len(lines) == 1, f"expected one line on stderr\n{shown}"
  for p, hashes in before.items():
    after = tree_hash(p)
    changed = sorted(k for k in hashes.keys() | after.keys() if hashes.get(k) != after.get(k))
    assert not changed, f"{p}: changed, added or removed {changed[:10]}\n{shown}"
  return result
