"""One path layer for everything a run writes or reads in its workdir, local or remote.

A workdir is a local path or a URL that etils.epath understands, so `--workdir gs://bucket/run`
writes to the bucket, never to a local folder named `gs:`. Orbax uses the same layer for the
checkpoints, and reaches local paths and gs:// only (bridgejax.train.checkpoint says so).

    p = paths.path(workdir) / "config.json"     # an epath.Path
    paths.write_text(p, text)                   # atomic: local tmp + rename; one object put remotely
    paths.read_json(p), paths.write_json(p, obj)
    with paths.WorkdirLock(workdir): ...        # one training per workdir

Object stores cannot append, so `AppendFile` on a remote path keeps the file's lines and rewrites
the whole object, at most every `flush_every_s` seconds and on close.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import socket
import threading
import time
import uuid

from absl import logging
from etils import epath
import fsspec

from bridgejax.errors import UserError


def is_remote(p) -> bool:
  return "://" in os.fspath(p)


# The package etils.epath reaches each remote scheme through: without it the first read or write
# would fail minutes in, deep inside a save, so path() refuses the URL up front.
BACKENDS = {"gs": "gcsfs", "s3": "s3fs"}
_MALFORMED_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/*(?=[^/])")  # gs:/bucket, gs:bucket, s3:///b


def _has_filesystem(scheme: str) -> bool:
  """Whether fsspec (etils.epath's backend for URLs) can reach `scheme`: its package imports, or a
  filesystem was registered for it."""
  try:
    fsspec.get_filesystem_class(scheme)
  except (ImportError, ValueError):
    return False
  return True


def path(p) -> epath.Path:
  """`p` as an epath.Path: local paths made absolute, URLs kept (their scheme picks the backend).
  A URL with a slash missing (`gs:/bucket`) is refused rather than taken for a local folder `gs:`."""
  text = os.fspath(p)
  if not is_remote(text):
    malformed = _MALFORMED_URL.match(text)
    if malformed and malformed.group(1).lower() in BACKENDS:
      scheme = malformed.group(1)
      raise UserError(f"{text!r} looks like a {scheme}:// URL with a slash missing; write "
                      f"{scheme}://{text[malformed.end():]} (or ./{text} for a local folder)")
    return epath.Path(os.path.abspath(os.path.expanduser(text)))
  scheme = text.split("://", 1)[0]
  backend = BACKENDS.get(scheme.lower())
  if backend and not _has_filesystem(scheme):
    raise UserError(f"{text!r}: {scheme}:// paths need the {backend} package; pip install {backend}")
  try:
    return epath.Path(text)
  except KeyError:
    raise UserError(f"unsupported path scheme {scheme}:// in {text!r}; use a local path or gs://") from None


def exists(p) -> bool:
  return path(p).exists()


def makedirs(p) -> epath.Path:
  p = path(p)
  p.mkdir(parents=True, exist_ok=True)
  return p


def read_text(p) -> str:
  return path(p).read_text()


def read_json(p):
  return json.loads(read_text(p))


def write_text(p, text: str) -> None:
  """Writes a whole file so a reader never sees it half written: a local temp file renamed over
  it; remotely one object upload (atomic on object stores)."""
  p = path(p)
  p.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(p):
    p.write_text(text)
    return
  tmp = f"{p}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, p)


def write_json(p, obj, **kwargs) -> None:
  write_text(p, json.dumps(obj, **{"indent": 2, **kwargs}))


def move(src, dst) -> None:
  """Renames a file or folder; on object stores (no folder renames) copies each file, then deletes."""
  src, dst = path(src), path(dst)
  if not is_remote(src):
    os.replace(src, dst)
    return

  def copy(a, b):  # iterdir keeps the scheme (walk drops it, rglob is refused on gs://)
    if a.is_dir():
      b.mkdir(parents=True, exist_ok=True)
      for child in a.iterdir():
        copy(child, b / child.name)
    else:
      b.write_bytes(a.read_bytes())

  copy(src, dst)
  src.rmtree()


class AppendFile:
  """A text file appended line by line: a plain append locally; remotely (no appends on object
  stores) the lines are kept and the object rewritten at most every `flush_every_s` and on close."""

  def __init__(self, p, flush_every_s: float = 30.0):
    self.path = path(p)
    self._remote = is_remote(self.path)
    if not self._remote:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._file = open(self.path, "a", encoding="utf-8")
      return
    self._text = self.path.read_text() if self.path.exists() else ""
    self._flush_every_s, self._last_flush, self._dirty = flush_every_s, 0.0, False

  def write(self, line: str) -> None:
    if not self._remote:
      self._file.write(line)
      self._file.flush()
      return
    self._text += line
    self._dirty = True
    if time.time() - self._last_flush >= self._flush_every_s:
      self.flush()

  def flush(self) -> None:
    if self._remote and self._dirty:
      write_text(self.path, self._text)
      self._last_flush, self._dirty = time.time(), False

  def close(self) -> None:
    if self._remote:
      self.flush()
    else:
      self._file.close()


class WorkdirLockedError(UserError):
  pass


class WorkdirLock:
  """`WORKDIR/lock`: one training per workdir. It holds the owner's pid, host and start time and
  is removed on exit.

  Locally the lock file is created with O_EXCL, so two processes never both get it. A lock left by
  a process that died on this host (its pid is gone) is taken over with a warning. A lock held by
  another host counts as live while its heartbeat (the file is rewritten every `heartbeat_s`) is
  younger than `stale_after_s`, so a run restarted on a new host after a hard kill still resumes.
  Remote workdirs (object stores) have no exclusive create: the lock is checked, then written,
  then read back, which catches every overlap but two starts within the same second (best effort).
  """

  def __init__(self, workdir, *, heartbeat_s: float = 60.0, stale_after_s: float = 600.0):
    self.path = path(workdir) / "lock"
    self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
    self._token, self._started = uuid.uuid4().hex, ""
    self._stop = threading.Event()
    self._thread = None

  def _record(self) -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": self._started,
                       "heartbeat": time.time(), "token": self._token})

  def _holder(self) -> dict | None:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (ValueError, OSError):  # being written this instant, or left empty by a crash
      modified = os.path.getmtime(self.path) if not is_remote(self.path) else 0.0
      return {"unreadable": True, "pid": "unknown", "host": "unknown", "started": "unknown", "heartbeat": modified}

  def _live(self, holder: dict) -> bool:
    if holder.get("unreadable"):  # a creator writes its record right after creating the file: an
      return time.time() - holder["heartbeat"] < 5.0  # unreadable lock older than that was left by a crash
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
      try:
        os.kill(holder["pid"], 0)
      except ProcessLookupError:
        return False
      except PermissionError:
        return True
      return True
    return time.time() - float(holder.get("heartbeat") or 0) < self.stale_after_s

  def _create(self) -> bool:
    """Creates the lock file if absent; whether it did."""
    self._started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if not is_remote(self.path):
      try:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, "w") as f:
        f.write(self._record())
      return True
    if self.path.exists():
      return False
    self.path.write_text(self._record())
    time.sleep(1.0)  # let a concurrent writer's put land, then see who won
    holder = self._holder()
    return holder is not None and holder.get("token") == self._token

  def acquire(self) -> "WorkdirLock":
    for _ in range(3):
      if self._create():
        break
      holder = self._holder()
      if holder is None:
        continue  # released meanwhile
      if self._live(holder):
        raise WorkdirLockedError(
            f"{self.path.parent} is in use by another training (pid {holder.get('pid')} on host "
            f"{holder.get('host')}, started {holder.get('started')}); wait for it to finish or use another "
            f"--workdir. If that process is gone, delete {self.path}")
      if holder.get("unreadable"):
        logging.warning("taking over the lock %s: it is empty or unreadable (left by a crash)", self.path)
      else:
        logging.warning("taking over the stale lock %s of pid %s on host %s (started %s; that process is gone)",
                        self.path, holder.get("pid"), holder.get("host"), holder.get("started"))
      with contextlib.suppress(FileNotFoundError):
        self.path.unlink()
    else:
      raise WorkdirLockedError(f"could not take the lock {self.path}; another training keeps taking it")
    self._thread = threading.Thread(target=self._beat, daemon=True, name="bridgejax-workdir-lock")
    self._thread.start()
    return self

  def _beat(self):
    while not self._stop.wait(self.heartbeat_s):
      with contextlib.suppress(Exception):  # a missed heartbeat only makes the lock look older
        write_text(self.path, self._record())

  def release(self) -> None:
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    self._thread = None
    holder = self._holder()
    if holder is not None and holder.get("token") == self._token:
      with contextlib.suppress(FileNotFoundError):
        self.path.unlink()

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
