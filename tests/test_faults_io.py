"""The fault suite for the CLIs that read and write users' files (issue 25): export, serve, predict
and prepare, run as a user runs them (fault_helper.Probe). Nothing may delete or replace what it
did not create, and bad input is one `error: ...` line with exit status 2, never a traceback.

The export probes run on a fake run (config.json and a checkpoint folder: they fail before, or at,
reading it); predict and serve on the tiny toy-world run of tiny_eval_world, built once.
"""

import json
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from fault_helper import Probe, run_probe  # noqa: E402

PREVIOUS_EXPORT = {"bridgejax.json": json.dumps({"format": 1, "step": 2, "backbones": {}}),
                   "model.safetensors": "old weights", "config.json": "{}", "README.md": "# old card",
                   "eval/caption.json": "{}"}


def _write(folder, files: dict) -> str:
  for name, text in files.items():
    path = os.path.join(folder, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.write(text)
  return str(folder)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """runs/run1: a fake training run whose checkpoint cannot be read; a previous export; a folder of
  the user's that is not an export."""
  root = tmp_path_factory.mktemp("faults_io")
  run = _write(root / "runs" / "run1", {"config.json": json.dumps({"name": "fake"}), "checkpoints/3/junk": "x"})
  _write(root / "runs" / "run2", {"config.json": "{}", "notes.md": "another run"})
  return {"root": root, "runs": str(root / "runs"), "run": run,
          "previous": _write(root / "exports" / "bridge", PREVIOUS_EXPORT),
          "mine": _write(root / "mine", {"notes.txt": "not an export", "photos/cat.jpg": "x"})}


def _export(run, out, *more):
  return ["-m", "bridgejax.export", "--workdir", run, "--out", out, *more]


# --- export --------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["workdir", "parent", "inside"])
def test_export_never_overwrites_the_run(runs, where):
  """`--out RUN --overwrite` deleted the run; `--out runs/` every run in the folder."""
  out = {"workdir": runs["run"], "parent": runs["runs"], "inside": os.path.join(runs["run"], "export")}[where]
  word = {"workdir": "is", "parent": "contains", "inside": "is inside"}[where]
  run_probe(Probe(_export(runs["run"], out, "--overwrite"), 2,
                  rf"^error: --out '{re.escape(out)}' {word} --workdir .*; pass a folder outside the training run$",
                  unchanged=[runs["runs"]]))


def test_export_overwrites_only_a_previous_export(runs):
  run_probe(Probe(_export(runs["run"], runs["mine"], "--overwrite"), 2,
                  r"^error: --out .* holds notes\.txt, photos/, which export did not write; --overwrite replaces "
                  r"only a previous export: pass another --out$", unchanged=[runs["mine"], runs["runs"]]))


def test_a_failed_export_leaves_the_previous_one(runs):
  """The checkpoint cannot be read: the previous export was already deleted; now it stays, and no
  temporary folder is left beside it (the checkpoint's own warnings come first, so not one line)."""
  exports = os.path.dirname(runs["previous"])
  run_probe(Probe(_export(runs["run"], runs["previous"], "--overwrite"), 2, r"^error: .*checkpoint",
                  unchanged=[exports, runs["runs"]], one_line=False))
  assert os.listdir(exports) == ["bridge"]


@pytest.mark.parametrize("repo_id,line", [
    ("org/bad..name", r"^error: --push 'org/bad\.\.name': expected a Hub repo id, org/name \(.*\)$"),
    ("org/fine-name", r"^error: --push needs a Hugging Face login and there is none: run `hf auth login` .*HF_TOKEN"),
])
def test_push_is_checked_before_the_export(runs, repo_id, line):
  """A bad repo id or no login: refused before the folder is written (it was written, then the push failed)."""
  no_login = {"HF_TOKEN": "", "HUGGING_FACE_HUB_TOKEN": "", "HF_TOKEN_PATH": str(runs["root"] / "no_token"),
              "HF_HUB_OFFLINE": "1", "HF_OIDC_RESOURCE": ""}
  out = str(runs["root"] / "pushed")
  run_probe(Probe(_export(runs["run"], out, "--push", repo_id), 2, line, unchanged=[runs["runs"]], env=no_login))
  assert not os.path.exists(out)


# --- predict and serve ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """The tiny toy-world run, and image folders: images in two subfolders plus a corrupt one; only bad ones."""
  import tiny_eval_world as tw
  from bridgejax.data.records import open_split
  root = tmp_path_factory.mktemp("faults_io_images")
  split = open_split(tw.world()["data"], "val")
  mixed = root / "mixed"
  for i, sub in enumerate(("a", "b")):
    (mixed / sub).mkdir(parents=True)
    (mixed / sub / f"img{i}.png").write_bytes(split[i]["image"])
  (mixed / "b" / "corrupt.png").write_bytes(b"not a png")
  bad = _write(root / "bad", {"empty.jpg": "", "corrupt.png": "not a png"})
  return {"workdir": tw.workdir_with_checkpoint(), "mixed": str(mixed), "bad": bad, "root": root,
          "image": str(mixed / "a" / "img0.png")}


def test_max_new_tokens_must_be_a_positive_integer(runs):
  """`--max-new-tokens 1e5` was argparse's usage and 'invalid int value'; checked before the model loads."""
  run_probe(Probe(["-m", "bridgejax.predict", "--workdir", runs["run"], "caption", "x.png", "--max-new-tokens", "1e5"],
                  2, r"^error: --max-new-tokens '1e5' is not a positive integer: pass how many tokens to generate, "
                  r"e\.g\. 32$"))


def test_max_new_tokens_must_fit_the_context(tiny):
  run_probe(Probe(["-m", "bridgejax.predict", "--workdir", tiny["workdir"], "caption", tiny["image"],
                   "--max-new-tokens", "100000"], 2,
                  r"^error: max_new_tokens=100,000 does not fit: the LM's context holds 512 positions "
                  r"\(max_position_embeddings\), \d+ of them for the image's visual tokens and at least 1 for the "
                  r"prompt; ask for at most \d+ new tokens$", unchanged=[tiny["workdir"]]))


def test_predict_index_skips_an_unreadable_image(tiny):
  out = str(tiny["root"] / "index.npz")
  result = run_probe(Probe(["-m", "bridgejax.predict", "--workdir", tiny["workdir"], "index", tiny["mixed"], "--out", out],
                           0, r"^warning: skipped 1 of 3 images under .* that cannot be read: .*corrupt\.png "
                           r"\(corrupt: .*\); the index holds the other 2$", unchanged=[tiny["mixed"]]))
  assert result.stdout.splitlines()[1:] == ["images\t2", "skipped\t1"]


def test_serve_without_a_readable_image_is_one_line(tiny):
  pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[demo]')")
  run_probe(Probe(["-m", "bridgejax.serve", "--workdir", tiny["workdir"], "--index", tiny["bad"]], 2,
                  r"^error: none of the 2 images under .* can be read \(e\.g\. .*: .*\); pass a folder of readable "
                  r"images$", unchanged=[tiny["bad"]]))


SERVE_WITHOUT_SERVER = """import json, sys
import gradio as gr
from bridgejax import serve
gr.Blocks.launch = lambda self, **kw: print("allowed_paths", json.dumps(kw["allowed_paths"]), file=sys.stderr)
sys.exit(serve.main(sys.argv[1:]))
"""


def test_serve_allows_exactly_the_index_images(tiny):
  """Images in two folders gave Gradio their common ancestor (with images in /data and /home: '/'),
  so --host 0.0.0.0 served any readable file. The real CLI, with launch() replaced by a print."""
  pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[demo]')")
  want = sorted(os.path.join(tiny["mixed"], p) for p in ("a/img0.png", "b/img1.png"))
  result = run_probe(Probe(["-c", SERVE_WITHOUT_SERVER, "--workdir", tiny["workdir"], "--index", tiny["mixed"],
                            "--host", "0.0.0.0"], 0, "^" + re.escape("allowed_paths " + json.dumps(want)) + "$",
                           unchanged=[tiny["mixed"]]))
  assert "warning: skipped 1 of 3 images" in result.stderr  # the corrupt one, in one line


# --- prepare -------------------------------------------------------------------------------------

def _prepare(src, out, *more):
  return ["-m", "bridgejax.prepare", "jsonl", "--src", str(src), "--out", str(out), "--workers", "0", *more]


def test_prepare_skips_undecodable_and_unterminated_rows(tmp_path):
  """A non-UTF-8 byte aborted the whole run, naming neither file nor line; a BOM lost row 1; an
  unterminated quote merged every following row into one."""
  from PIL import Image
  Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "a.jpg")
  src = tmp_path / "d.csv"
  src.write_bytes(b"\xef\xbb\xbfimage,caption\r\na.jpg,first\r\na.jpg,caf\xe9\r\na.jpg,\"never closed\r\n"
                  b"a.jpg,last\r\n")
  out = tmp_path / "out"
  result = run_probe(Probe(_prepare(src, out), 0, r"jsonl train", unchanged=[src], one_line=False))
  assert "2 written, 2 skipped of 4" in result.stdout, result.stdout
  skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
  assert [(s["source"], s["reason"]) for s in skipped] == [("d.csv:3", "bad_row"), ("d.csv:4", "bad_row")]
  assert skipped[0]["detail"].startswith("not UTF-8 text") and "not closed" in skipped[1]["detail"]


def test_prepare_with_an_undecodable_header_is_one_line(tmp_path):
  src = tmp_path / "d.csv"
  src.write_bytes(b"im\xe4ge,caption\na.jpg,x\n")
  run_probe(Probe(_prepare(src, tmp_path / "out", "--quiet"), 2,
                  rf"^error: {re.escape(str(src))}:1: cannot read the header line: not UTF-8 text \(byte 0xe4 .*\); "
                  r"save the file as UTF-8$", unchanged=[tmp_path]))
