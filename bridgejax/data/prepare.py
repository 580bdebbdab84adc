"""Prepare a dataset once into array_record shards that the grain pipelines read.

    python -m bridgejax.prepare cc3m    --src IMG2DATASET_DIR_OR_TSV [--images DIR] --out DIR [--split train]
    python -m bridgejax.prepare coco    --src dataset_coco.json|captions_val2017.json [--images ROOT] --out DIR
    python -m bridgejax.prepare vqav2   --src QUESTIONS.json [--annotations ANN.json] --images DIR [DIR ...] --out DIR
    python -m bridgejax.prepare visdial --src visdial_1.0_val.json --images DIR [--dense DENSE.json] --out DIR
    python -m bridgejax.prepare jsonl   --src DATA.jsonl|.csv|.tsv [--images ROOT] --out DIR [--split train]
    python -m bridgejax.prepare toy     --out DIR [--num-train 10000 --num-val 1000 --num-test 1000 --seed 0]

Every image is decoded once here: a missing, empty, truncated or corrupt image (or a failed
download) is skipped, counted and listed in DIR/skipped.jsonl, and never stops the run; so is a
bad row of a JSONL/CSV/TSV (wrong types, null, no caption, a line that is not UTF-8, a CSV quote
never closed: listed as FILE:LINE) and an image path outside the base folder (--images, else the
data file's folder) unless --allow-outside-base is given. A UTF-8 byte-order mark is ignored.

A new DIR is built in a temporary folder next to it and renamed into place at the end, so a
failed or interrupted preparation leaves nothing behind; so does one that writes no example at
all (an error, exit status 2). Splits can be added to an existing DIR (e.g. CC3M val after
train); --overwrite replaces a split, and that split's old skipped.jsonl lines go with it.
Errors in the input are reported on one line (`error: ...`); --debug adds the traceback.

The command line is bridgejax/prepare.py (`python -m bridgejax.prepare`): it adds bridgejax.toy's `toy`
subcommand to COMMANDS, so the library here never imports the toy world.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from tqdm import tqdm

from bridgejax import cli
from bridgejax.data.records import SKIPPED_FILE, DatasetWriter
from bridgejax.data.sources import cc3m, coco, jsonl, visdial, vqav2
from bridgejax.data.sources.common import ImageLoader, write_examples, write_image_table
from bridgejax.errors import UserError


def progress_bar(desc: str, total: int | None = None, quiet: bool = False) -> tqdm:
  return tqdm(total=total, desc=desc, unit="ex", disable=quiet, dynamic_ncols=True, mininterval=0.5)


# --- output -------------------------------------------------------------------------------------

def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def _staged(out: Path) -> Iterator[Path]:
  """The folder to write: a new `out` (absent or empty) is built in a temporary folder next to it
  and renamed into place only on success; an existing one is added to in place (DatasetWriter
  renames its shards into place only on success) and gets its skipped.jsonl back on failure."""
  if not out.exists() or (out.is_dir() and not any(out.iterdir())):
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
      yield tmp
      os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private
      if out.exists():
        out.rmdir()
      os.replace(tmp, out)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
    return
  skipped = out / SKIPPED_FILE
  before = skipped.read_bytes() if skipped.exists() else None
  try:
    yield out
  except BaseException:
    if before is None:
      skipped.unlink(missing_ok=True)
    else:
      skipped.write_bytes(before)
    raise


def _drop_old_skips(skipped: Path, old_size: int, splits: Iterable[str]) -> None:
  """skipped.jsonl lines before `old_size` that belong to `splits` were of the splits this run
  replaced (--overwrite): drop them, keeping other splits' lines and this run's."""
  if not skipped.exists() or not old_size:
    return
  data = skipped.read_bytes()
  old, new, splits = data[:old_size].decode(), data[old_size:].decode(), set(splits)
  kept = [line for line in old.splitlines(keepends=True) if line.strip() and _split_of(line) not in splits]
  tmp = skipped.with_name(skipped.name + ".tmp")
  tmp.write_text("".join(kept) + new)
  os.replace(tmp, skipped)


def _split_of(line: str) -> str | None:
  try:
    return json.loads(line).get("split")
  except ValueError:
    return None


def _check_written(dw: DatasetWriter, src) -> None:
  """A split with no example is an error: nothing usable was found in `src`."""
  for name, writer in dw.splits.items():
    if writer.num_examples:
      continue
    skipped = dw.skipped.get(name, {})
    if not skipped:
      raise UserError(f"{src} holds no examples for split {name!r}: is it the right file (and format)?")
    why = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items(), key=lambda kv: -kv[1]))
    first = next((e for e in dw._first_skips if e["split"] == name), None)  # pylint: disable=protected-access
    example = f"; e.g. {first['source']}: {first['reason']} ({first['detail']})" if first else ""
    raise UserError(f"{src}: every example of split {name!r} was skipped ({why}){example}; nothing was "
                    "written. Check the paths (--images) and the file's format")


@contextlib.contextmanager
def dataset_writer(out, source: str, *, src=None, overwrite: bool = False, shard_bytes: int = 1 << 30,
             args: dict[str, Any] | None = None, require_examples: bool = True) -> Iterator[DatasetWriter]:
  """A DatasetWriter into `out`, staged (see _staged); with require_examples, an empty split fails
  the whole preparation. On success, the summary names `out`."""
  out = Path(out)
  with _staged(out) as where:
    skipped = where / SKIPPED_FILE
    old_size = skipped.stat().st_size if skipped.exists() else 0
    with DatasetWriter(where, source, overwrite=overwrite, shard_bytes=shard_bytes, args=args) as dw:
      yield dw
      if require_examples:
        _check_written(dw, src)
    _drop_old_skips(skipped, old_size, dw.splits)
  dw.out_dir = out  # the summary's path, after the rename


def _image_text(dw: DatasetWriter, split: str, examples: Iterable[dict], loader: ImageLoader,
                total: int | None, quiet: bool) -> None:
  writer = dw.split(split, "image_text")
  with progress_bar(f"{dw.source} {split}", total, quiet) as bar:
    write_examples(writer, loader, examples, bar.update)


def _prepare_single_split(source, examples, src, out, *, images=None, split: str = "train", workers: int = 0,
                          max_size: int | None = None, overwrite: bool = False, quiet: bool = True,
                          shard_bytes: int = 1 << 30, allow_outside_base: bool = False) -> dict[str, Any]:
  """A source with one image_text split: `examples(src, images, allow_outside_base=...)` yields its examples."""
  if not os.path.exists(src):  # before any worker starts
    raise FileNotFoundError(f"--src {src} does not exist")
  with dataset_writer(out, source, src=src, overwrite=overwrite, shard_bytes=shard_bytes,
                args=dict(src=src, images=images, max_size=max_size)) as dw, \
       ImageLoader(workers, max_size) as loader:
    _image_text(dw, split, examples(src, images, allow_outside_base=allow_outside_base), loader, None, quiet)
  return dw.summary()


def prepare_cc3m(src, out, **kwargs) -> dict[str, Any]:
  """CC3M (img2dataset output or the TSV); kwargs as _prepare_single_split."""
  return _prepare_single_split("cc3m", cc3m.examples, src, out, **kwargs)


def prepare_coco(src, out, *, images=None, split: str | None = None, restval_into_train: bool = True,
                 workers: int = 0, max_size: int | None = None, overwrite: bool = False,
                 quiet: bool = True, shard_bytes: int = 1 << 30, allow_outside_base: bool = False) -> dict[str, Any]:
  splits = coco.examples(src, images, split=split, restval_into_train=restval_into_train,
                         allow_outside_base=allow_outside_base)
  with dataset_writer(out, "coco", src=src, overwrite=overwrite, shard_bytes=shard_bytes,
                args=dict(src=src, images=images, max_size=max_size)) as dw, \
       ImageLoader(workers, max_size) as loader:
    for name, examples in splits.items():
      _image_text(dw, name, examples, loader, None, quiet)
  return dw.summary()


def prepare_jsonl(src, out, **kwargs) -> dict[str, Any]:
  """Users' own JSONL/CSV/TSV captions; kwargs as _prepare_single_split."""
  return _prepare_single_split("jsonl", jsonl.examples, src, out, **kwargs)


def prepare_vqav2(src, out, *, images, annotations=None, split: str | None = None, workers: int = 0,
                  max_size: int | None = None, overwrite: bool = False, quiet: bool = True,
                  shard_bytes: int = 1 << 30) -> dict[str, Any]:
  images = [images] if isinstance(images, (str, os.PathLike)) else list(images)
  name, image_list, questions = vqav2.read(src, annotations, images, split=split)
  with dataset_writer(out, "vqav2", src=src, overwrite=overwrite, shard_bytes=shard_bytes,
                args=dict(src=src, annotations=annotations, images=images)) as dw, \
       ImageLoader(workers, max_size) as loader:
    table = dw.split(f"{name}-images", "images")
    with progress_bar(f"vqav2 {name} images", len(image_list), quiet) as bar:
      index = write_image_table(table, loader, image_list, bar.update)
    writer = dw.split(name, "vqa", image_table=table.name)
    for q in questions:
      if int(q["image_id"]) in index:
        writer.write({**q, "image_index": index[int(q["image_id"])]})
      else:
        writer.skip("image_unusable", f"question {q['question_id']}", f"image {q['image_id']} was skipped")
  return dw.summary()


def prepare_visdial(src, out, *, images, dense=None, split: str | None = None, workers: int = 0,
                    max_size: int | None = None, overwrite: bool = False, quiet: bool = True,
                    shard_bytes: int = 1 << 30) -> dict[str, Any]:
  images = [images] if isinstance(images, (str, os.PathLike)) else list(images)
  name, examples = visdial.examples(src, images, dense=dense, split=split)
  with dataset_writer(out, "visdial", src=src, overwrite=overwrite, shard_bytes=shard_bytes,
                args=dict(src=src, dense=dense, images=images)) as dw, \
       ImageLoader(workers, max_size) as loader:
    writer = dw.split(name, "visdial")
    with progress_bar(f"visdial {name}", None, quiet) as bar:
      write_examples(writer, loader, examples, bar.update)
  return dw.summary()


# --- CLI -----------------------------------------------------------------------------------------

def format_summary(summary: dict[str, Any]) -> str:
  lines = [f"Prepared {summary['out']} ({summary['source']}):"]
  for name, split in summary["splits"].items():
    skipped = summary["skipped"].get(name, {})
    why = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items(), key=lambda kv: -kv[1]))
    total = split["num_examples"] + sum(skipped.values())
    lines.append(f"  {name:16s} {split['kind']:10s} {split['num_examples']:>9,d} written"
                 + (f", {sum(skipped.values()):,d} skipped of {total:,d} "
                    f"({100 * sum(skipped.values()) / max(total, 1):.1f}%): {why}" if skipped else ""))
  if summary["examples_skipped"]:
    lines.append(f"  every skipped item is listed in {Path(summary['out']) / SKIPPED_FILE}, e.g.")
    lines += [f"    {s['reason']}: {s['source']}" + (f" ({s['detail']})" if s["detail"] else "")
              for s in summary["examples_skipped"]]
  return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Command:
  """One subcommand: `flags` adds its own flags, `run(args, common)` prepares and returns the summary
  (`common`: workers, overwrite, quiet, shard_bytes). Every command takes --out and those four."""

  help: str
  run: Callable[[argparse.Namespace, dict[str, Any]], dict[str, Any]]
  flags: Callable[[argparse.ArgumentParser], None] = lambda p: None
  src: bool = True  # takes --src
  max_size: bool = True  # takes --max-size


def _cc3m_flags(p):
  p.add_argument("--images", help="folder of downloaded images, for a TSV")
  p.add_argument("--split", default="train")
  _outside_base_flag(p)


def _coco_flags(p):
  p.add_argument("--images", help="root holding train2014/ val2014/ (default: the JSON's folder)")
  p.add_argument("--split", default=None, help="only this split (Karpathy) / the split's name")
  p.add_argument("--keep-restval", action="store_true", help="write Karpathy restval apart from train")
  _outside_base_flag(p)


def _vqav2_flags(p):
  p.add_argument("--annotations", default=None)
  p.add_argument("--images", nargs="+", required=True)
  p.add_argument("--split", default=None)


def _visdial_flags(p):
  p.add_argument("--images", nargs="+", required=True)
  p.add_argument("--dense", default=None)
  p.add_argument("--split", default=None)


def _jsonl_flags(p):
  p.add_argument("--images", help="root for relative image paths (default: the file's folder)")
  p.add_argument("--split", default="train")
  _outside_base_flag(p)


def _outside_base_flag(p):
  p.add_argument("--allow-outside-base", action="store_true",
                 help="read image paths that lead outside the base folder (absolute, or with ..); "
                 "by default they are skipped as outside_base")


COMMANDS: dict[str, Command] = {
    "cc3m": Command(
        "img2dataset shards (webdataset tar, parquet + folders) or the CC3M TSV",
        lambda a, common: prepare_cc3m(a.src, a.out, images=a.images, split=a.split, max_size=a.max_size,
                                       allow_outside_base=a.allow_outside_base, **common),
        _cc3m_flags),
    "coco": Command(
        "Karpathy dataset_coco.json or captions_*.json",
        lambda a, common: prepare_coco(a.src, a.out, images=a.images, split=a.split, max_size=a.max_size,
                                       restval_into_train=not a.keep_restval,
                                       allow_outside_base=a.allow_outside_base, **common),
        _coco_flags),
    "vqav2": Command(
        "v2_OpenEnded_mscoco_*_questions.json (+ annotations) and COCO images",
        lambda a, common: prepare_vqav2(a.src, a.out, images=a.images, annotations=a.annotations,
                                        split=a.split, max_size=a.max_size, **common),
        _vqav2_flags),
    "visdial": Command(
        "visdial_1.0_*.json, images, optional dense annotations",
        lambda a, common: prepare_visdial(a.src, a.out, images=a.images, dense=a.dense, split=a.split,
                                          max_size=a.max_size, **common),
        _visdial_flags),
    "jsonl": Command(
        "your own {image, caption} JSONL / CSV / TSV",
        lambda a, common: prepare_jsonl(a.src, a.out, images=a.images, split=a.split, max_size=a.max_size,
                                        allow_outside_base=a.allow_outside_base, **common),
        _jsonl_flags),
}


def _parser(commands: dict[str, Command]) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m bridgejax.prepare", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--debug", action="store_true", help="show the traceback of an error (anywhere on the line)")
  sub = p.add_subparsers(dest="source", required=True)
  for name, command in commands.items():
    s = sub.add_parser(name, help=command.help)
    if command.src:
      s.add_argument("--src", required=True, help="the input file or folder (see the module doc)")
    s.add_argument("--out", required=True, help="dataset folder to write (or add splits to)")
    s.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes that decode and check images (0: none)")
    s.add_argument("--overwrite", action="store_true", help="replace splits that already exist")
    s.add_argument("--shard-mb", type=int, default=1024, help="size of one array_record shard")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    if command.max_size:
      s.add_argument("--max-size", type=int, default=None,
                     help="re-encode images whose shorter side is larger to this size (JPEG q95)")
    command.flags(s)
  return p


def main(argv: list[str] | None = None, commands: dict[str, Command] | None = None) -> int:
  """The CLI over `commands` (default: COMMANDS, the data sources; bridgejax.prepare adds `toy`)."""
  commands = COMMANDS if commands is None else commands
  argv, debug = cli.pop_debug(sys.argv[1:] if argv is None else argv)
  a = _parser(commands).parse_args(argv)
  common = dict(workers=a.workers, overwrite=a.overwrite, quiet=a.quiet, shard_bytes=a.shard_mb << 20)

  def go() -> int:
    print(format_summary(commands[a.source].run(a, common)))
    return 0
  return cli.call(go, debug=debug)
