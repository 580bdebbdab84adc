"""The eval tasks of a config, big_vision style: `config.evals` holds one dict per task, each with a
`type` (which runner reads it) and its own keys; which prepared split each reads is said here, once,
for both the config checks (before anything loads) and evaluation (when it runs).

    config.evals = {"caption": eval_task("caption", "thesis", data="data/coco2017"), ...}
    eval_tasks(config, "caption,vqa")   # {name: its dict}, checked: a known type, exactly its keys
    task_data("vqa", cfg)               # (dataset dir, split), or RecordError listing the splits it has
    protocol_of(cfg)                    # "standard", "thesis", or "custom" once a protocol key changed

Every key is the task's own; nothing falls back to another task or to the training data, so an
override (`--config.evals.caption.max_new_tokens=16`) changes that task alone and an empty `data`
is an error. A protocol names the settings that make numbers comparable (split, image geometry,
decoding, scoring); the eval JSON records which one a task's numbers follow.
"""

from __future__ import annotations

from bridgejax.data.records import RecordError, load_info
from bridgejax.errors import UserError

# type -> the kind of prepared split it reads; bridgejax.evaluation.tasks.TASKS runs the same names.
TASK_TYPES = {"caption": "image_text", "retrieval": "image_text", "vqa": "vqa", "visdial": "visdial",
              "compose": "compose"}
THESIS_TASKS = ("caption", "retrieval", "vqa", "visdial")  # what every config evaluates (configs/base.py)

# Every key of an eval task's dict, with its default: the keys all types share, then each type's.
COMMON_KEYS = {
    "type": "",
    "protocol": "standard",  # the protocol this dict was made for; the JSON says "custom" if it was changed
    "data": "",  # a prepared dataset folder (python -m bridgejax.data.prepare ...); required
    "split": "",
    "image_resize": "clip",  # "clip": short side + centre crop (FROMAGe's transform); "squash": no crop
    "batch_size": 64,  # rounded up to a multiple of mesh.data
    "max_examples": 0,  # 0 = the whole split
    "num_workers": 0,  # processes decoding eval images
    "report_examples": 16,  # examples shown in eval/report.html
    "progress": True,  # a progress bar
}
TASK_KEYS = {
    "caption": {
        "max_new_tokens": 32,
        "num_beams": 1,  # 1 = greedy
        "caption_prompt": "",  # FROMAGe optionally prompts with "A picture of"
        "cut_rule": "fromage",  # captioning.cut_caption: "fromage" (its code) or "first" (the papers' wording)
    },
    "retrieval": {
        "captions_per_image": 5,  # texts per image (COCO 5k: 25k captions)
        "chunk_size": 1024,  # queries per similarity block
    },
    "vqa": {
        "max_new_tokens": 10,  # answers are cut to the longest human answer's word count anyway
        "processing": "official",  # or "legacy" (the VQA script before its 2021 fix; LAVIS)
    },
    "visdial": {
        "with_caption": False,  # FROMAGe's code leaves the caption out of both IT2T and T2I texts
        # "next_token": each candidate's summed next-token CE after "...A:"; "fromage": FROMAGe's
        # eval_visdial_generation.py (BOS before every answer, logits[t] scored against label[t]).
        "scoring": "next_token",
        "rounds_per_step": 2,  # IT2T rounds scored per step (x 100 candidates each)
        "max_dialog_tokens": 512,  # T2I dialog text cap (longer dialogs lose their last rounds; counted)
        "chunk_size": 1024,
    },
    "compose": {  # composed image retrieval (Pic2Word's task): R@k of each query's target in the gallery
        "chunk_size": 1024,  # queries per similarity block
    },
}

# The protocol-defining keys of each protocol and type. "standard": COCO Karpathy test (5k images),
# FROMAGe's crop, greedy, 32 tokens; VQAv2 val; VisDial v1.0 val. "thesis": the thesis's fork,
# which captioned and retrieved on the 5,000 images of COCO val2017 squashed to 224x224; its VisDial
# follows FROMAGe's protocol (thesis §5.5.3): eval_visdial_generation.py's scoring on images squashed
# to 224x224; it states nothing else for VQA, which follows the standard protocol.
_STANDARD = {
    "caption": {"split": "test", "image_resize": "clip", "max_examples": 0, "num_beams": 1, "max_new_tokens": 32,
                "cut_rule": "fromage", "caption_prompt": ""},
    "retrieval": {"split": "test", "image_resize": "clip", "max_examples": 0, "captions_per_image": 5},
    "vqa": {"split": "val", "image_resize": "clip", "max_examples": 0, "max_new_tokens": 10, "processing": "official"},
    "visdial": {"split": "val", "image_resize": "clip", "max_examples": 0, "with_caption": False,
                "scoring": "next_token"},
    "compose": {"split": "compose_test", "image_resize": "clip", "max_examples": 0},  # the toy world's benchmark
}
_COCO_VAL2017_SQUASHED = {"split": "val2017", "image_resize": "squash"}
PROTOCOLS = {
    "standard": _STANDARD,
    "thesis": {**_STANDARD, "caption": {**_STANDARD["caption"], **_COCO_VAL2017_SQUASHED},
               "retrieval": {**_STANDARD["retrieval"], **_COCO_VAL2017_SQUASHED},
               "visdial": {**_STANDARD["visdial"], "scoring": "fromage", "image_resize": "squash"}},
}
CUSTOM = "custom"


def _choices(what: str, value, known) -> None:
  if value not in known:
    raise UserError(f"{what}={value!r} is unknown; choose from {sorted(known)}")


def eval_task(task_type: str, protocol: str = "standard", **keys) -> dict:
  """One entry of config.evals: the type's keys at their defaults, the protocol's values, then `keys`."""
  _choices("eval task type", task_type, TASK_TYPES)
  _choices("config argument eval", protocol, PROTOCOLS)
  out = {**COMMON_KEYS, **TASK_KEYS[task_type], **PROTOCOLS[protocol][task_type], "type": task_type,
         "protocol": protocol}
  unknown = sorted(set(keys) - set(out))
  if unknown:
    raise UserError(f"eval task type {task_type!r} has no key(s) {unknown}; its keys: {sorted(out)}")
  return {**out, **keys}


def eval_tasks(config, names=None) -> dict:
  """config.evals, or its entries `names` (a comma-separated string or a list), each checked: a
  known type and exactly that type's keys. {name: its ConfigDict}, in config order."""
  evals = config.get("evals") or {}
  wanted = list(evals) if names is None else [
      t.strip() for t in (names.split(",") if isinstance(names, str) else names) if t.strip()]
  unknown = [t for t in wanted if t not in evals]
  if unknown or not wanted:
    raise UserError(f"unknown eval task(s) {unknown or wanted!r}; config.evals has {list(evals)} "
                     "(eval.py --tasks=NAME,...)")
  out = {}
  for name in dict.fromkeys(wanted):
    cfg = evals[name]
    _choices(f"--config.evals.{name}.type", cfg.get("type"), TASK_TYPES)
    want = set(COMMON_KEYS) | set(TASK_KEYS[cfg.type])
    missing, extra = sorted(want - set(cfg)), sorted(set(cfg) - want)
    if missing or extra:
      raise UserError(f"--config.evals.{name} (type {cfg.type!r}) " + (f"lacks {missing}" if missing else "")
                       + (" and " if missing and extra else "") + (f"has unknown key(s) {extra}" if extra else "")
                       + "; build it with bridgejax.data.splits.eval_task")
    _choices(f"--config.evals.{name}.protocol", cfg.protocol, set(PROTOCOLS) | {CUSTOM})
    out[name] = cfg
  return out


def protocol_of(cfg) -> str:
  """The task's declared protocol while its protocol-defining keys still hold that protocol's
  values, else "custom" (a changed split, geometry, decoding, scoring or a subset of the split)."""
  defining = PROTOCOLS.get(cfg.protocol, {}).get(cfg.type)
  if defining is None or any(cfg[k] != v for k, v in defining.items()):
    return CUSTOM
  return cfg.protocol


def task_data(name: str, cfg) -> tuple[str, str]:
  """(dataset dir, split) of the eval task `name`: its `data` and `split`, a split of its type's
  kind. Errors name the key and list the splits the directory has."""
  kind = TASK_TYPES[cfg.type]
  if not cfg.data:
    raise UserError(f"--config.evals.{name}.data is empty; set it to a prepared dataset folder "
                     "(python -m bridgejax.data.prepare ...)")
  info = load_info(cfg.data)["splits"]
  if cfg.split in info and info[cfg.split]["kind"] == kind:
    return cfg.data, cfg.split
  have = ", ".join(f"{n} ({s['kind']})" for n, s in sorted(info.items()))
  raise RecordError(f"{cfg.data} has no {kind} split named {cfg.split!r}; it has: {have}. Set "
                    f"--config.evals.{name}.split=NAME (or prepare the split with python -m bridgejax.data.prepare)")
