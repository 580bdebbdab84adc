"""Train and evaluate one run per seed, resumably, then print their mean ± std (the thesis reports
the mean of 3 runs):

    python -m bridgejax.sweep --config configs/X.py --seeds 0,1,2 --workdir runs/X [--config.key=value ...]
                              [--checkpoint best|last]

Seed s trains in WORKDIR/seed_s (bridgejax.main.run, with config.seed = s; a stopped run resumes)
and is then evaluated (eval/*.json, as eval.py writes them) on its best validation checkpoint
(config.best_metric) where it kept one, else on its last; --checkpoint last takes the last always.
A seed already trained to total_steps and evaluated on that checkpoint is skipped, so the same
command resumes a stopped sweep. At the end, python -m bridgejax.evaluation.table over the seeds:
one row, mean ± std. A SIGTERM stops it at the next safe point (a training saves its step; an
evaluation stops between tasks; else it stops before the next seed), with exit status 143: run the
same command to resume.
Single-process only (on a pod, train each seed with train.py --multihost, then use the table).
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from bridgejax import cli, preemption
from bridgejax.errors import UserError
from bridgejax.evaluation import table


def _define_flags() -> None:
  """Defined when run as a program only: importing this module (tests, the library) defines no
  absl flags, so it can sit beside other modules' own --config."""
  config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py[:args])", lock_config=True)
  flags.DEFINE_string("workdir", None, "the sweep's directory: one run per seed in WORKDIR/seed_<seed>")
  flags.DEFINE_string("seeds", "0,1,2", "comma-separated seeds, one run each")
  flags.DEFINE_enum("checkpoint", "best", ["best", "last"], "the checkpoint each seed is evaluated on: best (the "
                    "best validation step, where the run kept one) or last")
  flags.mark_flags_as_required(["config", "workdir"])


FLAGS = flags.FLAGS


def parse_seeds(text: str) -> list[int]:
  items = [s.strip() for s in text.split(",") if s.strip()]
  if not items or not all(s.lstrip("-").isdigit() for s in items):
    raise UserError(f"--seeds {text!r}: expected comma-separated integers, e.g. --seeds 0,1,2")
  seeds = [int(s) for s in items]
  if len(set(seeds)) < len(seeds):
    raise UserError(f"--seeds {text!r} names a seed twice; give each once")
  return seeds


def seed_workdir(workdir: str, seed: int) -> str:
  from bridgejax import paths  # lazy: etils.epath, ~0.05 s of CLI start
  return str(paths.path(workdir) / f"seed_{seed}")


def trained_step(workdir: str, config, checkpoint: str) -> tuple[int, int | str] | None:
  """(step, what to load) to evaluate if the run is trained to config.total_steps: its best step
  and "best" where it kept one and `checkpoint` is "best" (the step may be gone from the last N),
  else its last step twice; None if it still has steps to train."""
  from bridgejax import paths  # lazy: etils.epath, ~0.05 s of CLI start
  path = paths.path(workdir) / "train_summary.json"
  summary = paths.read_json(path) if path.exists() else {}
  if summary.get("preempted", True) or summary.get("step", 0) < config.total_steps:
    return None
  best = summary.get("best")
  if checkpoint == "best" and best:
    return int(best["step"]), "best"
  return int(summary["step"]), int(summary["step"])


def evaluated_step(workdir: str, tasks) -> int | None:
  """The checkpoint step of the run's eval/<task>.json files when every task in `tasks` has one and
  all agree; None otherwise (an evaluation stopped between tasks is not done)."""
  try:
    results = table.load_workdir(workdir)
  except FileNotFoundError:
    return None
  if any(task not in results for task in tasks):
    return None
  steps = {results[task].get("checkpoint_step") for task in tasks}
  return steps.pop() if len(steps) == 1 else None


def sweep(config, workdir: str, seeds: list[int], checkpoint: str = "best") -> list[str]:
  """Trains and evaluates each seed not done yet (module doc); prints progress, a line per seed and
  the mean ± std table; returns the seeds' workdirs (fewer if a SIGTERM stopped it)."""
  with preemption.catch_sigterm():  # the ablation's, if it runs inside one
    return _sweep(config, workdir, seeds, checkpoint)


def _sweep(config, workdir: str, seeds: list[int], checkpoint: str) -> list[str]:
  from bridgejax.evaluation.run import evaluate  # lazy: jax and the models, seconds of CLI start
  from bridgejax.main import run, stages  # lazy: jax and the models, seconds of CLI start
  done, report = [], []
  for i, seed in enumerate(seeds):
    run_config = config.copy_and_resolve_references()
    run_config.seed = seed
    run_config.eval_after_training = False  # evaluated below, on the chosen checkpoint
    where = seed_workdir(workdir, seed)
    final = stages(run_config, where)[1]  # what WORKDIR itself trains: stage 2 of a two-stage config
    target, did = trained_step(where, final, checkpoint), []
    print(f"[{i + 1}/{len(seeds)}] seed {seed} in {where}: " + ("trained" if target else "training"), flush=True)
    if target is None:
      summary = run(run_config, where)
      if summary["preempted"]:
        print(f"seed {seed} stopped at step {summary['step']} (SIGTERM); run the same command to resume")
        break
      target = trained_step(where, final, checkpoint)
      did.append(f"trained to step {summary['step']}")
    step, load = target
    if evaluated_step(where, list(run_config.evals)) != step:
      evaluate(final, where, load)
      if preemption.requested() and evaluated_step(where, list(run_config.evals)) != step:
        print(f"seed {seed}: evaluation stopped (SIGTERM); run the same command to resume")
        break
      did.append(f"evaluated step {step}" + (" (best)" if load == "best" else ""))
    report.append(f"  seed {seed}: " + (", ".join(did) if did else f"done already (step {step} evaluated)"))
    done.append(where)
    if preemption.requested() and i + 1 < len(seeds):
      print(f"stopped after seed {seed} (SIGTERM); run the same command to resume")
      break
  print(f"sweep of {len(done)}/{len(seeds)} seeds in {workdir}:\n" + "\n".join(report))
  if done:
    print(table.table(done))
  return done


def main(argv):
  del argv
  cli.quiet_library_logs()
  seeds = parse_seeds(FLAGS.seeds)
  from bridgejax.checks import check_config_paths  # lazy: jax and orbax, seconds of CLI start
  from bridgejax.toy.prepare import ensure_toy_data  # lazy: bridgejax.data, ~0.1 s of CLI start
  ensure_toy_data(FLAGS.config)
  check_config_paths(FLAGS.config, for_training=True)
  check_config_paths(FLAGS.config, for_training=False, backbones=False)  # each seed is evaluated
  done = sweep(FLAGS.config, FLAGS.workdir, seeds, FLAGS.checkpoint)
  return 0 if len(done) == len(seeds) else preemption.EXIT_STATUS


if __name__ == "__main__":
  _define_flags()
  cli.run_absl(main)
