"""The toy world written as a prepared dataset, on the command line or on a config's first use.

    prepare_toy(out, num_train=10000, num_val=1000, num_test=1000, seed=0)
    python -m bridgejax.prepare toy --out DIR [--num-train 10000 --num-val 1000 --num-test 1000 --seed 0]
    ensure_toy_data(config)    # configs/demo.py (data.toy): generated into data.dir (= data.toy.dir) when not there yet

Built on bridgejax.data's writers; COMMAND is the `toy` subcommand that the prepare command line
(bridgejax/prepare.py) adds to the data sources' table.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from bridgejax.data.prepare import Command, dataset_writer, progress_bar
from bridgejax.data.records import INFO_FILE, SKIPPED_FILE, load_info
from bridgejax.errors import UserError
from bridgejax.toy import world


def _toy(args: tuple[str, int, int, bool]) -> dict[str, Any]:
  split, index, seed, tasks = args
  return world.example(split, index, seed=seed, num_questions=5 if tasks else 0,
                       dialog_rounds=10 if tasks else 0)


def _compose(args: tuple[str, int, int, bool]) -> dict[str, Any]:
  split, index, seed, _ = args
  return world.composed_example(split, index, seed=seed)


def _generate(split: str, num: int, seed: int, tasks: bool, pool, make=_toy) -> Iterable[dict[str, Any]]:
  items = ((split, i, seed, tasks) for i in range(num))
  return pool.imap(make, items, chunksize=32) if pool is not None else map(make, items)


def prepare_toy(out, *, num_train: int = 10000, num_val: int = 1000, num_test: int = 1000,
                seed: int = 0, workers: int = 0, overwrite: bool = False, quiet: bool = True,
                shard_bytes: int = 1 << 30) -> dict[str, Any]:
  """The toy world: train (captions), and for val and test the same images as captions
  (`val`), VQA (`vqa_val`) and VisDial (`visdial_val`) splits over one image table; and as many
  composed-retrieval queries (`compose_val`) over their own table of reference and target images
  (query i's at rows 2i and 2i + 1), the gallery. The other splits' bytes do not depend on them."""
  import multiprocessing  # pylint: disable=g-import-not-at-top
  pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 0 else None
  try:
    with dataset_writer(out, "toy", overwrite=overwrite, shard_bytes=shard_bytes, require_examples=False,
                  args=dict(num_train=num_train, num_val=num_val, num_test=num_test, seed=seed)) as dw:
      dw.notes["toy"] = {"seed": seed, "image_size": 112}
      train = dw.split("train", "image_text")
      with progress_bar("toy train", num_train, quiet) as bar:
        for ex in _generate("train", num_train, seed, False, pool):
          train.write({"id": ex["id"], "image": ex["image"], "captions": ex["captions"],
                       "meta": {"scene": ex["scene"]}})
          bar.update()
      for split, num in (("val", num_val), ("test", num_test)):
        table = dw.split(f"{split}-images", "images")
        caps = dw.split(split, "image_text", image_table=table.name)
        vqa = dw.split(f"vqa_{split}", "vqa", image_table=table.name)
        dial = dw.split(f"visdial_{split}", "visdial", image_table=table.name)
        with progress_bar(f"toy {split}", num, quiet) as bar:
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
        gallery = dw.split(f"compose_{split}-images", "images")
        compose = dw.split(f"compose_{split}", "compose", image_table=gallery.name)
        with progress_bar(f"toy compose_{split}", num, quiet) as bar:
          for ex in _generate(split, num, seed, False, pool, _compose):
            i = gallery.write({"id": ex["id"] + "-reference", "image": ex.pop("reference_image")})
            j = gallery.write({"id": ex["id"] + "-target", "image": ex.pop("target_image")})
            compose.write({**ex, "image_index": i, "target_index": j})
            bar.update()
  finally:
    if pool is not None:
      pool.close()
      pool.join()
  return dw.summary()


TOY_SPLITS = tuple(f"{task}{split}" for split in ("val", "test")
                   for task in ("", "vqa_", "visdial_", "compose_")) + ("train",)


def _own_leftovers(name: str) -> bool:
  """What an interrupted toy preparation leaves: the skip log and hidden temporary shards."""
  return name == SKIPPED_FILE or name.startswith(".")


def toy_pending(config) -> bool:
  """Whether ensure_toy_data(config) will generate the toy world into data.dir (so its splits are
  not there to check yet): the config sets data.toy, and data.dir is data.toy.dir with no dataset."""
  toy = config.data.get("toy")
  return bool(toy) and (os.path.abspath(config.data.dir) == os.path.abspath(toy.get("dir") or config.data.dir)
                        and not os.path.exists(os.path.join(config.data.dir, INFO_FILE)))


def ensure_toy_data(config) -> None:
  """configs/demo.py sets data.toy: the toy world is generated into data.dir when not there yet, or
  generated again when a toy world there lacks a split this version writes (a folder made by an
  older bridgejax: its other splits come out byte-identical, since every example is a pure function
  of its index). Any other dataset in data.dir (the demo's setup on your data) is left alone.

  It writes only into its own folder, data.toy.dir (the config's data.dir unless you move it), and
  only while that folder is new or empty: a data.dir with a typo, or a folder of your photos that
  is not a prepared dataset yet, is refused with one line instead of receiving the toy world."""
  import jax  # pylint: disable=g-import-not-at-top
  toy = config.data.get("toy")
  if not toy:
    return
  data_dir = config.data.dir
  missing = TOY_SPLITS
  if os.path.exists(os.path.join(data_dir, INFO_FILE)):
    info = load_info(data_dir)
    missing = [s for s in TOY_SPLITS if s not in info["splits"]]
    if info.get("source") != "toy" or not missing:
      return
  else:
    home = toy.get("dir") or data_dir
    prepare = "prepare your data with python -m bridgejax.prepare ... --out DIR and point --config.data.dir at it"
    if os.path.abspath(data_dir) != os.path.abspath(home):
      state = "does not exist" if not os.path.exists(data_dir) else "is not a prepared dataset (no dataset_info.json)"
      raise UserError(f"--config.data.dir={data_dir!r} {state}; the demo generates its toy world only into "
                      f"--config.data.toy.dir={home!r}: {prepare}, or pass --config.data.toy.dir={data_dir} to "
                      "generate the toy world there")
    foreign = sorted(e for e in os.listdir(data_dir) if not _own_leftovers(e)) if os.path.isdir(data_dir) else []
    if os.path.exists(data_dir) and (not os.path.isdir(data_dir) or foreign):
      what = f"holds {len(foreign)} entries ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})" \
          if foreign else "is a file"
      raise UserError(f"--config.data.dir={data_dir!r} {what} but no prepared dataset: the demo generates its toy "
                      f"world only into a new or empty folder, and never writes among your files; {prepare}, or "
                      "choose another --config.data.dir and --config.data.toy.dir")
  if jax.process_index() == 0:
    why = "" if missing is TOY_SPLITS else f" again (it lacks {', '.join(missing)})"
    print(f"preparing the toy world in {data_dir}{why} ...")
    prepare_toy(data_dir, num_train=toy.num_train, num_val=toy.num_val, num_test=toy.num_test,
                seed=toy.seed, quiet=False, overwrite=missing is not TOY_SPLITS)


def _flags(p) -> None:
  p.add_argument("--num-train", type=int, default=10000)
  p.add_argument("--num-val", type=int, default=1000)
  p.add_argument("--num-test", type=int, default=1000)
  p.add_argument("--seed", type=int, default=0)


COMMAND = Command(
    "the toy world (generated; no input)",
    lambda a, common: prepare_toy(a.out, num_train=a.num_train, num_val=a.num_val, num_test=a.num_test,
                                  seed=a.seed, **common),
    _flags, src=False, max_size=False)
