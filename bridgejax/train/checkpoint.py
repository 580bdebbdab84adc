"""Training checkpoints: Orbax CheckpointManager over the train state and the data iterator.

Each step directory holds `state` (step, trainable params, optimizer state, counters) and, when
the input iterator has `get_state()`/`set_state()` (bridgejax.data's grain iterators do), `data`:
its position as JSON, so a resumed run continues at the exact next example. The data position is
a pure function of the step, the same on every process, so process 0's copy serves all. Orbax writes into a temporary directory and renames it when complete, so a
crash mid-save never leaves a checkpoint that looks valid. The per-step RNG is derived from
(seed, step), so it needs no saving.

A checkpoint can still be damaged later (a file deleted or lost). Restoring without a step then
falls back to the newest intact one, with a warning naming each damaged step; `set_aside` moves
a damaged step to `checkpoints/damaged_step_N` so that training can save step N again. A restore
target whose parameter shapes differ from the checkpoint's (a config that does not fit the run)
raises CheckpointMismatchError before anything is read.

The best checkpoint. FROMAGe keeps the checkpoint of the best validation score besides the latest
(its main.py saves `is_best` by the t2i top-1 accuracy its evaluate.validate returns), and the
thesis evaluates that one. `save_best` keeps it in `checkpoints/best/<step>`: its own Orbax
manager holding one step, out of reach of the keep-last-N rotation, with the trainable params
(no optimizer state: nothing resumes from it) and a JSON record {metric, value, step} that a
resumed run reads back (`best()`), so the best value so far is never reset. `load_params("best")`
reads it.
"""

from __future__ import annotations

import contextlib

import jax
import orbax.checkpoint as ocp
from absl import logging

from bridgejax import paths
from bridgejax.errors import UserError
from bridgejax.train.checkpoint_noise import disk_full, drop_closed_loop_noise, quiet_disk_full_reports


BEST = "best"  # the step name of the best validation checkpoint (eval.py --checkpoint best)


class CheckpointError(UserError):
  """No readable checkpoint where one was asked for."""


def checkpoint_step(step) -> int | str | None:
  """A step as eval.py, predict and the library take it: None (the latest), a number, or "best"."""
  if step is None or step == BEST:
    return step
  if isinstance(step, int) or (isinstance(step, str) and step.isdigit()):
    return int(step)
  raise CheckpointError(f"checkpoint {step!r}: expected a step number or {BEST!r}")


class CheckpointMismatchError(UserError):
  """The checkpoint's parameters do not fit the model being restored (shapes or names differ)."""

  def __init__(self, message: str, differences: list[str]):
    super().__init__(message)
    self.differences = differences


def _reason(error: BaseException) -> str:
  """A damaged checkpoint's error, as one short line."""
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  text = lines[0] if lines else type(error).__name__
  return text if len(text) <= 160 else text[:157] + "..."


class DiskFullError(UserError):
  """No space left where the checkpoints go."""


def _shapes(tree) -> dict[str, tuple]:
  return {jax.tree_util.keystr(k, simple=True, separator="/"): tuple(v.shape)
          for k, v in jax.tree_util.tree_leaves_with_path(tree) if hasattr(v, "shape")}


def param_differences(saved, target) -> list[str]:
  """'name: (saved shape) (saved) -> (shape) (now)' for each parameter that differs; [] if they fit."""
  saved, target = _shapes(saved), _shapes(target)
  out = []
  for name in sorted(saved.keys() | target.keys()):
    a, b = saved.get(name, "absent"), target.get(name, "absent")
    if a != b:
      out.append(f"{name}: {a} (saved) -> {b} (now)")
  return out


class Checkpointer:

  def __init__(self, workdir: str, *, keep: int = 3, every_steps: int = 1000):
    if keep < 1:  # Orbax would keep none: the run's model would be thrown away at its end
      raise UserError(f"keep_checkpoints={keep}: keep at least 1 checkpoint")
    self.directory = paths.path(workdir) / "checkpoints"
    if paths.is_remote(self.directory) and not str(self.directory).startswith("gs://"):
      raise UserError(f"cannot keep checkpoints in {self.directory}: Orbax writes local paths and gs:// only; "
                      "mount the bucket and pass its local path as --workdir")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every_steps, create=True)
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    drop_closed_loop_noise()
    quiet_disk_full_reports()
    self.damaged: list[tuple[int, str]] = []  # (step, why) skipped by the last fallback
    self.best_directory = self.directory / BEST
    self._best_manager = None  # opened on first use: a run without validation has no best/ folder

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
    """Saves when `step` is on the interval (or `force`); returns whether it saved."""
    items = {"state": ocp.args.StandardSave(state)}
    if hasattr(data_iterator, "get_state"):
      items["data"] = ocp.args.JsonSave(data_iterator.get_state())
    with self._writing(step):
      return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  @contextlib.contextmanager
  def _writing(self, step: int | None = None):
    """A full disk while a checkpoint is written (or finished in the background): one DiskFullError."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      if not disk_full(e):
        raise
      what = f"checkpoint {step}" if step is not None else "a checkpoint"
      raise DiskFullError(f"no space left on the disk of {self.directory} while writing {what}: free space or "
                          "use another --workdir, then run the same command to resume from the last checkpoint "
                          "saved") from None

  def best_manager(self, create: bool = False) -> ocp.CheckpointManager | None:
    """The manager of checkpoints/best/ (one step); None if it does not exist and not `create`."""
    if self._best_manager is None and (create or self.best_directory.is_dir()):
      options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
      handlers = {"state": ocp.StandardCheckpointHandler(), "best": ocp.JsonCheckpointHandler()}
      self._best_manager = ocp.CheckpointManager(self.best_directory, options=options, item_handlers=handlers)
    return self._best_manager

  def best(self) -> dict | None:
    """The best checkpoint's record {metric, value, step}, or None if there is none (or unreadable:
    the next validation then starts a new best)."""
    manager = self.best_manager()
    step = manager.latest_step() if manager is not None else None
    if step is None:
      return None
    try:
      return dict(manager.restore(step, args=ocp.args.Composite(best=ocp.args.JsonRestore()))["best"])
    except Exception as e:  # pylint: disable=broad-except
      drop_closed_loop_noise()
      logging.warning("the best checkpoint %d in %s cannot be read (%s); a new best is kept from the next "
                      "validation", step, self.best_directory, _reason(e))
      return None

  def save_best(self, step: int, params, record: dict) -> None:
    """Keeps `params` as the best checkpoint (replacing the previous one), with `record`."""
    manager = self.best_manager(create=True)
    for old in manager.all_steps():  # a resumed run that fell back before the old best re-reaches it
      if old >= step:
        manager.delete(old)
    with self._writing(step):
      manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params}),
                                                 best=ocp.args.JsonSave(record)), force=True)

  def _check_fits(self, step: int, abstract_state) -> None:
    target = abstract_state.get("params") if isinstance(abstract_state, dict) else getattr(abstract_state, "params",
                                                                                             None)
    try:
      saved = self.manager.item_metadata(step)["state"]
    except Exception:  # pylint: disable=broad-except
      return  # unreadable metadata: the restore itself tells whether the step is intact
    try:
      saved = saved["params"]  # Orbax's tree metadata: indexable like the saved dict
    except (KeyError, TypeError):
      return
    if target is None:
      return
    differences = param_differences(saved, target)
    if differences:
      raise CheckpointMismatchError(
          f"checkpoint {step} in {self.directory} does not fit this model: " + "; ".join(differences[:6])
          + (f" (and {len(differences) - 6} more)" if len(differences) > 6 else ""), differences)

  def _restore_step(self, step: int, abstract_state, data_iterator):
    self._check_fits(step, abstract_state)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      if "data" not in self.manager.item_metadata(step).keys():
        raise ValueError("it has no data position, so the data iterator cannot resume exactly (saved without a "
                         "resumable iterator, or its data/ folder is missing)")
      items["data"] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if data_iterator is not None:
      try:
        data_iterator.set_state(restored["data"])
      except ValueError as e:  # read fine, but another data stream (seed, batch size, dataset): a mismatch, not damage
        raise CheckpointMismatchError(f"checkpoint {step} in {self.directory}: {e}", [" ".join(str(e).split())]) from None
    return restored["state"]

  def _newest_intact(self, read, step: int | None, manager=None):
    """read(step) for `step`, or for the newest step that reads, newest first; (step, result).
    `manager`: whose steps (default: checkpoints/'s)."""
    manager = manager or self.manager
    steps = sorted(manager.all_steps())
    directory = self.directory if manager is self.manager else self.best_directory
    if step is not None:
      if step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; available steps: {steps}")
      try:
        return step, read(step)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        drop_closed_loop_noise()
        raise CheckpointError(f"checkpoint {step} in {directory} cannot be read ({_reason(e)}); pick another "
                              f"step of {steps}, or leave the step out for the newest intact one") from None
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    self.damaged = []
    for s in reversed(steps):
      try:
        result = read(s)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        drop_closed_loop_noise()
        self.damaged.append((s, _reason(e)))
        logging.warning("checkpoint %d in %s cannot be read (%s); trying the one before it", s, directory,
                        _reason(e))
        continue
      if self.damaged:
        logging.warning("restored step %d of %s: the newer step(s) %s are damaged", s, directory,
                        ", ".join(str(d) for d, _ in self.damaged))
      return s, result
    raise CheckpointError(f"no intact checkpoint in {directory}: "
                          + "; ".join(f"step {s}: {why}" for s, why in self.damaged)
                          + ". Delete the damaged step folders to start again, or use another --workdir")

  def restore(self, abstract_state, data_iterator=None, step: int | None = None):
    """The state at `step` (default: the newest intact step), laid out like `abstract_state`
    (shapes, dtypes and shardings); restores `data_iterator`'s position in place."""
    self.restored_step, state = self._newest_intact(
        lambda s: self._restore_step(s, abstract_state, data_iterator), step)
    return state

  def load_params(self, step: int | str | None = None) -> tuple[int, dict]:
    """(step, trainable params {bridge, ret}) of a checkpoint (default: the newest intact one;
    "best": the best validation checkpoint), for evaluation and inference: no optimizer or data
    state needed. Placed on this process's first device, whatever topology trained it (a TPU
    pod's checkpoint loads on a workstation)."""
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    step, manager = checkpoint_step(step), self.manager
    if step == BEST:
      manager = self.best_manager()
      step = manager.latest_step() if manager is not None else None
      if step is None:
        raise CheckpointError(
            f"{self.directory.parent} has no best checkpoint ({self.best_directory}): training keeps one "
            "while it validates (data.val_split) with config.best_metric set; evaluate the latest checkpoint "
            "or a step instead")

    def read(s):
      metadata = manager.item_metadata(s)["state"]
      if metadata is None:
        raise ValueError("its state metadata is missing")
      target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), metadata)
      return manager.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]

    step, state = self._newest_intact(read, step, manager)
    return step, state["params"]

  def set_aside(self, steps) -> None:
    """Moves damaged steps to checkpoints/damaged_step_N (kept for inspection, ignored by Orbax),
    so that training can save those steps again. Call on process 0, then `reload()` everywhere."""
    for s in steps:
      target = self.directory / f"damaged_step_{s}"
      if target.exists():
        target = self.directory / f"damaged_step_{s}_{len(list(self.directory.iterdir()))}"
      paths.move(self.directory / str(s), target)
      logging.warning("moved the damaged checkpoint %d to %s", s, target)

  def reload(self) -> None:
    self.manager.reload()

  def _managers(self):
    return [m for m in (self.manager, self._best_manager) if m is not None]

  def wait(self):
    with self._writing():
      for manager in self._managers():
        manager.wait_until_finished()

  def close(self):
    for manager in self._managers():
      manager.close()


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) describing `tree`, the target layout for a restore."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def warm_start(params: dict, workdir: str) -> tuple[dict, str]:
  """params {bridge, ret} with every bridge parameter that `workdir`'s newest checkpoint holds at the same
  path and shape taken from it (config.init_from: BLIP-2's stage 2 from stage 1), and a one-line
  report of what was taken, what starts fresh and what was left behind. Reads `workdir`, writes nothing."""
  if not (paths.path(workdir) / "checkpoints").is_dir():
    raise UserError(f"config.init_from={workdir!r} has no checkpoints/ folder: point it at a trained run's workdir")
  source = Checkpointer(workdir)
  try:
    if not source.all_steps():
      raise UserError(f"config.init_from={workdir!r} has no checkpoint yet: train that run first")
    step, saved = source.load_params()
  finally:
    source.close()
  flat = lambda tree: {jax.tree_util.keystr(k, simple=True, separator="/"): v
                       for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  saved_bridge = flat(saved.get("bridge", {}))
  taken, fresh = [], []

  def take(path, value):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    if name in saved_bridge and tuple(saved_bridge[name].shape) == tuple(value.shape):
      taken.append(name)
      return jax.numpy.asarray(saved_bridge[name], value.dtype)
    fresh.append(name)
    return value

  bridge = jax.tree_util.tree_map_with_path(take, params["bridge"])
  if not taken:
    raise UserError(f"config.init_from={workdir!r}: its bridge shares no parameter (same name and shape) with this "
                    "config's bridge; start from a run of the same bridge settings")
  left = sorted(set(saved_bridge) - set(taken))
  report = (f"bridge initialised from {workdir} (step {step}): {len(taken)} of {len(taken) + len(fresh)} arrays"
            + (f"; fresh: {', '.join(fresh[:6])}{' ...' if len(fresh) > 6 else ''}" if fresh else "")
            + (f"; not used: {len(left)} ({', '.join(left[:3])}{' ...' if len(left) > 3 else ''})" if left else ""))
  return {**params, "bridge": bridge}, report
