"""The FROMAGe / thesis recipe (docs/reference.md, "Training"); every experiment config starts here.

    python train.py --config configs/base.py --workdir DIR --config.vision.path=... --config.llm.path=...
"""

import math

import ml_collections


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.name = "base"

  # Frozen backbones: HF directories or bridgejax converted directories (python -m bridgejax.weights.convert).
  # `arch` names the architecture for `python -m bridgejax.inspect` when `path` does not exist yet.
  config.vision = ml_collections.ConfigDict({"path": "clip-vit-large-patch14", "arch": "clip-vit-large-patch14"})
  config.llm = ml_collections.ConfigDict({"path": "gemma-2b-it", "tokenizer": "", "arch": "gemma-2b"})  # tokenizer "" = llm.path
  config.compute_dtype = "bfloat16"
  config.frozen_param_dtype = "bfloat16"  # trainable params and optimizer state stay float32
  config.frozen_sharding = "replicate"  # or "fsdp": frozen weights split over the whole mesh
  # Memory against compute in the backward pass: "none", "llm" (recompute each frozen LLM layer),
  # "all" ("llm" + the LM head with its cross-entropy + the bridge). README "Performance" has the trade-off.
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
  config.loss = ml_collections.ConfigDict({"caption": 1.0, "text": 1.0, "contrastive": 1.0})
  config.concat_prob = 0.5  # the concat trick's probability per step (batch_size must be even)

  config.optim = ml_collections.ConfigDict({
      "lr": 3e-4, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "weight_decay": 0.0, "grad_clip": 1.0,
      "warmup_steps": 100, "schedule": "constant", "decay_steps": 20_000, "final_lr_fraction": 0.0,
      "grad_accum_steps": 1,
  })

  config.data = ml_collections.ConfigDict({
      "dir": "",  # a prepared dataset directory (python -m bridgejax.data.prepare ...)
      "train_split": "train",
      "val_split": "val",  # "" = no periodic validation
      "max_caption_tokens": 24,  # BOS + caption + [RET]; a longer caption is cut and still ends in [RET]
      "num_workers": 8,  # processes decoding and preprocessing images (0 = in the training process)
      "val_examples": 1000,  # the quick validation during training
      # "clip": shortest side to the tower's size + centre crop (FROMAGe's transform); "squash": the
      # whole image resized to a square, as the thesis's fork fed COCO val2017 at evaluation.
      "image_resize": "clip",
  })

  config.eval = ml_collections.ConfigDict({
      "tasks": "caption,retrieval",  # comma-separated: caption, retrieval, vqa, visdial
      "data": "",  # a prepared directory with the eval splits ("" = data.dir)
      "split": "val",
      "batch_size": 64,
      "max_new_tokens": 32,
      "caption_prompt": "",  # FROMAGe optionally prompts with "A picture of"
      "num_beams": 1,  # 1 = greedy
      "max_examples": 0,  # 0 = the whole split
      "report_examples": 16,  # examples shown in eval/report.html
      "cut_rule": "fromage",  # captioning.cut_caption: "fromage" (its code) or "first" (the papers' wording)
      "captions_per_image": 5,  # retrieval texts per image (COCO 5k test: 25k captions)
      "chunk_size": 1024,  # retrieval queries per similarity block
      "vqa_data": "",  # "" = eval.data
      "vqa_split": "",  # "" = eval.split, or vqa_<eval.split> if the directory has it (toy world)
      "vqa_max_new_tokens": 10,  # answers are cut to the longest human answer's word count anyway
      "vqa_processing": "official",  # or "legacy" (the VQA script before its 2021 fix; LAVIS)
      "visdial_data": "",  # "" = eval.data
      "visdial_split": "",  # "" = eval.split, or visdial_<eval.split> if the directory has it
      "visdial_caption": False,  # FROMAGe's code leaves the caption out of both IT2T and T2I texts
      "visdial_rounds_per_step": 2,  # IT2T rounds scored per step (x 100 candidates each)
      "max_dialog_tokens": 512,  # T2I dialog text cap (longer dialogs lose their last rounds; counted)
      "num_workers": 0,  # processes decoding eval images
      "image_resize": "",  # "" = data.image_resize; "squash" is the thesis fork's COCO eval geometry
      "progress": True,  # a progress bar per task
  })

  config.eval_after_training = False  # run config.eval.tasks on the final checkpoint (the demo does)

  config.total_steps = 20_000
  config.batch_size = 180  # global: split over every device of mesh.data
  config.seed = 0
  config.log_every_steps = 50
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  config.eval_every_steps = 1000
  config.max_nonfinite_steps = 20  # stop after this many consecutive non-finite steps
  config.tensorboard = True
  config.mesh = ml_collections.ConfigDict({"data": -1, "model": 1})  # -1: all remaining devices
  return config


def parse_arg(arg, **defaults) -> dict:
  """big_vision-style config arguments: "layer=-2,k=8" -> {"layer": -2, "k": 8}, each value
  converted to the type of its default; unknown keys are an error that lists the known ones."""
  values = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise ValueError(f"config argument {item!r}: expected key=value with key in {sorted(defaults)}")
    kind = type(defaults[key])
    values[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
  return values


def bridge_config(name: str, experiment: str | None = None, **keys):
  """The base recipe with the bridge `name` (and its keys): what each experiment file returns."""
  config = get_config()
  config.name = experiment or name
  config.bridge = ml_collections.ConfigDict({"name": name, **keys})
  return config
