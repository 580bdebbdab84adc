"""The thesis's bridges side by side on the toy world: every listed experiment config's bridge trained
on the demo's setup, per seed, then one table and one plot.

    python -m bridgejax.ablate --configs all --seeds 0,1,2 --workdir runs/ablate [--steps 200 --max_examples 100]
    python -m bridgejax.ablate --configs fromage,crossatt_k12 --seeds 0,1 --workdir runs/ablate

An ablation run of configs/X.py is toy_config("X"): X's bridge and the options that shape what is
trained (TRANSPLANTED: loss weights, [RET] heads, CMLI, token-type embeddings, the concat trick)
on configs/demo.py's everything else (toy backbones, toy data, optimiser, batch), for a bounded
number of steps (a two-stage config, configs/blip2.py, spends its representation_share of them on
stage 1; an absolute bridge width, blip2's 768, keeps its ratio to the tower: _scale_absolute_width), evaluated on the toy test images: captioning, retrieval, VQA and VisDial, each on
its first `max_examples`. A config whose backbones are not CLIP + Gemma (SigLIP, Glória) or whose
bridge does not fit the toy backbones is skipped with its reason.

The configs are files, found in --configs_dir: by default configs/ in the current directory (the
repository root), else the configs/ beside the checkout bridgejax was installed from (an editable
install). Each NAME there is NAME.py (base.py and the demos are not experiments), loaded as
`train.py --config NAME.py` loads it (bridgejax.cli.load_config_file); demo.py is the toy setup.
An installed wheel has no configs/: point --configs_dir at a copy of the repository's.

Each config trains and evaluates through bridgejax.sweep in WORKDIR/<config>/seed_<s>, so finished
runs are skipped and the same command resumes; a SIGTERM stops it at the next safe point (exit
status 143; bridgejax.preemption). Then WORKDIR/ablation.md (mean ± std over seeds, the
trainable parameters at the config's real size from bridgejax.param_count), ablation.json and
ablation.png (each headline metric against real-size trainable parameters, error bars = std).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import ml_collections

from bridgejax import cli, preemption, sweep, terms
from bridgejax.errors import UserError
from bridgejax.evaluation import table

# What a config says about the bridge and its training signal (the loss terms' sections too, e.g.
# cmli, pic2word: bridgejax/terms/); everything else is the demo's.
TRANSPLANTED = ("bridge", "loss", "ret", *terms.sections(), "token_type_embeddings", "concat_prob",
                "visual_token_scale", "stage", "representation_share")
NOT_EXPERIMENTS = {"base", "demo", "demo_gemma3", "__init__"}  # the toy world's own runs
STEPS = 200  # the default bounded run: README "Ablation on the toy world" has its time
MAX_EXAMPLES = 100  # per eval task, on the toy test split
# The table's and plot's columns: (task, metric); headers as bridgejax.evaluation.table shows them.
HEADLINE = (("caption", "BLEU-4"), ("caption", "CIDEr"), ("retrieval", "i2t_R@1"), ("retrieval", "t2i_R@1"),
            ("vqa", "overall"), ("visdial", "R@1"), ("visdial", "MRR"), ("compose", "R@1"))
PLOTTED = (("caption", "CIDEr"), ("retrieval", "t2i_R@1"), ("vqa", "overall"), ("visdial", "MRR"))
TOY_SPLITS = {"caption": "test", "retrieval": "test", "vqa": "vqa_test", "visdial": "visdial_test"}
PIC2WORD_SPLITS = {"compose": "compose_test"}  # composed retrieval, for the configs that train Pic2Word's f_M


def default_configs_dir() -> str:
  """configs/ in the current directory if there is one, else the configs/ beside the checkout this
  package was installed from (an editable install), else 'configs' (configs_dir() then says so)."""
  if os.path.isdir("configs"):
    return "configs"
  beside = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
  return beside if os.path.isfile(os.path.join(beside, "demo.py")) else "configs"


def configs_dir(path: str | None = None) -> str:
  """--configs_dir `path` (default_configs_dir() when None), checked to be a folder."""
  path = default_configs_dir() if path is None else path
  if not os.path.isdir(path):
    raise UserError(f"--configs_dir {path!r} is not a folder: run from the repository root (where configs/ "
                    "is) or pass --configs_dir path/to/configs")
  # The configs import each other as a package (`from configs import base`), as they do from the
  # repository root: the folder holding configs/ must be importable from anywhere else too.
  parent = os.path.dirname(os.path.abspath(path))
  if parent not in sys.path:
    sys.path.append(parent)
  return path


def load_config(name: str, directory: str | None = None):
  """<configs_dir>/<name>.py's get_config(), as `--config <name>.py` loads it."""
  return cli.load_config_file(os.path.join(configs_dir(directory), f"{name}.py"))


def known_configs(directory: str | None = None) -> list[str]:
  """The experiment configs in the configs folder (its *.py but base.py and the demos), sorted."""
  path = configs_dir(directory)
  return sorted(f[:-3] for f in os.listdir(path) if f.endswith(".py") and f[:-3] not in NOT_EXPERIMENTS)


def experiment_config(name: str, directory: str | None = None):
  """<configs_dir>/<name>.py's get_config(), as the thesis runs it."""
  known = known_configs(directory)
  if name not in known:
    raise UserError(f"--configs: unknown config {name!r}; known: {','.join(known)} (or 'all') in "
                    f"--configs_dir {configs_dir(directory)}")
  return load_config(name, directory)


def parse_configs(text: str, directory: str | None = None) -> list[str]:
  names = [n.strip() for n in text.split(",") if n.strip()]
  if names == ["all"]:
    if not known_configs(directory):
      raise UserError(f"--configs all: --configs_dir {configs_dir(directory)} holds no experiment configs (NAME.py)")
    return known_configs(directory)
  if not names or len(set(names)) < len(names):
    raise UserError(f"--configs {text!r}: expected 'all' or comma-separated config names, each once")
  for name in names:
    experiment_config(name, directory)  # an unknown name: one line listing the known ones
  return names


def toy_config(name: str, steps: int = STEPS, *, toy=None, max_examples: int = MAX_EXAMPLES,
               max_new_tokens: int = 0, directory: str | None = None):
  """<configs_dir>/<name>.py's TRANSPLANTED keys on `toy` (demo.py there by default), trained `steps`
  steps (validated and checkpointed at the end) and evaluated on the toy test splits; max_new_tokens
  > 0 caps captioning's and VQA's decoding (tests), else each task's default."""
  from bridgejax.evaluation.evaluators import eval_task  # lazy: the records reader, ~0.3 s of CLI start
  config = (toy if toy is not None else load_config("demo", directory)).copy_and_resolve_references()
  experiment = experiment_config(name, directory)
  for key in TRANSPLANTED:
    config[key] = experiment[key]
  config.name = name
  _scale_absolute_width(config)
  config.total_steps = config.checkpoint_every_steps = config.eval_every_steps = steps
  config.evals = ml_collections.ConfigDict({
      task: eval_task(task, data=config.data.dir, split=split, batch_size=config.data.val_batch_size,
                      max_examples=max_examples, progress=False)
      for task, split in {**TOY_SPLITS, **(PIC2WORD_SPLITS if config.loss.pic2word > 0 else {})}.items()})
  for task in ("caption", "vqa"):
    config.evals[task].max_new_tokens = max_new_tokens or config.evals[task].max_new_tokens
  return config


REAL_VISION_WIDTH = 1024  # ViT-L/14's, the tower a config's absolute widths are chosen against


def _scale_absolute_width(config) -> None:
  """A bridge whose `width` is absolute (configs/qformer.py:blip2's 768, BLIP-2's BERT) keeps its ratio to
  the tower on the toy one: 768 / 1024 of the toy CLIP's 64 is 48, rounded down to a multiple of its
  heads. At 768 it would dwarf the toy world (93M parameters, ~45 s a step on 2 cores); every other
  bridge's widths already follow the towers'."""
  width = config.bridge.get("width", 0)
  if not width:
    return
  from bridgejax import param_count  # lazy: jax and the models, ~1.3 s of CLI start
  toy_width = param_count.backbone_configs(config)[0].hidden_size
  heads = config.bridge.get("num_heads", 1)
  config.bridge.width = max(heads, width * toy_width // REAL_VISION_WIDTH // heads * heads)


def unrunnable(name: str, config, directory: str | None = None) -> str | None:
  """Why <configs_dir>/<name>.py cannot run on the toy backbones (its toy_config `config`), else None."""
  from bridgejax import param_count  # lazy: jax and the models, ~1.3 s of CLI start
  experiment = experiment_config(name, directory)
  for tower in ("vision", "llm"):  # the toy config's towers (demo.py's) keep base.py's CLIP + Gemma arch
    if experiment[tower].arch != config[tower].arch:
      return f"its {tower} is {experiment[tower].arch}, the toy world has CLIP + Gemma only"
  try:
    param_count.count(config)
  except Exception as e:  # pylint: disable=broad-except
    return f"its bridge does not build on the toy backbones: {cli.one_line(e)}"
  return None


def _params(n: int) -> str:
  return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def summarize(rows: list[dict], workdir: str) -> str:
  """Writes WORKDIR/ablation.md, .json and .png from rows ({config, experiment, trainable_params,
  toy_trainable_params, workdirs}); returns the Markdown table."""
  columns = table.task_columns()
  headers = [h for task, metric in HEADLINE for m, h in columns[task] if m == metric]
  cells, records = [], []
  for row in rows:
    runs = [table.load_workdir(w) for w in row["workdirs"]]
    record = {**row, "seeds": len(runs)}
    for task, metric in HEADLINE:
      values = table.metric_values(runs, task, metric)
      record[f"{task}/{metric}"], record[f"{task}/{metric} std"] = table.mean_std(values) if values else (None, None)
    records.append(record)
    cells.append([row["config"], _params(row["trainable_params"]), _params(row["toy_trainable_params"]),
                  str(len(runs))] + [table.cell(m, table.metric_values(runs, t, m)) for t, m in HEADLINE])
  markdown = table.render(["config", "trainable (real)", "trainable (toy)", "seeds"]
                          + headers, cells, markdown=True)
  with open(os.path.join(workdir, "ablation.md"), "w") as f:
    f.write(markdown + "\n")
  with open(os.path.join(workdir, "ablation.json"), "w") as f:
    json.dump(records, f, indent=1)
  plot(records, os.path.join(workdir, "ablation.png"))
  return markdown


def plot(records: list[dict], path: str) -> None:
  """Each PLOTTED metric against real-size trainable parameters (log scale): a point per config,
  error bars one std over seeds; values as the table shows them."""
  import matplotlib  # lazy: matplotlib, ~0.3 s of CLI start; the plot only
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # lazy: after matplotlib.use('Agg')
  fig, axes = plt.subplots(2, 2, figsize=(11, 8))
  for ax, (task, metric) in zip(axes.flat, PLOTTED):
    for r in records:
      mean, std = r[f"{task}/{metric}"], r[f"{task}/{metric} std"]
      if mean is None:
        continue
      y, err = float(table.fmt(metric, mean)), float(table.fmt(metric, std)) if std is not None else 0.0
      ax.errorbar(r["trainable_params"], y, yerr=err, fmt="o", capsize=3)
      ax.annotate(r["config"], (r["trainable_params"], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters at real size")
    ax.set_title(f"{task} {metric}")
  fig.suptitle("toy world: mean ± std over seeds")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def ablate(names: list[str], seeds: list[int], workdir: str, *, steps: int = STEPS,
           max_examples: int = MAX_EXAMPLES, max_new_tokens: int = 0, toy=None, directory: str | None = None) -> dict:
  """Trains and evaluates each runnable config per seed (bridgejax.sweep: done runs are skipped),
  then writes the table, JSON and plot. {"rows", "skipped": {name: reason}, "complete"}. `directory`
  is --configs_dir (None: default_configs_dir())."""
  from bridgejax import param_count  # lazy: jax and the models, ~1.3 s of CLI start
  from bridgejax.checks import check_config_paths  # lazy: jax and orbax, seconds of CLI start
  from bridgejax.toy.prepare import ensure_toy_data  # lazy: bridgejax.data, ~0.1 s of CLI start
  start, rows, skipped, complete = time.time(), [], {}, True
  with preemption.catch_sigterm():  # shared with each sweep and training: none loses it
    os.makedirs(workdir, exist_ok=True)
    for i, name in enumerate(names):
      config = toy_config(name, steps, toy=toy, max_examples=max_examples, max_new_tokens=max_new_tokens,
                          directory=directory)
      reason = unrunnable(name, config, directory)
      if reason:
        print(f"[{i + 1}/{len(names)}] {name}: skipped, {reason}", flush=True)
        skipped[name] = reason
        continue
      print(f"[{i + 1}/{len(names)}] {name} ({time.time() - start:.0f} s so far)", flush=True)
      ensure_toy_data(config)
      check_config_paths(config, for_training=True)
      check_config_paths(config, for_training=False, backbones=False)
      done = sweep.sweep(config, os.path.join(workdir, name), seeds)
      complete = complete and len(done) == len(seeds)
      if done:
        experiment = experiment_config(name, directory)
        rows.append({"config": name, "experiment": experiment.name, "steps": steps,
                     "trainable_params": param_count.count(experiment)["trainable_params"],
                     "toy_trainable_params": param_count.count(config)["trainable_params"], "workdirs": done})
      if not complete or (preemption.requested() and i + 1 < len(names)):
        complete = False
        break
  if rows:
    print(summarize(rows, workdir))
  print(f"ablation of {len(rows)} config(s) x {len(seeds)} seed(s) in {workdir}, {time.time() - start:.0f} s"
        + (f"; skipped {', '.join(skipped)}" if skipped else "")
        + ("; wrote ablation.md, ablation.json, ablation.png" if rows else "")
        + ("" if complete else "; stopped early (SIGTERM): run the same command to resume"))
  return {"rows": rows, "skipped": skipped, "complete": complete}


def main(argv=None) -> int:
  argv, debug = cli.pop_debug(sys.argv[1:] if argv is None else argv)
  p = argparse.ArgumentParser(prog="python -m bridgejax.ablate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--configs", required=True, help="comma-separated config names (NAME.py in --configs_dir), or 'all'")
  p.add_argument("--configs_dir", default=None, help="the folder of the experiment configs (default: configs/ in "
                 "the current directory, else the one beside the checkout bridgejax was installed from)")
  p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one run each")
  p.add_argument("--workdir", required=True, help="WORKDIR/<config>/seed_<s> per run; the table and plot here")
  p.add_argument("--steps", type=int, default=STEPS, help="training steps per run")
  p.add_argument("--max_examples", type=int, default=MAX_EXAMPLES, help="examples per eval task (0 = all)")
  a = p.parse_args(argv)

  def run() -> int:
    cli.quiet_library_logs()
    result = ablate(parse_configs(a.configs, a.configs_dir), sweep.parse_seeds(a.seeds), a.workdir, steps=a.steps,
                    max_examples=a.max_examples, directory=a.configs_dir)
    return 0 if result["complete"] else preemption.EXIT_STATUS
  return cli.call(run, debug=debug)


if __name__ == "__main__":
  sys.exit(main())
