"""What the registry tests share: a docs page's example module, and dropping a module into a
registry's package as a user would (a new file there), found by the package's own discovery."""

import contextlib
import os
import re
import shutil
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def docs_example(page: str, heading: str) -> str:
  """The first ```python block after `heading` in docs/<page>."""
  text = open(os.path.join(REPO, "docs", page)).read()
  return re.search(r"```python\n(.*?)```", text[text.index(heading):], re.S).group(1)


@contextlib.contextmanager
def dropped_in(monkeypatch, package, name: str, source: str):
  """`source` as <package>/<name>.py (a folder added to the package's search path), rediscovered by
  package._discover() and put in package.REGISTRY; yields its declaration, then removes it."""
  folder = tempfile.mkdtemp()
  with open(os.path.join(folder, f"{name}.py"), "w") as f:
    f.write(source)
  monkeypatch.setattr(package, "__path__", [*package.__path__, folder])
  found = package._discover()
  assert set(found) == set(package.REGISTRY) | {name}
  monkeypatch.setitem(package.REGISTRY, name, found[name])
  try:
    yield found[name]
  finally:
    sys.modules.pop(f"{package.__name__}.{name}", None)
    shutil.rmtree(folder)
