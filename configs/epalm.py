"""eP-ALM as the bridge, as the authors' code runs it (github.com/mshukor/eP-ALM; bridgejax/bridges/epalm.py):
the CLS tokens of CLIP's last 6 layers through the tower's final LayerNorm, one Linear(D, E) each, set as
the hidden state of one slot token at EVERY layer of a window from 60% of Gemma's depth to one layer
before the last ([10, 17) of 18: CLS 0-5 one layer each, the last one twice; OPT-2.7B's [19, 31) of 32
in the authors' runs), the slot's query seeing the whole caption; a 10-token soft prompt through an MLP.

    python train.py --config configs/epalm.py --workdir DIR --config.data.dir=data/cc3m
    python train.py --config configs/epalm.py:injection=text ...   # the paper's text: this config before issue 26
    python train.py --config configs/epalm.py:inject_layers=12 ...   # the window as a count of layers, not a fraction
    python train.py --config configs/epalm.py:recipe=paper ...   # the authors' optimiser
    python train.py --config configs/epalm.py:adapters=true,prompt_tokens=0 ...   # eP-ALM_ada

injection: "code" (default) the authors' models/opt.py: inject_from=0.6, skip_last=1, the slot re-set at
  every window layer, a non-causal slot, post-LayerNormed CLS. Note that with skip_last=1 the last layer
  reads, through the slot, the caption tokens after each token (the bridge's docstring).
  "text": the paper's text as this config ran it before: the last 12 layers, a new CLS every 2 layers
  (replacing the previous), a causal slot, raw CLS. A key given in the argument wins over either.
recipe: "base" (default) configs/base.py's. "paper": the authors' ePALM_caption.yaml as its optimiser
  groups read (optim/optim_factory.py l.111-117, scheduler_groups 0): AdamW (torch's betas, no clipping,
  weight decay 0.02); the connector (and the retrieval heads, which eP-ALM has not) warmed up from 1e-5
  to 2e-5 over 400 steps (their 4 warm-up "epochs" of 100 iterations), then cosine to 1e-6 by the last
  step; the soft prompt and the adapters at a fixed 1e-5 (optim.groups, bridgejax/train/optimizer.py).
  "released": what their scripts ran: optim_factory looks prompt_lr up at the yaml's top level, where
  ePALM_caption.yaml does not put it, so it falls to add_weight_decay (l.25-37, l.118-124): the biases
  (no weight decay) get that warm-up and cosine, every other parameter, prompt included, a fixed 2e-5
  with weight decay 0.02. Set total_steps before the recipe's decay: `decay_steps` = total_steps - 400.

Not a thesis experiment: 21.0M bridge parameters at ViT-L/14 + Gemma-2B (21.8M with the retrieval
heads; adapters add 37.8M), whichever injection. The concat trick works as for prefix bridges: each
image's CLS slot is its own column, so a joined pair injects each image's CLS at its own slot, and a
non-causal slot sees its own caption only.
"""

from bridgejax.errors import UserError
from configs import base

INJECTIONS = {
    "code": dict(inject_from=0.6, inject_layers=0, skip_last=1, reset_every_layer=True, causal_slot=False,
                 post_norm=True),
    "text": dict(inject_from=0.0, inject_layers=12, skip_last=0, reset_every_layer=False, causal_slot=True,
                 post_norm=False),
}
RECIPES = ("base", "paper", "released")
WARMUP = 400  # the authors' 4 warm-up steps of the scheduler, 100 iterations each


def get_config(arg=None):
  args = base.parse_arg(arg, injection="code", recipe="base", num_cls=6, **INJECTIONS["code"], shared_projection=False,
                        prompt_tokens=10, prompt_mlp=True, adapters=False, adapter_reduction=8, eval="standard")
  injection, recipe = args.pop("injection"), args.pop("recipe")
  if injection not in INJECTIONS:
    raise UserError(f"config argument injection={injection!r} is unknown; choose from {sorted(INJECTIONS)}")
  if recipe not in RECIPES:
    raise UserError(f"config argument recipe={recipe!r} is unknown; choose from {list(RECIPES)}")
  given = {item.partition("=")[0] for item in filter(None, (arg or "").split(","))}
  args.update({key: value for key, value in INJECTIONS[injection].items() if key not in given})
  if "inject_layers" in given and "inject_from" not in given:  # the window as a count: no fraction
    args["inject_from"] = 0.0
  if "inject_from" in given and "inject_layers" not in given:
    args["inject_layers"] = 0
  config = base.bridge_config("epalm", **args)
  if recipe != "base":
    _authors_optim(config, recipe)
  return config


def _authors_optim(config, recipe: str) -> None:
  """configs/image/ePALM_caption.yaml: optimizer {adamW, lr 2e-5, weight_decay 0.02, prompt_lr 1e-5},
  schedular {cosine, scheduler_groups 0, warmup_lr 1e-5, min_lr 1e-6}; recipe in the module docstring."""
  scheduled = dict(lr=2e-5, init_lr_fraction=0.5, warmup_steps=WARMUP, schedule="cosine",
                   decay_steps=config.total_steps - WARMUP, final_lr_fraction=0.05)  # 2e-5 · 0.05 = 1e-6
  config.optim.update(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.02, grad_clip=0.0)
  if recipe == "paper":
    config.optim.update(scheduled)
    config.optim.groups = {"prompt_adapters": dict(params="prompt|adapter", lr=1e-5, schedule="constant",
                                                   warmup_steps=0)}
  else:
    config.optim.update(lr=2e-5, warmup_steps=0, schedule="constant")
    config.optim.groups = {"biases": dict(params="bias$", weight_decay=0.0, **scheduled)}
