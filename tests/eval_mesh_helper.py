"""Run by tests/test_eval_mesh.py in a fresh process with XLA_FLAGS faking 8 CPU devices:

    python tests/eval_mesh_helper.py WORKDIR OUT.json [WORLD.json]

Trains the tiny eval world's bridge for 2 steps on a data=4 x model=2 mesh and runs the final
evaluation of all four tasks there (as train.py does), then evaluates the same checkpoint on one
device. Writes both runs' metrics and predictions, and where the parameters lived, as JSON.
WORLD.json: tiny_eval_world.world()'s paths, to reuse a world the calling process already built."""

import dataclasses
import json
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_eval_world as tw  # noqa: E402
from bridgejax import experiment, mesh as mesh_lib  # noqa: E402
from bridgejax.evaluation import run as eval_run  # noqa: E402
from bridgejax.main import run  # noqa: E402

TASKS = ("caption", "retrieval", "vqa", "visdial")


def predictions(workdir: str) -> dict:
  out = {}
  for task in TASKS:
    with open(os.path.join(workdir, "eval", f"{task}_predictions.json")) as f:
      out[task] = json.load(f)["predictions"]
  return out


def main():
  workdir, out = sys.argv[1:3]
  if len(sys.argv) > 3:
    with open(sys.argv[3]) as f:
      world = json.load(f)
    tw.world = lambda: world
  # batch 3 and 3 rounds per step: rows padded to the mesh; one decoding length compiles one loop
  config = tw.config(max_examples=5, batch_size=3, visdial={"rounds_per_step": 3}, vqa={"max_new_tokens": 6})
  config.update(total_steps=2, batch_size=4, log_every_steps=1, checkpoint_every_steps=2, eval_every_steps=1000,
                tensorboard=False, eval_after_training=True, frozen_sharding="fsdp")
  config.data.val_split = ""
  config.mesh.data, config.mesh.model = 4, 2
  setup = experiment.build(config)
  frozen_devices = {len(x.sharding.device_set) for x in jax.tree.leaves(setup.frozen)}
  summary = run(config, workdir)
  _, mesh_params = eval_run.load_params(setup, workdir)
  mesh_run = {"metrics": {t: summary["eval"][t]["metrics"] for t in TASKS}, "predictions": predictions(workdir)}

  one = mesh_lib.make_mesh(1, 1, devices=jax.devices()[:1])
  single_setup = dataclasses.replace(setup, mesh=one, frozen=jax.device_put(setup.frozen, mesh_lib.replicated(one)))
  step, params = eval_run.load_params(single_setup, workdir)
  results = eval_run.evaluate(config, workdir, setup=single_setup, report=False, quiet=True)
  single_run = {"metrics": {t: results[t]["metrics"] for t in TASKS}, "predictions": predictions(workdir)}
  with open(out, "w") as f:
    json.dump({"devices": jax.device_count(), "frozen_devices": sorted(frozen_devices), "step": step,
               "trainable_devices": sorted({len(x.sharding.device_set) for x in jax.tree.leaves(params)}),
               "mesh_trainable_devices": sorted({len(x.sharding.device_set) for x in jax.tree.leaves(mesh_params)}),
               "mesh": mesh_run, "single": single_run}, f)


if __name__ == "__main__":
  main()
