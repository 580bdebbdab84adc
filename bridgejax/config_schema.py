"""Every config key declared once: its default, the values it takes, and whether a resumed run may change it.

    config = default_config()                # configs/base.py: the FROMAGe / thesis recipe, a ConfigDict
    complete(config)                         # a config read (file, config.json): missing keys get defaults
    check_config_values(config)              # train.py, eval.py, sweep, ablate: every bad value, one line
    harmless("data.num_workers")             # True: a resumed run may change it (train/loop.py)
    python -m bridgejax.config_schema        # the reference table of docs/configuration.md

Configs stay ml_collections files with `get_config(arg)`, as in big_vision: the schema describes them,
it does not replace them. Registries declare three parts: `bridge.*` (each bridge's own keys and their
checks, bridgejax.bridges), `evals.*` (each task type's keys and defaults,
bridgejax.evaluation.evaluators; their ranges are here, as that registry sits above the training
code that checks a config) and the optional loss terms' weights `loss.<term>` and sections (gathered
here from bridgejax.terms). `optim.groups.*` take GROUP_KEYS. Reading this module does not import jax.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
from collections.abc import Callable
from typing import Any

import ml_collections

from bridgejax import terms
from bridgejax.errors import UserError

# The choices of the string keys that the runtime modules read (model.py, train/optimizer.py).
STAGES = ("generative", "representation")
REMAT = ("none", "llm", "all")
VISUAL_TOKEN_SCALES = ("sqrt_d", "none")
SCHEDULES = ("constant", "cosine")
# data.image_resize (bridgejax.data.image): "clip" short side + centre crop, "squash" the whole image to a
# square, "siglip" squashed with mean = std = 0.5 (SiglipImageProcessor).
RESIZES = ("clip", "squash", "siglip")
DTYPES = ("bfloat16", "float32", "float16")
# What a group of optim.groups may set; the rest of optim (grad_clip, grad_accum_steps) is global.
GROUP_KEYS = ("lr", "schedule", "warmup_steps", "decay_steps", "final_lr_fraction", "init_lr_fraction",
              "weight_decay", "b1", "b2", "eps")


def _number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def int_at_least(low: int) -> tuple[Callable, str]:
  return (lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= low), f"an integer >= {low}"


def at_least(low: float, strict: bool = False) -> tuple[Callable, str]:
  test = (lambda x: _number(x) and x > low) if strict else (lambda x: _number(x) and x >= low)
  return test, f"a finite number {'>' if strict else '>='} {low:g}"


def between(low: float, high: float, high_open: bool = False) -> tuple[Callable, str]:
  test = (lambda x: _number(x) and low <= x < high) if high_open else (lambda x: _number(x) and low <= x <= high)
  return test, f"a number in [{low:g}, {high:g}{')' if high_open else ']'}"


def one_of(*choices) -> tuple[Callable, str]:
  return (lambda x: x in choices), "one of " + ", ".join(map(repr, choices))


def _type_rule(default) -> tuple[Callable, str] | None:
  if isinstance(default, bool):
    return (lambda x: isinstance(x, bool)), "True or False"
  if isinstance(default, int):
    return (lambda x: isinstance(x, int) and not isinstance(x, bool)), "an integer"
  if isinstance(default, float):
    return (lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)), "a number"
  if isinstance(default, str):
    return (lambda x: isinstance(x, str)), "a string"
  return None


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key. `rule` = (test, what the value must be[, why]); without one the value must have
  the default's type. `resume`: changing it when a run resumes is harmless (it drives how the run
  goes, not what its checkpoints hold), so the config-mismatch check ignores it. `optional`: not in
  the base config; a config that sets it is checked (configs/demo.py's data.toy)."""

  default: Any
  doc: str = ""
  rule: tuple | None = None
  resume: bool = False
  optional: bool = False


_RUN = dict(resume=True)  # how a run is driven, logged or placed on devices

# dotted key -> Key, in the order of the reference table; sections are the dots. The optional loss
# terms' keys follow them in declared().
KEYS: dict[str, Key] = {
    "name": Key("base", "the experiment's name (run records, the ablation table)", **_RUN),
    # Frozen backbones.
    "vision.path": Key("clip-vit-large-patch14", "the vision tower: an HF folder or a bridgejax converted "
                       "one (python -m bridgejax.weights.convert)", **_RUN),
    "vision.arch": Key("clip-vit-large-patch14", "its architecture, for python -m bridgejax.param_count "
                       "when `path` does not exist yet"),
    "vision.cls_equivalent": Key("mean", "what stands in for the CLS token on a tower without one (SigLIP): "
                                 "the patches' mean or the attention-pool head's output; CLIP ignores it",
                                 one_of("mean", "pooled")),
    "llm.path": Key("gemma-2b-it", "the frozen LLM: an HF folder or a converted one", **_RUN),
    "llm.tokenizer": Key("", "its tokenizer; \"\" = llm.path", **_RUN),
    "llm.arch": Key("gemma-2b", "its architecture, for param_count when `path` does not exist yet"),
    "compute_dtype": Key("bfloat16", "the dtype of every activation", one_of(*DTYPES)),
    "frozen_param_dtype": Key("bfloat16", "the frozen towers' weights; trainable ones and the optimiser "
                              "state stay float32", one_of(*DTYPES)),
    "frozen_sharding": Key("replicate", "frozen weights on every device, or split over the whole mesh",
                           one_of("replicate", "fsdp"), **_RUN),
    "remat": Key("none", "recompute in the backward pass: nothing, each frozen LLM layer, or those plus the "
                 "LM head and the bridge (docs/performance.md)", one_of(*REMAT)),
    "matmul_precision": Key("", "\"\" = float32 compute runs its matmuls at full float32 precision; any "
                            "jax.default_matmul_precision name overrides it"),
    "visual_token_scale": Key("sqrt_d", "visual tokens times sqrt(d_llm) like text embeddings, as the "
                              "thesis's transformers-4.x stack did, or added unscaled (model.py)",
                              one_of(*VISUAL_TOKEN_SCALES)),
    # The bridge h: its own keys come from bridgejax.bridges.
    "bridge.name": Key("cls_linear", "the bridge; its own keys (bridge.k, bridge.layer, ...) are listed by "
                       "python -c \"import bridgejax.bridges as b; print(b.describe())\""),
    # Retrieval.
    "ret.embed_dim": Key(256, "W_t and W_i project [RET] and the image into this width", int_at_least(1)),
    "ret.logit_scale_init": Key(math.log(1 / 0.07), "the contrastive logit scale's start, log(1/0.07)"),
    "ret.rescale_row": Key(True, "FROMAGe: the [RET] embedding row back to the frozen rows' mean norm after "
                           "each step"),
    # Loss weights; the optional terms' weights are added below from bridgejax.terms.
    "loss.caption": Key(1.0, "captioning cross-entropy (FROMAGe: 1; the thesis's eq. 5.1: 0.5)", at_least(0)),
    "loss.text": Key(1.0, "the text pass's cross-entropy (the caption and [RET], no image; FROMAGe: 1, the thesis: 0)", at_least(0)),
    "loss.contrastive": Key(1.0, "(InfoNCE_t2i + InfoNCE_i2t) / 2, over every device's batch", at_least(0)),
    "token_type_embeddings": Key(False, "token-type embeddings through a LayerScale initialised at 1e-5 on "
                                 "every LLM input"),
    "concat_prob": Key(0.5, "the concat trick's probability per step (batch_size must be even)", between(0, 1)),
    # Two-stage training (BLIP-2).
    "stage": Key("generative", "\"representation\" is BLIP-2's stage 1: the Q-Former alone with ITC, ITM and "
                 "ITG (qformer bridge only)", one_of(*STAGES)),
    "init_from": Key("", "a run's workdir whose newest checkpoint starts the bridge (equal path and shape)"),
    "representation_share": Key(0.0, "stage 1's share of total_steps, run first in WORKDIR/representation",
                                (*between(0, 1, high_open=True), "0 = no stage 1")),
    # The optimiser: AdamW, a linear warm-up, then constant or cosine.
    "optim.lr": Key(3e-4, "", (*at_least(0, strict=True), "the peak learning rate")),
    "optim.b1": Key(0.9, "Adam's beta 1", between(0, 1, high_open=True)),
    "optim.b2": Key(0.95, "Adam's beta 2", between(0, 1, high_open=True)),
    "optim.eps": Key(1e-8, "Adam's epsilon", at_least(0)),
    "optim.weight_decay": Key(0.0, "decoupled weight decay", at_least(0)),
    "optim.grad_clip": Key(1.0, "", (*at_least(0), "the global-norm clip; 0 = no clipping")),
    "optim.warmup_steps": Key(100, "linear warm-up steps", int_at_least(0)),
    "optim.schedule": Key("constant", "after the warm-up (FROMAGe: constant)", one_of(*SCHEDULES)),
    "optim.decay_steps": Key(20_000, "the cosine's length", int_at_least(1)),
    "optim.final_lr_fraction": Key(0.0, "the cosine ends at lr times this", between(0, 1)),
    "optim.grad_accum_steps": Key(1, "micro-batches per step", int_at_least(1)),
    "optim.init_lr_fraction": Key(0.0, "the warm-up starts at lr times this (FROMAGe: 0)", between(0, 1)),
    "optim.groups": Key({}, "per-group settings {name: {params: a regex on 'bridge/prompt_in/kernel'-style "
                        "paths, and any of " + ", ".join(GROUP_KEYS) + "}}; unmatched parameters keep optim's"),
    # Data.
    "data.dir": Key("", "a prepared dataset folder (python -m bridgejax.prepare ...)", **_RUN),
    "data.train_split": Key("train", "its training split"),
    "data.val_split": Key("val", "the periodic validation's split; \"\" = none", **_RUN),
    "data.max_caption_tokens": Key(24, "BOS + caption + [RET]; a longer caption is cut and still ends in [RET]",
                                   (*int_at_least(3), "BOS, at least one caption token and [RET]")),
    "data.num_workers": Key(8, "processes decoding and preprocessing images (0 = in the training process)",
                            int_at_least(0), **_RUN),
    "data.val_examples": Key(1000, "the periodic validation's examples", int_at_least(1), **_RUN),
    "data.val_batch_size": Key(64, "its batch size (rounded up to a multiple of mesh.data)", int_at_least(1),
                               **_RUN),
    "data.image_resize": Key("clip", "shortest side to the tower's size + centre crop (FROMAGe), or the whole "
                             "image squashed to a square", one_of(*RESIZES)),
    "data.features": Key("", "cached frozen features (python -m bridgejax.features): \"\" = off, \"auto\" = "
                         "DIR/features/TRAIN_SPLIT, or the cache's folder", **_RUN),
    # The toy world (configs/demo.py): generated into data.toy.dir on first use, and only there.
    "data.toy.dir": Key("", "the only folder the toy world is written into (data.dir must equal it)",
                        optional=True, **_RUN),
    "data.toy.num_train": Key(10_000, "toy training images", int_at_least(1), optional=True, **_RUN),
    "data.toy.num_val": Key(500, "toy validation images", int_at_least(1), optional=True, **_RUN),
    "data.toy.num_test": Key(500, "toy test images", int_at_least(1), optional=True, **_RUN),
    "data.toy.seed": Key(0, "the toy world's seed", int_at_least(0), optional=True, **_RUN),
    # The run.
    "eval_after_training": Key(False, "run config.evals on the final checkpoint", **_RUN),
    "total_steps": Key(20_000, "", (*int_at_least(1), "the step training ends at"), **_RUN),
    "batch_size": Key(180, "global: split over every device of mesh.data", int_at_least(1)),
    "seed": Key(0, "parameters, data order and the concat trick", int_at_least(0)),
    "log_every_steps": Key(50, "", int_at_least(1), **_RUN),
    "checkpoint_every_steps": Key(1000, "", int_at_least(1), **_RUN),
    "keep_checkpoints": Key(3, "the newest checkpoints kept", (*int_at_least(1), "0 would keep no checkpoint: "
                            "the trained model would be thrown away"), **_RUN),
    "best_metric": Key("t2i_R@1", "the validation metric whose best step is kept in checkpoints/best/ "
                       "(FROMAGe keeps the best t2i R@1); \"\" = none", **_RUN),
    "eval_every_steps": Key(1000, "the periodic validation's cadence", int_at_least(1), **_RUN),
    "max_nonfinite_steps": Key(20, "stop after this many consecutive non-finite steps", int_at_least(1), **_RUN),
    "tensorboard": Key(True, "TensorBoard event files in WORKDIR", **_RUN),
    "wandb.project": Key("", "Weights & Biases: \"\" = off (pip install -e '.[wandb]')", **_RUN),
    "wandb.entity": Key("", "", **_RUN),
    "wandb.name": Key("", "", **_RUN),
    "mesh.data": Key(-1, "devices along the batch; -1 = all the rest", **_RUN),
    "mesh.model": Key(1, "devices along the model axis", **_RUN),
}


def _term_keys() -> dict[str, Key]:
  """The optional loss terms' keys (bridgejax/terms/): a weight each, off at 0, and their sections'."""
  out = {}
  for name, term in terms.REGISTRY.items():
    out[f"loss.{name}"] = Key(0.0, f"the {name} term's weight (bridgejax/terms/)", at_least(0))
    for key, default in term.keys.items():
      choices = one_of(*default) if isinstance(default, tuple) else None
      out.setdefault(f"{term.section}.{key}", Key(term.defaults()[key], f"a key of the {name} term", choices))
  return out


def declared() -> dict[str, Key]:
  """Every declared key: KEYS and the optional terms' (read from the terms registry on each call, so a
  term file added to bridgejax/terms/ is in the next config built)."""
  return {**KEYS, **_term_keys()}

# Keys below a registry's sections: '*' stands for any name (a task of config.evals, a group).
PATTERNS: dict[str, Key] = {  # evals.*: the task types' keys and defaults are bridgejax.evaluation.evaluators'
    **{f"evals.*.{k}": Key(None, "", rule, resume=True) for k, rule in {
        "type": _type_rule(""), "protocol": _type_rule(""), "data": _type_rule(""), "split": _type_rule(""),
        "image_resize": one_of(*RESIZES), "batch_size": int_at_least(1),
        "max_examples": (*int_at_least(0), "0 = the whole split"), "num_workers": int_at_least(0),
        "report_examples": int_at_least(0), "progress": _type_rule(True), "max_new_tokens": int_at_least(1),
        "num_beams": int_at_least(1), "captions_per_image": int_at_least(1), "chunk_size": int_at_least(1),
        "rounds_per_step": int_at_least(1), "max_dialog_tokens": int_at_least(1),
    }.items()},
    "optim.groups.*.lr": Key(None, "", at_least(0, strict=True)),
    "optim.groups.*.schedule": Key(None, "", one_of(*SCHEDULES)),
    "optim.groups.*.warmup_steps": Key(None, "", int_at_least(0)),
    "optim.groups.*.decay_steps": Key(None, "", int_at_least(1)),
    "optim.groups.*.final_lr_fraction": Key(None, "", between(0, 1)),
    "optim.groups.*.init_lr_fraction": Key(None, "", between(0, 1)),
    "optim.groups.*.weight_decay": Key(None, "", at_least(0)),
    "optim.groups.*.eps": Key(None, "", at_least(0)),
    "optim.groups.*.b1": Key(None, "", between(0, 1, high_open=True)),
    "optim.groups.*.b2": Key(None, "", between(0, 1, high_open=True)),
}
# Whole sections a resumed run may change ("eval." is the section of configs saved before config.evals).
HARMLESS_SECTIONS = ("evals.", "eval.", "mesh.", "wandb.")


def default_config() -> ml_collections.ConfigDict:
  """The recipe every experiment starts from: each key at its default (config.evals, declared by the
  evaluators, is configs/base.py's to add). The bridge's own keys are FROMAGe's (cls_linear, k=1, the
  post-LayerNorm CLS of the last layer)."""
  tree: dict = {}
  for dotted, key in declared().items():
    if key.optional:
      continue
    *sections, leaf = dotted.split(".")
    node = tree
    for section in sections:
      node = node.setdefault(section, {})
    node[leaf] = key.default
  tree["bridge"].update(k=1, layer=-1, post_norm=True)
  return ml_collections.ConfigDict(tree)


def complete(config):
  """Fills each declared key (not the optional ones) that `config` lacks with its default, in place, and
  returns it: a run's config.json saved before a key existed ran as its default did, so code reads
  every key plainly. Present values and undeclared keys (a bridge's own, config.evals) stay as they
  are. A ConfigDict (locked or not) or a plain dict of dicts, as read from JSON."""
  def fill():
    for dotted, key in declared().items():
      if key.optional:
        continue
      *sections, leaf = dotted.split(".")
      node = config
      for section in sections:
        if section not in node:
          node[section] = {}
        node = node[section]
        if not hasattr(node, "items"):  # a value where the schema has a section: left to problems()
          break
      else:
        if leaf not in node:
          node[leaf] = copy.deepcopy(key.default)
  if isinstance(config, ml_collections.ConfigDict):
    with config.unlocked():
      fill()
  else:
    fill()
  return config


def harmless(dotted: str) -> bool:
  """Whether a resumed run may change the key `dotted` (a key no longer declared is not)."""
  key = declared().get(dotted)
  return dotted.startswith(HARMLESS_SECTIONS) or (key is not None and key.resume)


def _lookup(config, dotted: str):
  """[(key, value)] of `dotted` in config ('*' matches every child); [] where a key is absent."""
  found = [("", config)]
  for part in dotted.split("."):
    nxt = []
    for prefix, node in found:
      if not hasattr(node, "items"):
        continue
      children = list(node.items()) if part == "*" else [(part, node[part])] if part in node else []
      nxt += [(f"{prefix}{key}.", value) for key, value in children]
    found = nxt
  return [(key[:-1], value) for key, value in found]


def problems(config) -> list[str]:
  """One phrase per config value of the wrong type or out of its range."""
  out = []
  for dotted, key in {**declared(), **PATTERNS}.items():
    rule = key.rule or _type_rule(key.default)
    if rule is None:
      continue
    test, must, why = (*rule, "")[:3]
    for name, value in _lookup(config, dotted):
      if not test(value):
        out.append(f"--config.{name}={value!r} must be {must}" + (f" ({why})" if why else ""))
  return out


def check_config_values(config) -> None:
  """Raises UserError naming every value of the wrong type or out of range, before anything loads."""
  found = problems(config)
  if found:
    raise UserError("; ".join(found))


def _cell(text: str) -> str:
  return text.replace("|", "\\|")


def markdown() -> str:
  """The reference table of every key (docs/configuration.md holds it; a test keeps them equal)."""
  rows = ["| key | default | must be | resume | what it is |", "|---|---|---|---|---|"]
  for dotted, key in {**declared(), **PATTERNS}.items():
    rule = key.rule or _type_rule(key.default)
    must = (rule[1] + (f" ({rule[2]})" if len(rule) > 2 else "")) if rule else ""
    default = "" if key.default is None else f"`{key.default!r}`"
    doc = key.doc + (" (optional: set by a config that needs it)" if key.optional else "")
    rows.append(f"| `{dotted}` | {_cell(default)} | {_cell(must)} | {'may change' if harmless(dotted) else 'fixed'} "
                f"| {_cell(doc)} |")
  rows.append("| `evals.*.…` | | | may change | each task type's keys and defaults: bridgejax/evaluation/evaluators/ |")
  return "\n".join(rows) + "\n"


if __name__ == "__main__":
  sys.stdout.write(markdown())
