"""The FROMAGe / thesis recipe (docs/reference.md, "Training"); every experiment config starts here.

    python train.py --config configs/base.py --workdir DIR --config.vision.path=... --config.llm.path=...
"""

import ml_collections

from bridgejax.config_schema import default_config
from bridgejax.errors import UserError
from bridgejax.evaluation.evaluators import THESIS_TASKS, eval_task


def get_config(arg=None):
  """Every key at its default (bridgejax.config_schema declares each one: its default, the values it
  takes, whether a resumed run may change it; `python -m bridgejax.config_schema` prints them all).
  The recipe, FROMAGe's code unless said:
    - bridge: the post-LayerNorm CLS of layer L (pooler_output) -> Linear(d_v, d_llm * k), k = 1;
    - loss: 1.0 * CE_caption + 1.0 * CE_text + 1.0 * (InfoNCE_t2i + InfoNCE_i2t) / 2; the thesis's
      eq. 5.1, 0.5 * L_c + 0.5 * (L_i2t + L_t2i), is --config.loss.caption=0.5 --config.loss.text=0.0;
    - AdamW 3e-4, betas (0.9, 0.95), 100 warm-up steps then constant, clip 1.0, batch 180;
    - the concat trick with probability 0.5, [RET] row rescaled to the frozen rows' mean norm;
    - bfloat16 compute and frozen weights, float32 trainable weights and optimiser state.
  `eval=thesis` in the argument (configs/fromage.py:eval=thesis) gives config.evals the thesis's
  protocol instead of the standard one.
  """
  args = parse_arg(arg, eval="standard")
  config = default_config()
  # One dict per eval task, big_vision style (bridgejax.evaluation.evaluators has every key and default):
  #   --config.evals.caption.data=data/coco --config.evals.caption.max_new_tokens=16
  config.evals = ml_collections.ConfigDict({task: eval_task(task, args["eval"]) for task in THESIS_TASKS})
  return config


def parse_arg(arg, **defaults) -> dict:
  """big_vision-style config arguments: "layer=-2,k=8" -> {"layer": -2, "k": 8}, each value
  converted to the type of its default; a bare name sets a boolean key ("blip2" = "blip2=true");
  unknown keys are an error that lists the known ones."""
  values = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep and isinstance(defaults.get(key), bool):
      sep, value = "=", "true"
    if not sep or key not in defaults:
      raise UserError(f"config argument {item!r}: expected key=value with key in {sorted(defaults)}")
    kind = type(defaults[key])
    values[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
  return values


def bridge_config(name: str, experiment: str | None = None, **keys):
  """The base recipe with the bridge `name` and its keys: what each experiment file returns.
  `eval` among the keys (a config argument: configs/fromage.py:eval=thesis) picks the eval protocol."""
  config = get_config(f"eval={keys.pop('eval', 'standard')}")
  config.name = experiment or name
  config.bridge = ml_collections.ConfigDict({"name": name, **keys})
  return config
