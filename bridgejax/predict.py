"""Use a trained bridge from the command line (see bridgejax/inference.py for the Python API).

    python -m bridgejax.predict --workdir RUN caption IMAGE [IMAGE ...] [--prompt "A picture of"]
    python -m bridgejax.predict --workdir RUN answer IMAGE "what colour is the square?"
    python -m bridgejax.predict --workdir RUN index FOLDER --out index.npz
    python -m bridgejax.predict --workdir RUN retrieve --index FOLDER|index.npz "a red circle" [-k 5]
    python -m bridgejax.predict --workdir RUN compose  --index FOLDER|index.npz IMAGE "but blue" [-k 5]
    python -m bridgejax.predict --workdir RUN generate --index FOLDER|index.npz [--image IMAGE] "PROMPT"

--config FILE overrides the run's config.json (e.g. to point at moved backbones); --step picks a
checkpoint (default: the latest; 'best': the best validation step); --json prints machine-readable
output. A bad path or a --max-new-tokens that is not a positive integer is reported on one line
(`error: ...`, exit status 2) before any weight loads; so is a prompt, or a --max-new-tokens, too long
for the LM's context (once the model is read, before any generation); --debug adds the traceback.
An --index folder's images that cannot be read are left out, with one `warning: ...` line naming
them; none readable is an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from bridgejax import cli

MAX_NEW_TOKENS_HELP = "tokens to generate at most: a positive integer that fits in the LM's context (default: 32)"


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m bridgejax.predict", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="a training run's directory (checkpoints/, config.json)")
  p.add_argument("--config", default=None, help="config file (default: WORKDIR/config.json)")
  p.add_argument("--step", default=None, help="checkpoint step, or 'best' (the best validation step; default: "
                 "the latest)")
  p.add_argument("--json", action="store_true", help="print JSON")
  p.add_argument("--debug", action="store_true", help="show the traceback of an error (anywhere on the line)")
  sub = p.add_subparsers(dest="command", required=True)
  s = sub.add_parser("caption", help="caption image files")
  s.add_argument("images", nargs="+")
  s.add_argument("--prompt", default="", help='e.g. "A picture of" (FROMAGe)')
  s.add_argument("--max-new-tokens", default="32", help=MAX_NEW_TOKENS_HELP)
  s = sub.add_parser("answer", help="answer a question about an image")
  s.add_argument("image")
  s.add_argument("question")
  s = sub.add_parser("index", help="embed a folder of images into an index file")
  s.add_argument("folder")
  s.add_argument("--out", required=True, help="the .npz to write")
  for name, help_ in (("retrieve", "images for a text"), ("compose", "images for an image + a text"),
                      ("generate", "interleaved text and retrieved images")):
    s = sub.add_parser(name, help=help_)
    s.add_argument("--index", required=True, help="a folder of images or an index .npz")
    if name == "compose":
      s.add_argument("image")
    if name == "generate":
      s.add_argument("--image", default=None, help="an image before the prompt")
      s.add_argument("--max-new-tokens", default="32", help=MAX_NEW_TOKENS_HELP)
    s.add_argument("text")
    if name != "generate":
      s.add_argument("-k", type=int, default=5)
  return p


def warn(line: str) -> None:
  """A note the user should see, as one line on stderr (build_index's skipped images)."""
  print(f"warning: {line}", file=sys.stderr)


def load_index(pipe, where: str):
  """An index .npz, or the index of a folder of images (embedded now; unreadable images skipped
  with one warning line)."""
  from bridgejax.inference import ImageIndex  # lazy: jax and the models, seconds of CLI start
  if where.endswith(".npz") and os.path.isfile(where):
    return ImageIndex.load(where)
  return pipe.build_index(where, report=warn)


def load_pipeline(workdir: str, config=None, step=None, **kwargs):
  """The run's Pipeline; a missing checkpoint or backbone is one line before any weight loads."""
  from bridgejax.checks import check_backbones, check_checkpoint  # lazy: jax and orbax, seconds of CLI start
  from bridgejax.inference import Pipeline, load_config  # lazy: jax and the models, seconds of CLI start
  check_checkpoint(workdir, step)
  config = load_config(config, workdir)
  check_backbones(config)
  return Pipeline.from_workdir(workdir, config, step, **kwargs)


def _hits(hits) -> list[dict]:
  return [dataclasses.asdict(h) for h in hits]


def run(a) -> object:
  from bridgejax.inference import Hit  # lazy: jax and the models, seconds of CLI start
  pipe = load_pipeline(a.workdir, a.config, a.step)
  if a.command == "caption":
    return dict(zip(a.images, pipe.captions(a.images, a.prompt, a.max_new_tokens)))
  if a.command == "answer":
    return {"question": a.question, "answer": pipe.answer(a.image, a.question)}
  if a.command == "index":
    index = pipe.build_index(a.folder, progress=True, report=warn)
    return {"index": index.save(a.out), "images": len(index), "skipped": len(index.skipped)}
  index = load_index(pipe, a.index)
  if a.command == "retrieve":
    return _hits(pipe.retrieve(a.text, index, a.k))
  if a.command == "compose":
    return _hits(pipe.retrieve_composed(a.image, a.text, index, a.k))
  segments = pipe.generate(a.text, image=a.image, index=index, max_new_tokens=a.max_new_tokens)
  return [{"image": s.path, "score": s.score} if isinstance(s, Hit) else {"text": s} for s in segments]


def _print(result) -> None:
  if isinstance(result, dict):
    for k, v in result.items():
      print(f"{k}\t{v}")
  else:
    for item in result:
      print("\t".join(str(v) for v in item.values()))


def main(argv=None) -> int:
  argv, debug = cli.pop_debug(sys.argv[1:] if argv is None else argv)
  a = _parser().parse_args(argv)

  def go() -> int:
    if "max_new_tokens" in a:  # before minutes of loading weights; the context's bound comes once the model is read
      from bridgejax.inference import check_new_tokens  # lazy: jax and the models, seconds of CLI start
      a.max_new_tokens = check_new_tokens(a.max_new_tokens, name="--max-new-tokens")
    result = run(a)
    if a.json:
      print(json.dumps(result, indent=1))
    else:
      _print(result)
    return 0
  return cli.call(go, debug=debug)


if __name__ == "__main__":
  sys.exit(main())
