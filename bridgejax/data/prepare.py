"""Prepare a dataset once into array_record shards that the grain pipelines read.

    python -m bridgejax.data.prepare cc3m    --src IMG2DATASET_DIR_OR_TSV [--images DIR] --out DIR [--split train]
    python -m bridgejax.data.prepare coco    --src dataset_coco.json|captions_val2017.json [--images ROOT] --out DIR
    python -m bridgejax.data.prepare vqav2   --src QUESTIONS.json [--annotations ANN.json] --images DIR [DIR ...] --out DIR
    python -m bridgejax.data.prepare visdial --src visdial_1.0_val.json --images DIR [--dense DENSE.json] --out DIR
    python -m bridgejax.data.prepare jsonl   --src DATA.jsonl|.csv|.tsv [--images ROOT] --out DIR [--split train]
    python -m bridgejax.data.prepare toy     --out DIR [--num-train 10000 --num-val 1000 --num-test 1000 --seed 0]

Every image is decoded once here: a missing, empty, truncated or corrupt image (or a failed
download) is skipped, counted and listed in DIR/skipped.jsonl, and never stops the run. Splits
can be added to an existing DIR (e.g. CC3M val after train); --overwrite replaces a split.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from tqdm import tqdm

from bridgejax.data.records import SKIPPED_FILE, DatasetWriter
from bridgejax.data.sources import cc3m, coco, jsonl, visdial, vqav2
from bridgejax.data.sources.common import ImageLoader, write_examples, write_image_table


def _bar(desc: str, total: int | None = None, quiet: bool = False) -> tqdm:
  return tqdm(total=total, desc=desc, unit="ex", disable=quiet, dynamic_ncols=True, mininterval=0.5)


def _image_text(dw: DatasetWriter, split: str, examples: Iterable[dict], loader: ImageLoader,
                total: int | None, quiet: bool) -> None:
  writer = dw.split(split, "image_text")
  with _bar(f"{dw.source} {split}", total, quiet) as bar:
    write_examples(writer, loader, examples, bar.update)


def _prepare_single_split(source, examples, src, out, *, images=None, split: str = "train", workers: int = 0,
                          max_size: int | None = None, overwrite: bool = False, quiet: bool = True,
                          shard_bytes: int = 1 << 30) -> dict[str, Any]:
  """A source with one image_text split: `examples(src, images)` yields its examples."""
  with DatasetWriter(out, source, overwrite=overwrite, shard_bytes=shard_bytes,
                     args=dict(src=src, images=images, max_size=max_size)) as dw, \
       ImageLoader(workers, max_size) as loader:
    _image_text(dw, split, examples(src, images), loader, None, quiet)
  return dw.summary()


def prepare_cc3m(src, out, **kwargs) -> dict[str, Any]:
  """CC3M (img2dataset output or the TSV); kwargs as _prepare_single_split."""
  return _prepare_single_split("cc3m", cc3m.examples, src, out, **kwargs)


def prepare_coco(src, out, *, images=None, split: str | None = None, restval_into_train: bool = True,
                 workers: int = 0, max_size: int | None = None, overwrite: bool = False,
                 quiet: bool = True, shard_bytes: int = 1 << 30) -> dict[str, Any]:
  splits = coco.examples(src, images, split=split, restval_into_train=restval_into_train)
  with DatasetWriter(out, "coco", overwrite=overwrite, shard_bytes=shard_bytes,
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
  with DatasetWriter(out, "vqav2", overwrite=overwrite, shard_bytes=shard_bytes,
                     args=dict(src=src, annotations=annotations, images=images)) as dw, \
       ImageLoader(workers, max_size) as loader:
    table = dw.split(f"{name}-images", "images")
    with _bar(f"vqav2 {name} images", len(image_list), quiet) as bar:
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
  with DatasetWriter(out, "visdial", overwrite=overwrite, shard_bytes=shard_bytes,
                     args=dict(src=src, dense=dense, images=images)) as dw, \
       ImageLoader(workers, max_size) as loader:
    writer = dw.split(name, "visdial")
    with _bar(f"visdial {name}", None, quiet) as bar:
      write_examples(writer, loader, examples, bar.update)
  return dw.summary()


# --- toy -----------------------------------------------------------------------------------------

def _toy(args: tuple[str, int, int, bool]) -> dict[str, Any]:
  from bridgejax.toy import world  # pylint: disable=g-import-not-at-top
  split, index, seed, tasks = args
  return world.example(split, index, seed=seed, num_questions=5 if tasks else 0,
                       dialog_rounds=10 if tasks else 0)


def _generate(split: str, num: int, seed: int, tasks: bool, pool) -> Iterable[dict[str, Any]]:
  items = ((split, i, seed, tasks) for i in range(num))
  return pool.imap(_toy, items, chunksize=32) if pool is not None else map(_toy, items)


def prepare_toy(out, *, num_train: int = 10000, num_val: int = 1000, num_test: int = 1000,
                seed: int = 0, workers: int = 0, overwrite: bool = False, quiet: bool = True,
                shard_bytes: int = 1 << 30) -> dict[str, Any]:
  """The toy world: train (captions), and for val and test the same images as captions
  (`val`), VQA (`vqa_val`) and VisDial (`visdial_val`) splits over one image table."""
  import multiprocessing  # pylint: disable=g-import-not-at-top
  pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 0 else None
  try:
    with DatasetWriter(out, "toy", overwrite=overwrite, shard_bytes=shard_bytes,
                       args=dict(num_train=num_train, num_val=num_val, num_test=num_test, seed=seed)) as dw:
      dw.notes["toy"] = {"seed": seed, "image_size": 112}
      train = dw.split("train", "image_text")
      with _bar("toy train", num_train, quiet) as bar:
        for ex in _generate("train", num_train, seed, False, pool):
          train.write({"id": ex["id"], "image": ex["image"], "captions": ex["captions"],
                       "meta": {"scene": ex["scene"]}})
          bar.update()
      for split, num in (("val", num_val), ("test", num_test)):
        table = dw.split(f"{split}-images", "images")
        caps = dw.split(split, "image_text", image_table=table.name)
        vqa = dw.split(f"vqa_{split}", "vqa", image_table=table.name)
        dial = dw.split(f"visdial_{split}", "visdial", image_table=table.name)
        with _bar(f"toy {split}", num, quiet) as bar:
          for ex in _generate(split, num, seed, True, pool):
            i = table.write({"id": ex["id"], "image": ex["image"]})
            caps.write({"id": ex["id"], "image_index": i, "captions": ex["captions"],
                        "meta": {"scene": ex["scene"]}})
            for j, q in enumerate(ex["questions"]):
              qid = ex["index"] * 100 + j
              vqa.write({"id": str(qid), "question_id": qid, "image_id": ex["id"], "image_index": i,
                         "answer_confidences": ["yes"] * len(q["answers"]), **q})
            d = ex["dialog"]
            dial.write({"id": ex["id"], "image_id": ex["index"], "image_index": i, **d})
            bar.update()
  finally:
    if pool is not None:
      pool.close()
      pool.join()
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


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m bridgejax.data.prepare", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="source", required=True)

  def add(name: str, help_: str, src: bool = True) -> argparse.ArgumentParser:
    s = sub.add_parser(name, help=help_)
    if src:
      s.add_argument("--src", required=True, help="the input file or folder (see the module doc)")
    s.add_argument("--out", required=True, help="dataset folder to write (or add splits to)")
    s.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes that decode and check images (0: none)")
    s.add_argument("--overwrite", action="store_true", help="replace splits that already exist")
    s.add_argument("--shard-mb", type=int, default=1024, help="size of one array_record shard")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    if name != "toy":
      s.add_argument("--max-size", type=int, default=None,
                     help="re-encode images whose shorter side is larger to this size (JPEG q95)")
    return s

  s = add("cc3m", "img2dataset shards (webdataset tar, parquet + folders) or the CC3M TSV")
  s.add_argument("--images", help="folder of downloaded images, for a TSV")
  s.add_argument("--split", default="train")
  s = add("coco", "Karpathy dataset_coco.json or captions_*.json")
  s.add_argument("--images", help="root holding train2014/ val2014/ (default: the JSON's folder)")
  s.add_argument("--split", default=None, help="only this split (Karpathy) / the split's name")
  s.add_argument("--keep-restval", action="store_true", help="write Karpathy restval apart from train")
  s = add("vqav2", "v2_OpenEnded_mscoco_*_questions.json (+ annotations) and COCO images")
  s.add_argument("--annotations", default=None)
  s.add_argument("--images", nargs="+", required=True)
  s.add_argument("--split", default=None)
  s = add("visdial", "visdial_1.0_*.json, images, optional dense annotations")
  s.add_argument("--images", nargs="+", required=True)
  s.add_argument("--dense", default=None)
  s.add_argument("--split", default=None)
  s = add("jsonl", "your own {image, caption} JSONL / CSV / TSV")
  s.add_argument("--images", help="root for relative image paths (default: the file's folder)")
  s.add_argument("--split", default="train")
  s = add("toy", "the toy world (generated; no input)", src=False)
  s.add_argument("--num-train", type=int, default=10000)
  s.add_argument("--num-val", type=int, default=1000)
  s.add_argument("--num-test", type=int, default=1000)
  s.add_argument("--seed", type=int, default=0)
  return p


def main(argv: list[str] | None = None) -> int:
  a = _parser().parse_args(argv)
  common = dict(workers=a.workers, overwrite=a.overwrite, quiet=a.quiet, shard_bytes=a.shard_mb << 20)
  fns: dict[str, Callable[[], dict]] = {
      "cc3m": lambda: prepare_cc3m(a.src, a.out, images=a.images, split=a.split, max_size=a.max_size, **common),
      "coco": lambda: prepare_coco(a.src, a.out, images=a.images, split=a.split, max_size=a.max_size,
                                   restval_into_train=not a.keep_restval, **common),
      "vqav2": lambda: prepare_vqav2(a.src, a.out, images=a.images, annotations=a.annotations,
                                     split=a.split, max_size=a.max_size, **common),
      "visdial": lambda: prepare_visdial(a.src, a.out, images=a.images, dense=a.dense, split=a.split,
                                         max_size=a.max_size, **common),
      "jsonl": lambda: prepare_jsonl(a.src, a.out, images=a.images, split=a.split, max_size=a.max_size, **common),
      "toy": lambda: prepare_toy(a.out, num_train=a.num_train, num_val=a.num_val, num_test=a.num_test,
                                 seed=a.seed, **common),
  }
  try:
    summary = fns[a.source]()
  except (OSError, ValueError) as e:  # bad inputs: one clear line, not a traceback
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(format_summary(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
