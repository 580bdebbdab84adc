"""Training checkpoints: Orbax CheckpointManager over the train state and the data iterator.

Each step directory holds `state` (step, trainable params, optimizer state, counters) and, when
the input iterator has `get_state()`/`set_state()` (bridgejax.data's grain iterators do), `data`:
its position as JSON, so a resumed run continues at the exact next example. The data position is
a pure function of the step, the same on every process, so process 0's copy serves all. Orbax writes into a temporary directory and renames it when complete, so a
crash mid-save never leaves a checkpoint that looks valid. The per-step RNG is derived from
(seed, step), so it needs no saving.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, workdir: str, *, keep: int = 3, every_steps: int = 1000):
    self.directory = os.path.join(os.path.abspath(workdir) if "://" not in workdir else workdir, "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every_steps, create=True)
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
    """Saves when `step` is on the interval (or `force`); returns whether it saved."""
    items = {"state": ocp.args.StandardSave(state)}
    if hasattr(data_iterator, "get_state"):
      items["data"] = ocp.args.JsonSave(data_iterator.get_state())
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state, data_iterator=None, step: int | None = None):
    """The state at `step` (default: latest), laid out like `abstract_state` (shapes, dtypes and
    shardings); restores `data_iterator`'s position in place."""
    step = self.manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    if step not in self.manager.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                              f"available steps: {sorted(self.manager.all_steps())}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      if "data" not in self.manager.item_metadata(step).keys():
        raise ValueError(f"checkpoint {step} in {self.directory} has no data position, so the data "
                         "iterator cannot resume exactly; it was saved without a resumable iterator")
      items["data"] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if data_iterator is not None:
      data_iterator.set_state(restored["data"])
    return restored["state"]

  def load_params(self, step: int | None = None) -> tuple[int, dict]:
    """(step, trainable params {bridge, ret}) of a checkpoint, for evaluation and inference: no
    optimizer or data state needed. Placed on this process's first device, whatever topology
    trained it (a TPU pod's checkpoint loads on a workstation)."""
    step = self.manager.latest_step() if step is None else step
    if step is None or step not in self.manager.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                              f"available steps: {sorted(self.manager.all_steps())}")
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                          self.manager.item_metadata(step)["state"])
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return step, restored["state"]["params"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) describing `tree`, the target layout for a restore."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
