"""The programs bench/tpu_compile.py compiles for a TPU topology, each reached through what its run uses.

    train    the training step (bridgejax.train.program.train_programs), on the global batch that
             train.py's loader and global_batch assemble from each process's rows
    encode   images -> visual tokens and image embedding (Engine.encode: captioning's and
             retrieval's image side), at the caption task's eval batch
    caption  KV-cache generation after [visual tokens] + BOS (Engine.generate: the prefix, prefill
             and greedy or beam loop), jitted whole through Engine.programs
    text     the text embedding of BOS + caption + [RET] (Engine.text_embedding: retrieval's text
             side), at the retrieval task's batch x captions_per_image rows of max_caption_tokens

The eval programs run on an Engine over abstract params (the frozen trees as build_abstract lays
them out, the trainable tree in float32 replicated, as evaluation.run.load_params puts a
checkpoint), with the settings of the config's first caption and retrieval tasks (config.evals;
eval_task's defaults where it has none). Each program's compile reports XLA's memory per device.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from train_step import memory_fields

PROGRAMS = ("train", "encode", "caption", "text")
# Caption prompts are BOS + caption_prompt padded to a multiple of 8 (evaluators/caption.py); with no
# tokenizer here, BOS alone: caption_prompt is "" in every config.
CAPTION_PROMPT_SLOTS = 8


def compile_program(fn, args, mesh) -> dict:
  """Lowers and compiles fn(*args) (ShapeDtypeStructs with their shardings) on `mesh`: XLA's memory
  per device (total = temp + arguments + output - aliased) and the compile time. A program the
  compiler finds too large for HBM comes back as {"error": its message}."""
  start = time.perf_counter()
  try:
    with jax.set_mesh(mesh):
      compiled = fn.lower(*args).compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return {"error": str(e).strip().splitlines()[0], "compile_s": round(time.perf_counter() - start, 1)}
  out = memory_fields(compiled)
  out["total_bytes"] = out["temp_bytes"] + out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
  out["compile_s"] = round(time.perf_counter() - start, 1)
  return out


def on_mesh(tree, sharding):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def shapes(tree) -> dict:
  return {k: list(v.shape) for k, v in tree.items()}


class TrainStep:
  """The train step of `setup` (build_abstract's), made once and compiled at any global batch."""

  def __init__(self, setup):
    from bridgejax.mesh import replicated
    from bridgejax.train.optimizer import make_optimizer
    from bridgejax.train.program import train_programs

    self.setup = setup
    init, self.step = train_programs(setup, make_optimizer(setup.config.optim))
    self.state = on_mesh(jax.eval_shape(init, jax.random.key(0), setup.frozen), replicated(setup.mesh))
    self.ret_norm = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated(setup.mesh))

  def compile(self, batch_size: int, text_len: int) -> dict:
    from bridgejax.train.program import abstract_batch

    batch = abstract_batch(self.setup, batch_size, text_len)
    out = compile_program(self.step, (self.state, self.setup.frozen, batch, self.ret_norm), self.setup.mesh)
    return {"rows": batch_size, "inputs": shapes(batch), **out}


def process_batches(setup, batch_size: int, text_len: int, processes: int) -> dict:
  """What each process of a multi-host run (train.py --multihost) loads: the loader reads
  check_batch_size's rows per process, and global_batch joins them with
  jax.make_array_from_process_local_data, which lays a process's rows, in order, onto the row
  ranges its devices hold of the global batch (not always one block: a topology-aware mesh
  interleaves the hosts). Read from the compiled batch's layout: every process's devices must hold
  exactly that many rows, the processes' ranges splitting the batch, or the program is not the one
  a multi-host run would run."""
  from bridgejax.train.loop import check_batch_size
  from bridgejax.train.program import abstract_batch

  config = setup.config.copy_and_resolve_references()
  config.batch_size = batch_size
  rows = check_batch_size(config, setup.mesh.shape["data"], processes)  # the loader's batch_size
  batch = abstract_batch(setup, batch_size, text_len)
  held = {}  # process -> the row ranges its devices hold
  for device, index in batch["image"].sharding.devices_indices_map(batch["image"].shape).items():
    held.setdefault(device.process_index, set()).add(index[0].indices(batch_size)[:2])
  ranges = {p: sorted(r) for p, r in sorted(held.items())}
  counts = {p: sum(b - a for a, b in r) for p, r in ranges.items()}
  covered = sorted(x for r in ranges.values() for a, b in r for x in range(a, b))
  if len(ranges) != processes or set(counts.values()) != {rows} or covered != list(range(batch_size)):
    raise SystemExit(f"error: the batch layout does not give each of {processes} processes {rows} rows of its own: "
                     f"{ranges}")
  merged = {}  # adjacent ranges joined, for reading
  for p, r in ranges.items():
    merged[p] = []
    for a, b in r:
      if merged[p] and merged[p][-1][1] == a:
        merged[p][-1][1] = b
      else:
        merged[p].append([a, b])
  return {"processes": processes, "rows": rows, "row_ranges": merged,
          "inputs": {k: [rows, *v.shape[1:]] for k, v in batch.items()}}


def eval_task_settings(config, kind: str):
  """The config's first config.evals entry of type `kind`, else eval_task's defaults for it."""
  from ml_collections import ConfigDict

  from bridgejax.evaluation.evaluators import eval_task
  for cfg in (config.get("evals") or {}).values():
    if cfg.get("type") == kind:
      return cfg
  return ConfigDict(eval_task(kind))


def eval_programs(setup, names) -> dict:
  """{name: (jitted fn, abstract args, what it runs on)} of the eval programs in `names`."""
  from bridgejax.engine import Engine
  from bridgejax.mesh import batch_sharding

  config, model = setup.config, setup.model
  caption, retrieval = eval_task_settings(config, "caption"), eval_task_settings(config, "retrieval")
  trainable = jax.eval_shape(model.init_trainable, jax.random.key(0), setup.frozen)
  trainable = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), trainable)  # as load_params
  engine = Engine(model, {**setup.frozen, **trainable}, None, mesh=setup.mesh)  # places the trainable replicated
  programs = engine.programs(max_new_tokens=caption.max_new_tokens, num_beams=caption.num_beams)
  rows = batch_sharding(setup.mesh)
  arr = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rows)
  vision = model.vision.config
  b = engine.round_batch(caption.batch_size)
  images = arr((b, vision.num_channels, vision.image_size, vision.image_size), jnp.float32)
  tokens = jax.eval_shape(programs["encode"], engine.params, images)[0]  # host-bound, then sharded again
  prompt = arr((b, CAPTION_PROMPT_SLOTS), jnp.int32)
  t = engine.round_batch(retrieval.batch_size) * retrieval.captions_per_image
  text = arr((t, config.data.max_caption_tokens), jnp.int32)
  out = {
      "encode": (programs["encode"], (engine.params, images), {"images": list(images.shape)}),
      "caption": (programs["generation"], (engine.params, arr(tokens.shape, tokens.dtype), prompt, prompt),
                  {"visual_tokens": list(tokens.shape), "prompt": list(prompt.shape),
                   "max_new_tokens": caption.max_new_tokens, "num_beams": caption.num_beams}),
      "text": (programs["text_embedding"], (engine.params, text, text), {"text_ids": list(text.shape)}),
  }
  return {name: out[name] for name in names if name in out}
