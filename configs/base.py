"""The FROMAGe / thesis recipe (docs/reference.md, "Training"); every experiment config starts here.

    python train.py --config configs/base.py --workdir DIR --config.vision.path=... --config.llm.path=...
"""

import math

import ml_collections

from bridgejax import terms as loss_terms
from bridgejax.evaluation.evaluators import THESIS_TASKS, eval_task
from bridgejax.errors import UserError


def get_config(arg=None):
  args = parse_arg(arg, eval="standard")
  config = ml_collections.ConfigDict()
  config.name = "base"

  # Frozen backbones: HF directories or bridgejax converted directories (python -m bridgejax.weights.convert).
  # `arch` names the architecture for `python -m bridgejax.param_count` when `path` does not exist yet.
  # cls_equivalent: what stands in for the CLS token on a tower without one (SigLIP): "mean" (the
  # patches' mean) or "pooled" (its attention-pool head); CLIP ignores it (bridgejax.bridges.base).
  config.vision = ml_collections.ConfigDict({"path": "clip-vit-large-patch14", "arch": "clip-vit-large-patch14",
                                             "cls_equivalent": "mean"})
  config.llm = ml_collections.ConfigDict({"path": "gemma-2b-it", "tokenizer": "", "arch": "gemma-2b"})  # tokenizer "" = llm.path
  config.compute_dtype = "bfloat16"
  config.frozen_param_dtype = "bfloat16"  # trainable params and optimizer state stay float32
  config.frozen_sharding = "replicate"  # or "fsdp": frozen weights split over the whole mesh
  # Memory against compute in the backward pass: "none", "llm" (recompute each frozen LLM layer),
  # "all" ("llm" + the LM head with its cross-entropy + the bridge). docs/performance.md has the trade-off.
  config.remat = "none"
  # "" = float32 compute runs its matmuls at full float32 precision on every backend; any
  # jax.default_matmul_precision name (e.g. "tensorfloat32") overrides it.
  config.matmul_precision = ""
  # "sqrt_d": visual tokens are multiplied by sqrt(d_llm) like text embeddings, as the thesis's
  # transformers-4.x stack did (bridgejax.model.VISUAL_TOKEN_SCALES); "none": added unscaled.
  config.visual_token_scale = "sqrt_d"

  # The bridge h (bridgejax.bridges: python -c "import bridgejax.bridges as b; print(b.describe())").
  # FROMAGe: the post-LayerNorm CLS of layer L (pooler_output) -> Linear(d_v, d_llm * k).
  config.bridge = ml_collections.ConfigDict({"name": "cls_linear", "k": 1, "layer": -1, "post_norm": True})

  # Retrieval: [RET] row, W_t / W_i into `embed_dim`, logit scale init log(1/0.07).
  config.ret = ml_collections.ConfigDict({
      "embed_dim": 256, "logit_scale_init": math.log(1 / 0.07),
      "rescale_row": True,  # FROMAGe: [RET] row back to the frozen rows' mean norm after each step
  })
  # Loss weights. FROMAGe's code: 1.0 * CE_caption + 1.0 * CE_text + 1.0 * (InfoNCE_t2i + InfoNCE_i2t) / 2.
  # The thesis' eq. 5.1, 0.5 * L_c + 0.5 * (L_i2t + L_t2i), is caption=0.5, text=0.0, contrastive=1.0:
  #   --config.loss.caption=0.5 --config.loss.text=0.0
  # The optional loss terms (bridgejax/terms/, one file each: cmli, target_cmli, pic2word) are off at
  # weight 0; each term's file declares its keys, which land in its section (config.cmli: dim, chunk,
  # image_tokens, target_text, target_image; config.pic2word: hidden, layers) with their defaults.
  config.loss = ml_collections.ConfigDict({"caption": 1.0, "text": 1.0, "contrastive": 1.0,
                                           **{name: 0.0 for name in loss_terms.names()}})
  for section, keys in loss_terms.sections().items():
    config[section] = ml_collections.ConfigDict(keys)
  # Token-type embeddings (bridgejax.heads.RetrievalHeads), off: through a LayerScale initialised at
  # 1e-5 on every LLM input.
  config.token_type_embeddings = False
  config.concat_prob = 0.5  # the concat trick's probability per step (batch_size must be even)
  # Two-stage training (BLIP-2, configs/qformer.py:blip2). stage "generative" (every config): the bridge
  # learns through the frozen LLM (the losses above). "representation": BLIP-2's stage 1, the Q-Former
  # alone with its text branch and the ITC, ITM and ITG losses (bridgejax.losses; qformer bridge only).
  # init_from: a run's workdir whose newest checkpoint starts the bridge (parameters of equal path and
  # shape; the rest start fresh). representation_share > 0: train.py first runs stage 1 for that share
  # of total_steps in WORKDIR/representation, then stage 2 from it for the rest, in one command.
  config.stage = "generative"
  config.init_from = ""
  config.representation_share = 0.0

  config.optim = ml_collections.ConfigDict({
      "lr": 3e-4, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.0, "grad_clip": 1.0,
      "warmup_steps": 100, "schedule": "constant", "decay_steps": 20_000, "final_lr_fraction": 0.0,
      "grad_accum_steps": 1,
      "init_lr_fraction": 0.0,  # the warm-up starts at lr * this (FROMAGe: 0)
      # Per-group settings (bridgejax/train/optimizer.py): {name: {"params": regex on "bridge/prompt_in/kernel"-style
      # paths, and any of lr, schedule, warmup_steps, ...}}; unmatched parameters keep the keys above.
      "groups": {},
  })

  config.data = ml_collections.ConfigDict({
      "dir": "",  # a prepared dataset directory (python -m bridgejax.data.prepare ...)
      "train_split": "train",
      "val_split": "val",  # "" = no periodic validation
      "max_caption_tokens": 24,  # BOS + caption + [RET]; a longer caption is cut and still ends in [RET]
      "num_workers": 8,  # processes decoding and preprocessing images (0 = in the training process)
      "val_examples": 1000,  # the quick validation during training
      "val_batch_size": 64,  # its batch size (rounded up to a multiple of mesh.data)
      # "clip": shortest side to the tower's size + centre crop (FROMAGe's transform); "squash": the
      # whole image resized to a square, as the thesis's fork fed COCO val2017 at evaluation.
      "image_resize": "clip",
      # Cached frozen features (python -m bridgejax.data.features): "" = off, read the images; "auto" =
      # DIR/features/TRAIN_SPLIT; or the cache's folder. Training then reads them and skips the tower.
      "features": "",
  })

  # One dict per eval task, big_vision style (bridgejax.evaluation.evaluators has every key and its default):
  #   --config.evals.caption.data=data/coco --config.evals.caption.max_new_tokens=16
  # eval.py runs every entry (--tasks=caption,vqa picks some). `eval=thesis` in a config's argument
  # (configs/fromage.py:eval=thesis) gives the thesis's protocol instead of the standard one.
  config.evals = evals(args["eval"])
  config.eval_after_training = False  # run config.evals on the final checkpoint (the demo does)

  config.total_steps = 20_000
  config.batch_size = 180  # global: split over every device of mesh.data
  config.seed = 0
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  # The validation metric whose best step is kept in checkpoints/best/ (eval.py --checkpoint best), as
  # FROMAGe's code keeps the best t2i R@1: t2i_R@1, i2t_R@1, R@1_mean, .._R@5 (maximised), caption_loss,
  # text_loss, contrastive_loss (minimised); "" = none. Needs data.val_split.
  config.best_metric = "t2i_R@1"
  config.eval_every_steps = 1000
  config.max_nonfinite_steps = 20  # stop after this many consecutive non-finite steps
  config.tensorboard = True
  # Weights & Biases (pip install -e '.[wandb]'): the metrics.jsonl metrics and the sample captions.
  # project "" = off; WANDB_MODE=offline keeps the run in WORKDIR/wandb for a later `wandb sync`.
  config.wandb = ml_collections.ConfigDict({"project": "", "entity": "", "name": ""})
  config.mesh = ml_collections.ConfigDict({"data": -1, "model": 1})  # -1: all remaining devices
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


def evals(protocol: str = "standard") -> ml_collections.ConfigDict:
  """config.evals for a protocol ("standard" or "thesis", bridgejax.evaluation.evaluators.protocols()): caption,
  retrieval, vqa and visdial, each its own dict. Each task's `data` is left for you to point at a
  prepared dataset (docs/evaluation.md)."""
  return ml_collections.ConfigDict({task: eval_task(task, protocol) for task in THESIS_TASKS})


def bridge_config(name: str, experiment: str | None = None, **keys):
  """The base recipe with the bridge `name` and its keys: what each experiment file returns.
  `eval` among the keys (a config argument: configs/fromage.py:eval=thesis) picks the eval protocol."""
  config = get_config(f"eval={keys.pop('eval', 'standard')}")
  config.name = experiment or name
  config.bridge = ml_collections.ConfigDict({"name": name, **keys})
  return config
