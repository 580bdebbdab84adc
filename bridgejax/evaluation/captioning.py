"""Image-captioning metrics, equal to the COCO caption evaluation (pycocoevalcap 1.2).

`score` computes what pycocoevalcap's `COCOEvalCap.evaluate` computes, minus SPICE:
  1. PTB tokenization of predictions and references (Stanford CoreNLP 3.4.1 `PTBTokenizer
     -preserveLines -lowerCase`, then pycocoevalcap's punctuation tokens dropped);
  2. `Bleu(4)` (corpus BLEU-1..4, 'closest' reference length), `Meteor` (METEOR 1.5,
     `-l en -norm`, corpus score from the summed statistics), `Rouge` (ROUGE-L, beta 1.2, mean over
     images) and `Cider` (CIDEr, sigma 6, idf from the evaluated references, mean over images).
Values are on pycocoevalcap's 0-1 scale (CIDEr is not bounded by 1), unrounded.

SPICE is never computed: its jar downloads Stanford CoreNLP 3.6.0 models on first use, which an
offline machine cannot do. `score` returns `"SPICE": None` and `UNAVAILABLE` says why.

What differs from calling pycocoevalcap's classes directly (only in ways that cannot change a score):
  * Tokenization calls the same jar with the same flags but writes its temporary file to the system
    temp directory (pycocoevalcap writes into site-packages), and first replaces every line-break
    character (`\\r`, `\\x0b`, `\\x0c`, `\\u2028`, ... ; pycocoevalcap replaces only `\\n`) by a
    space. The PTB tokenizer splits lines at those characters, so pycocoevalcap would silently pair
    every later caption with the wrong image; here the line count is also checked.
  * METEOR runs through `Meteor` below: the same jar, command and line protocol as pycocoevalcap's
    `Meteor.compute_score`, but with a reader thread and timeouts instead of blocking reads under a
    lock that is never released on error (the known pycocoevalcap hang), and a subprocess that is
    always closed (`close()`, context manager, or garbage collection) so no Java process is leaked.

Empty predictions are scored as empty strings, never dropped: the PTB tokenizer keeps their (empty)
line, and every scorer gives an empty hypothesis its meaning (no n-gram matches; BLEU's brevity
penalty; ROUGE-L 0; CIDEr 0; METEOR 0, its reference length still counted in the corpus statistics).
Captions that become empty after tokenization (e.g. "...") are treated the same way.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Hashable, Mapping, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as _pycoco_meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer as _pycoco_ptb

from bridgejax.errors import UserError
from bridgejax.evaluation import check_same_ids

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
UNAVAILABLE = {
    "SPICE": "not computed: SPICE needs Stanford CoreNLP 3.6.0 models that pycocoevalcap downloads on "
             "first use (get_stanford_models), which is impossible offline",
}

PTB_JAR = os.path.join(os.path.dirname(os.path.abspath(_pycoco_ptb.__file__)),
                       _pycoco_ptb.STANFORD_CORENLP_3_4_1_JAR)
METEOR_JAR_DIR = os.path.dirname(os.path.abspath(_pycoco_meteor.__file__))
METEOR_COMMAND = ("java", "-jar", "-Xmx2G", _pycoco_meteor.METEOR_JAR, "-", "-", "-stdio", "-l", "en", "-norm")
PUNCTUATIONS = frozenset(_pycoco_ptb.PUNCTUATIONS)

# Everything Python's str.splitlines() splits at; Java's PTB lexer splits lines at most of them.
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def cut_caption(text: str, rule: str = "fromage") -> str:
  """Cuts a generated caption the way FROMAGe does before scoring it.

  rule="fromage" (default) transcribes FROMAGe's code (`fromage/utils.py: truncate_caption`,
  followed by `.strip()` as in the thesis fork's `evals/eval_ms_coco_generation.py`): if the text
  has a newline, keep everything up to the first newline; otherwise keep everything up to and
  including the first '.'; then strip. So a newline wins over an earlier period
  ("a dog. a cat\\nx" -> "a dog. a cat") and the period is kept (the PTB tokenizer drops it).

  rule="first" is the rule as the papers state it: cut before the first '.' or newline, whichever
  comes first, then strip ("a dog. a cat\\nx" -> "a dog").
  """
  if rule == "fromage":
    cut = text.find("\n") + 1
    if cut <= 0:
      cut = text.find(".") + 1
    if cut > 0:
      text = text[:cut]
    return text.strip()
  if rule == "first":
    return re.split(r"[.\n]", text, maxsplit=1)[0].strip()
  raise UserError(f"unknown cut rule {rule!r}; use 'fromage' or 'first'")


def _java() -> str:
  java = shutil.which("java")
  if java is None:
    raise UserError("the PTB tokenizer and METEOR need Java (8 or newer) on PATH; none was found")
  return java


def ptb_tokenize(captions: Mapping[Hashable, Sequence[str]], timeout: float = 600.0) -> dict[Hashable, list[str]]:
  """pycocoevalcap's `PTBTokenizer().tokenize`, taking plain strings: {id: [caption, ...]} -> same shape.

  Lowercased PTB tokens joined by single spaces, pycocoevalcap's punctuation tokens removed.
  """
  order = [(key, len(caps)) for key, caps in captions.items()]
  sentences = [_LINE_BREAKS.sub(" ", caption) for caps in captions.values() for caption in caps]
  if not sentences:
    return {key: [] for key, _ in order}
  fd, path = tempfile.mkstemp(prefix="bridgejax_ptb_", suffix=".txt")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write("\n".join(sentences).encode())
    proc = subprocess.run(
        [_java(), "-cp", PTB_JAR, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", path],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False)
  finally:
    os.remove(path)
  if proc.returncode != 0:
    raise RuntimeError(f"the PTB tokenizer failed (exit {proc.returncode}): {_tail(proc.stderr)}")
  lines = proc.stdout.decode().split("\n")
  if len(lines) == len(sentences) + 1 and lines[-1] == "":
    lines.pop()
  if len(lines) != len(sentences):
    raise RuntimeError(f"the PTB tokenizer returned {len(lines)} lines for {len(sentences)} captions")
  tokenized, start = {}, 0
  for key, count in order:
    tokenized[key] = [" ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS)
                      for line in lines[start:start + count]]
    start += count
  return tokenized


def _tail(data: bytes, chars: int = 2000) -> str:
  text = data.decode(errors="replace").strip()
  return text[-chars:] if text else "(no output on stderr)"


class Meteor:
  """METEOR 1.5 through pycocoevalcap's jar, with the same protocol as its `Meteor.compute_score`.

  One Java process per instance (its start-up, loading the paraphrase table, takes seconds). Use it
  as a context manager, or call `close()`; an instance that is garbage-collected closes too. Every
  read from the process has a timeout, and a failed exchange closes the process and raises.
  """

  def __init__(self, timeout: float = 600.0, close_timeout: float = 5.0, command: Sequence[str] | None = None):
    """timeout: seconds to wait for each line of METEOR output (the first includes the start-up).
    close_timeout: seconds `close` waits for the process to exit on its own before killing it.
    command: the process to run (tests only); default `METEOR_COMMAND` with the `java` on PATH."""
    self.timeout = timeout
    self._stderr = tempfile.TemporaryFile()
    command = [_java(), *METEOR_COMMAND[1:]] if command is None else list(command)
    self._proc = subprocess.Popen(command, cwd=METEOR_JAR_DIR, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self._stderr)
    self._lines: queue.Queue = queue.Queue()
    self._reader = threading.Thread(target=_pump, args=(self._proc.stdout, self._lines), daemon=True,
                                    name="meteor-stdout")
    self._reader.start()
    self._lock = threading.Lock()
    self._closer = weakref.finalize(self, _shutdown, self._proc, self._reader, self._stderr, close_timeout)

  @property
  def pid(self) -> int:
    return self._proc.pid

  def compute_score(self, gts: Mapping[Hashable, Sequence[str]],
                    res: Mapping[Hashable, Sequence[str]]) -> tuple[float, list[float]]:
    """Same inputs and outputs as pycocoevalcap's `Meteor.compute_score`: tokenized strings,
    exactly one hypothesis per id; returns (corpus METEOR, per-id METEOR in `gts` order)."""
    check_same_ids(res, gts, ("hypotheses", "references"))
    for key in gts:
      if len(res[key]) != 1:
        raise ValueError(f"id {key!r} has {len(res[key])} hypotheses; METEOR takes exactly one")
    keys = list(gts)
    with self._lock:
      if not self._closer.alive:
        raise RuntimeError("this Meteor has been closed")
      try:
        stats = self._exchange([_score_line(res[key][0], gts[key]) for key in keys], len(keys))
        eval_line = " ||| ".join(["EVAL", *(s.decode().strip() for s in stats)])
        out = self._exchange([eval_line.encode()], len(keys) + 1)
        scores = [float(line.strip()) for line in out]
      except BaseException:
        self.close()
        raise
    return scores[-1], scores[:-1]

  def _exchange(self, lines: list[bytes], expect: int) -> list[bytes]:
    try:
      self._proc.stdin.write(b"".join(line + b"\n" for line in lines))
      self._proc.stdin.flush()
    except (BrokenPipeError, OSError) as e:
      raise RuntimeError(f"the METEOR process died: {self._stderr_tail()}") from e
    out = []
    for _ in range(expect):
      try:
        line = self._lines.get(timeout=self.timeout)
      except queue.Empty:
        raise TimeoutError(f"METEOR gave no output for {self.timeout} s") from None
      if line is None:
        raise RuntimeError(f"the METEOR process exited early: {self._stderr_tail()}")
      out.append(line)
    return out

  def _stderr_tail(self) -> str:
    try:
      self._stderr.seek(0)
      return _tail(self._stderr.read())
    except (OSError, ValueError):
      return "(stderr unavailable)"

  def close(self) -> None:
    """Ends the Java process (closes its stdin, waits, kills it if it lingers). Idempotent."""
    self._closer()

  def __enter__(self) -> Meteor:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _score_line(hypothesis: str, references: Sequence[str]) -> bytes:
  # As pycocoevalcap's Meteor._stat. '|||' separates fields and a newline ends a request; inside a
  # reference either would desynchronise the protocol (pycocoevalcap then hangs), so they go too.
  hypothesis = _LINE_BREAKS.sub(" ", hypothesis).replace("|||", "").replace("  ", " ")
  references = [_LINE_BREAKS.sub(" ", r).replace("|||", "") for r in references]
  return " ||| ".join(("SCORE", " ||| ".join(references), hypothesis)).encode()


def _pump(stream, lines: queue.Queue) -> None:
  try:
    for line in iter(stream.readline, b""):
      lines.put(line)
  except (OSError, ValueError):
    pass
  finally:
    lines.put(None)


def _shutdown(proc: subprocess.Popen, reader: threading.Thread, stderr, close_timeout: float) -> None:
  try:
    proc.stdin.close()
  except OSError:
    pass
  try:
    proc.wait(timeout=close_timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
  reader.join(timeout=close_timeout)
  proc.stdout.close()
  stderr.close()


def _validate(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> None:
  check_same_ids(predictions, references)
  for key, prediction in predictions.items():
    if not isinstance(prediction, str):
      raise TypeError(f"prediction for id {key!r} is a {type(prediction).__name__}, not a str")
  for key, refs in references.items():
    if isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
      raise TypeError(f"references for id {key!r} must be a list of str, got {refs!r}")
    if not refs:
      raise ValueError(f"id {key!r} has no reference captions")


def score_details(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], *,
                  meteor: Meteor | None = None) -> tuple[dict[str, float | None], dict[Hashable, dict[str, float]]]:
  """`score`, plus per-id METEOR, ROUGE-L, CIDEr and sentence BLEU-1..4 (pycocoevalcap's per-image values)."""
  _validate(predictions, references)
  if not predictions:
    raise ValueError("no predictions to score")
  keys = list(references)
  # Two tokenizer runs, as COCOEvalCap does (the PTB lexer carries some state from line to line).
  gts = ptb_tokenize({k: references[k] for k in keys})
  res = ptb_tokenize({k: [predictions[k]] for k in keys})

  corpus: dict[str, float | None] = {}
  per_id: dict[Hashable, dict[str, float]] = {k: {} for k in keys}
  bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
  for n in range(4):
    corpus[f"BLEU-{n + 1}"] = float(bleu[n])
    for k, value in zip(keys, bleu_per[n]):
      per_id[k][f"BLEU-{n + 1}"] = float(value)
  if meteor is None:
    with Meteor() as own:
      meteor_score, meteor_per = own.compute_score(gts, res)
  else:
    meteor_score, meteor_per = meteor.compute_score(gts, res)
  corpus["METEOR"] = float(meteor_score)
  for name, (value, values) in (("METEOR", (meteor_score, meteor_per)),
                                ("ROUGE-L", Rouge().compute_score(gts, res)),
                                ("CIDEr", Cider().compute_score(gts, res))):
    corpus[name] = float(value)
    for k, v in zip(keys, values):
      per_id[k][name] = float(v)
  corpus["SPICE"] = None
  return corpus, per_id


def score(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], *,
          meteor: Meteor | None = None) -> dict[str, float | None]:
  """COCO caption metrics of {id: generated caption} against {id: [reference captions]}.

  Returns {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr": float (0-1 scale),
  "SPICE": None (unavailable offline, see `UNAVAILABLE`)}. Pass raw text; tokenization happens
  here. Cut generations first (`cut_caption`) if the protocol asks for it. Ids must match exactly.
  `meteor`: an open `Meteor` to reuse across calls (saves the Java start-up); by default one is
  started and closed inside the call.
  """
  return score_details(predictions, references, meteor=meteor)[0]
