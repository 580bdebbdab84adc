"""The FROMAGe / thesis recipe (REFERENCE.md "Training"); every experiment config starts here.

    python train.py --config configs/base.py --workdir DIR --config.vision.path=... --config.llm.path=...
"""

import math

import ml_collections


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.name = "base"

  # Frozen backbones: HF directories or bridgejax converted directories (python -m bridgejax.weights.convert).
  config.vision = ml_collections.ConfigDict({"path": "clip-vit-large-patch14"})
  config.llm = ml_collections.ConfigDict({"path": "gemma-2b-it", "tokenizer": ""})  # tokenizer "" = llm.path
  config.compute_dtype = "bfloat16"
  config.frozen_param_dtype = "bfloat16"  # trainable params and optimizer state stay float32
  config.frozen_sharding = "replicate"  # or "fsdp": frozen weights split over the whole mesh

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
      "train": "",  # a prepared array_record directory (python -m bridgejax.data.prepare ...)
      "val": "",
      "max_caption_tokens": 24,
      "num_workers": 8,
      "val_examples": 1000,  # the quick validation during training
  })

  config.eval = ml_collections.ConfigDict({
      "tasks": "caption,retrieval",  # comma-separated: caption, retrieval, vqa, visdial
      "data": "",  # a prepared directory with the eval splits ("" = the directory of data.val)
      "split": "val",
      "batch_size": 64,
      "max_new_tokens": 32,
      "caption_prompt": "",  # FROMAGe optionally prompts with "A picture of"
      "num_beams": 1,  # 1 = greedy
      "max_examples": 0,  # 0 = the whole split
      "report_examples": 16,  # examples shown in eval/report.html
  })

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
