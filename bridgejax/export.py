"""A trained bridge as a self-contained folder, ready for the Hugging Face Hub.

    python -m bridgejax.export --workdir RUN --out DIR [--checkpoint best|N] [--overwrite]
                               [--vision-id org/clip] [--llm-id org/gemma] [--push org/name [--private]]

DIR holds what a user needs besides the frozen backbones, which are far larger and keep their own
licences, so they are named, not copied:

    config.json        the run's config, as training saved it (Pipeline.from_workdir reads the same)
    model.safetensors  the trainable parameters only: bridge + [RET] heads, float32, flattened
                       names ("bridge/proj/kernel", "ret/...")
    bridgejax.json     the checkpoint step, the parameter count, and the backbones it expects
                       (config path, architecture, hub id when given)
    README.md          a model card: what it is, how to load it, the run's eval metrics with protocol
    eval/<task>.json   the eval JSONs the card's metrics come from

`Pipeline.from_pretrained(DIR or "org/name", vision=..., llm=...)` loads it (bridgejax.inference);
--push uploads DIR with huggingface_hub (HfApi.create_repo + upload_folder; log in first with
`hf auth login` or set HF_TOKEN): the repo id and the login are checked before any work.

DIR is written only by export: the new folder is built in a temporary folder next to DIR and
renamed into place when complete, so a failure leaves what was there. A non-empty DIR needs
--overwrite, which replaces only a previous export (a bridgejax.json with its "format", and
nothing but the files above): a folder holding anything else is refused, naming it, and so is a DIR
that is the workdir, is inside it, or contains it. Errors are one line, as in the other CLIs
(bridgejax.cli); --debug adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile

import ml_collections
import numpy as np
from safetensors.numpy import save_file

from bridgejax import cli, paths
from bridgejax.config_schema import complete
from bridgejax.errors import UserError
from bridgejax.evaluation import table

CONFIG_FILE = "config.json"
PARAMS_FILE = "model.safetensors"
MANIFEST_FILE = "bridgejax.json"
CARD_FILE = "README.md"
EXPORT_FILES = (CONFIG_FILE, PARAMS_FILE, MANIFEST_FILE, CARD_FILE)  # and eval/<task>.json
FORMAT = 1  # bridgejax.json's "format": bumped when the folder's layout changes


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
  """{"bridge": {"proj": {"kernel": x}}} -> {"bridge/proj/kernel": x as float32}."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict) or hasattr(value, "items"):
      out.update(flatten(dict(value), name + "/"))
    else:
      out[name] = np.array(value, np.float32, order="C")  # 0-d stays 0-d (ascontiguousarray makes it 1-d)
  return out


def unflatten(tensors: dict[str, np.ndarray]) -> dict:
  """flatten's inverse."""
  tree: dict = {}
  for name, value in tensors.items():
    *parents, leaf = name.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _backbone(config_part, hub_id: str | None) -> dict:
  return {"path": config_part.path, "arch": config_part.arch, "hub_id": hub_id or None}


def _check_out(out: str, overwrite: bool, workdir: str) -> None:
  """`out` may be written: new, empty, or (with overwrite) a previous export; never the run's folder,
  inside it or above it. Raises UserError before anything is written or deleted."""
  if paths.is_remote(out):
    raise UserError(f"--out {out!r} is not a local folder; export locally, then --push to the Hub")
  real = os.path.realpath(out)
  if not paths.is_remote(workdir):
    run = os.path.realpath(workdir)
    common = os.path.commonpath([real, run])
    if common in (real, run):
      where = "is" if real == run else "is inside" if common == run else "contains"
      raise UserError(f"--out {out!r} {where} --workdir {workdir!r}; pass a folder outside the training run")
  if os.path.exists(real) and not os.path.isdir(real):
    raise UserError(f"--out {out!r} is a file; pass a folder to write the export into")
  if not os.path.isdir(real) or not os.listdir(real):
    return
  if not overwrite:
    raise UserError(f"--out {out!r} is not empty; pass --overwrite to replace it, or another --out")
  foreign = foreign_files(real)
  if foreign:
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    raise UserError(f"--out {out!r} holds {shown}, which export did not write; --overwrite replaces only a "
                    "previous export: pass another --out")
  if not _is_manifest(os.path.join(real, MANIFEST_FILE)):
    raise UserError(f"--out {out!r} is not a previous export (no {MANIFEST_FILE} with an export's \"format\"); "
                    "--overwrite replaces only a previous export: pass another --out")


def foreign_files(folder: str) -> list[str]:
  """What in `folder` an export did not write, sorted, folders with a trailing /: anything but the
  files the module doc lists (config.json, model.safetensors, bridgejax.json, README.md, eval/*.json)."""
  out = []
  for name in sorted(os.listdir(folder)):
    full = os.path.join(folder, name)
    if name == "eval" and os.path.isdir(full) and not os.path.islink(full):
      out += [f"eval/{n}" + ("/" if os.path.isdir(os.path.join(full, n)) else "") for n in sorted(os.listdir(full))
              if not (n.endswith(".json") and os.path.isfile(os.path.join(full, n)))]
    elif name not in EXPORT_FILES or not os.path.isfile(full):
      out.append(name + ("/" if os.path.isdir(full) else ""))
  return out


def _is_manifest(path: str) -> bool:
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(record, dict) and isinstance(record.get("format"), int) and "backbones" in record


@contextlib.contextmanager
def _staged(out: str):
  """A temporary folder next to `out` to write the export into; on success it replaces `out` (the
  old export is renamed aside first and removed last), on failure it goes and `out` stays as it was."""
  real = os.path.realpath(out)
  parent = os.path.dirname(real)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(real)}.", suffix=".partial", dir=parent)
  try:
    yield tmp
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes it private
    old = None
    if os.path.isdir(real) and os.listdir(real):
      old = tmp[:-len(".partial")] + ".old"
      os.replace(real, old)
    try:
      os.replace(tmp, real)  # over an empty folder, or into the place the old export left
    except BaseException:
      if old is not None:
        os.replace(old, real)
      raise
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def export(workdir: str, out: str, checkpoint: int | str | None = None, *, overwrite: bool = False,
           vision_id: str | None = None, llm_id: str | None = None) -> dict:
  """Writes the folder (see the module doc) of `workdir`'s checkpoint (default: the latest; "best";
  a step) into `out`; returns bridgejax.json's record. Nothing is written before the checks pass,
  and `out` changes only once the new folder is complete (see the module doc on --overwrite)."""
  from bridgejax.checks import check_checkpoint  # lazy: jax and orbax, seconds of CLI start
  from bridgejax.train.checkpoint import Checkpointer, checkpoint_step  # lazy: jax and orbax, seconds of CLI start
  check_checkpoint(workdir, checkpoint)
  config_path = paths.path(workdir) / CONFIG_FILE
  if not config_path.exists():
    raise UserError(f"--workdir {workdir!r} has no {CONFIG_FILE} (training writes it); pass a training run's folder")
  config_text = paths.read_text(config_path)
  config = complete(ml_collections.ConfigDict(paths.read_json(config_path)))  # an older run lacks newer keys
  _check_out(out, overwrite, workdir)
  checkpointer = Checkpointer(workdir)
  try:
    step, trainable = checkpointer.load_params(checkpoint_step(checkpoint))
  finally:
    checkpointer.close()
  tensors = flatten(trainable)
  runs = _eval_results(workdir)
  record = {
      "format": FORMAT, "config": config.name, "step": int(step),
      "checkpoint": "best" if checkpoint == "best" else "latest" if checkpoint is None else "step",
      "total_steps": config.total_steps, "trainable_parameters": int(sum(t.size for t in tensors.values())),
      "backbones": {"vision": _backbone(config.vision, vision_id), "llm": _backbone(config.llm, llm_id)},
      "workdir": str(paths.path(workdir)),
  }
  with _staged(out) as tmp:
    save_file(tensors, os.path.join(tmp, PARAMS_FILE), metadata={"format": "bridgejax", "step": str(step)})
    paths.write_text(os.path.join(tmp, CONFIG_FILE), config_text)
    paths.write_json(os.path.join(tmp, MANIFEST_FILE), record, indent=1)
    for task, result in runs.items():
      paths.write_json(os.path.join(tmp, "eval", f"{task}.json"), result, indent=1, ensure_ascii=False)
    paths.write_text(os.path.join(tmp, CARD_FILE), model_card(config, record, runs))
    _check_out(out, overwrite, workdir)  # again, just before the swap: nothing of the user's came in meanwhile
  return record


def _eval_results(workdir: str) -> dict[str, dict]:
  try:
    return table.load_workdir(workdir)
  except FileNotFoundError:
    return {}  # not evaluated yet: the card says so


def _describe_bridge(bridge) -> str:
  settings = ", ".join(f"{k}={v}" for k, v in bridge.items() if k != "name")
  return f"{bridge.name} ({settings})" if settings else str(bridge.name)


def _metrics_section(runs: dict[str, dict], step: int) -> list[str]:
  """A markdown table per task: the card's copy of eval/<task>.json (bridgejax.evaluation.table's
  columns and scaling: rates x100, R@k in percent)."""
  if not runs:
    return ["Not evaluated yet: run `python eval.py --config ... --workdir RUN`, then export again."]
  lines = []
  for task, result in runs.items():
    data = result.get("dataset", {})
    where = f"{os.path.basename(str(data.get('dir', ''))) or '?'}, split {data.get('split', '?')}"
    evaluated = result.get("checkpoint_step")
    note = "" if evaluated == step else f" -- evaluated at step {evaluated}, not the exported step {step}"
    lines += [f"### {task} ({result.get('type', task)})", "",
              f"Protocol: {result.get('protocol') or '-'}; data: {where}; "
              f"checkpoint step {evaluated}{note}.", ""]
    rows = [[header, table.fmt(metric, result["metrics"].get(metric))]
            for _, metric, header in table.columns_for([{task: result}], [task])]
    lines += [table.render(["metric", "value"], rows, markdown=True), ""]
  return lines


def model_card(config, record: dict, runs: dict[str, dict]) -> str:
  """README.md: front matter for the Hub, what the folder is, how to load it, the metrics."""
  vision, llm = record["backbones"]["vision"], record["backbones"]["llm"]

  def name(b):
    return f"{b['arch'] or b['path']}" + (f" (hub: `{b['hub_id']}`)" if b["hub_id"] else "") + f", path `{b['path']}`"

  total = record["total_steps"]
  lines = [
      "---", "library_name: bridgejax", "tags:", "- bridgejax", "- image-to-text", "- retrieval", "---", "",
      f"# {record['config'] or 'bridgejax bridge'}", "",
      "A trained bridge between a frozen vision encoder and a frozen language model (bridgejax: FROMAGe-style "
      "captioning and [RET] retrieval). This folder holds the trainable parameters only -- the bridge and the "
      "[RET] heads, float32, in `model.safetensors` -- with the run's `config.json`; the frozen backbones are "
      "loaded from their own folders.", "",
      "| | |", "|---|---|",
      f"| config | `{record['config']}` |",
      f"| bridge | {_describe_bridge(config.bridge)} |",
      f"| trainable parameters | {record['trainable_parameters']:,} |",
      f"| vision backbone | {name(vision)} |",
      f"| LLM backbone | {name(llm)} |",
      f"| training | step {record['step']}" + (f" of {total}" if total else "") + f" ({record['checkpoint']} checkpoint) |",
      "", "## Use", "", "```python", "from bridgejax.inference import Pipeline", "",
      "pipe = Pipeline.from_pretrained(\"THIS_FOLDER_OR_HUB_ID\", vision=\"path/to/vision\", llm=\"path/to/llm\")",
      "pipe.caption(\"cat.jpg\")", "pipe.retrieve(\"a dog on a beach\", pipe.build_index(\"photos/\"))", "```", "",
      "`vision` and `llm` point at the backbones above (default: the paths recorded in `bridgejax.json`).", "",
      "## Evaluation", "",
  ] + _metrics_section(runs, record["step"])
  return "\n".join(lines).rstrip() + "\n"


def check_repo_id(repo_id: str) -> None:
  """`repo_id` is a Hub model repo id, org/name, as the Hub spells them (checked here, offline)."""
  from huggingface_hub.utils import HFValidationError, validate_repo_id  # lazy: huggingface_hub, ~0.05 s of CLI start
  try:
    validate_repo_id(repo_id)
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
      raise HFValidationError("expected org/name")
  except HFValidationError as e:
    raise UserError(f"--push {repo_id!r}: expected a Hub repo id, org/name (letters, digits, '-', '_', '.'; "
                    f"no '--' or '..'; at most 96 characters)") from e


def hub_token() -> str:
  """The Hub token that --push uploads with (HF_TOKEN, else `hf auth login`'s), or a UserError saying how
  to log in. Read locally: no request is made."""
  from huggingface_hub import get_token  # lazy: huggingface_hub, ~0.05 s of CLI start; --push only
  token = get_token()
  if not token:
    raise UserError("--push needs a Hugging Face login and there is none: run `hf auth login` "
                    "(or `huggingface-cli login`), or set HF_TOKEN to a token with write access")
  return token


def check_push(repo_id: str) -> str:
  """--push's checks, before any work: the repo id's syntax and a login; returns the token."""
  check_repo_id(repo_id)
  return hub_token()


def push(out: str, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
  """Uploads the exported folder `out` to the Hub model repo `repo_id` (created if missing); its URL."""
  from huggingface_hub import HfApi  # lazy: HfApi, ~0.1 s of CLI start; --push only
  if not os.path.isfile(os.path.join(out, PARAMS_FILE)) or not os.path.isfile(os.path.join(out, MANIFEST_FILE)):
    raise UserError(f"{out!r} is not an exported bridge (no {PARAMS_FILE} / {MANIFEST_FILE}); "
                    "run python -m bridgejax.export --workdir RUN --out DIR first")
  check_repo_id(repo_id)
  api = HfApi(token=token or hub_token())
  api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
  api.upload_folder(folder_path=out, repo_id=repo_id, repo_type="model",
                    commit_message="Upload a bridgejax bridge")
  return f"https://huggingface.co/{repo_id}"


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m bridgejax.export", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="a training run's directory (checkpoints/, config.json)")
  p.add_argument("--out", required=True, help="the folder to write")
  p.add_argument("--checkpoint", default=None, help="checkpoint step, or 'best' (default: the latest)")
  p.add_argument("--overwrite", action="store_true", help="replace a previous export at --out")
  p.add_argument("--vision-id", default=None, help="the vision backbone's Hub id, for the model card")
  p.add_argument("--llm-id", default=None, help="the LLM backbone's Hub id, for the model card")
  p.add_argument("--push", default=None, metavar="ORG/NAME", help="upload the folder to this Hub model repo")
  p.add_argument("--private", action="store_true", help="with --push: create the repo private")
  return p


def main(argv=None) -> int:
  argv, debug = cli.pop_debug(sys.argv[1:] if argv is None else argv)
  a = _parser().parse_args(argv)

  def go() -> int:
    token = check_push(a.push) if a.push else None  # before the export's work
    record = export(a.workdir, a.out, a.checkpoint, overwrite=a.overwrite, vision_id=a.vision_id, llm_id=a.llm_id)
    print(f"wrote {a.out}: step {record['step']}, {record['trainable_parameters']:,} trainable parameters")
    if a.push:
      print(f"pushed to {push(a.out, a.push, private=a.private, token=token)}")
    return 0
  return cli.call(go, debug=debug)


if __name__ == "__main__":
  sys.exit(main())
