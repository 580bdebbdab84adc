"""Thesis chapter 5 (V-Glória, tables 5.3-5.5): FROMAGe with a European-Portuguese LLM.

    python train.py --config configs/vgloria.py:llm=gloria --config.llm.path=GlorIA-1.3B --config.data.dir=data/cc3m_ptpt ...
    python train.py --config configs/vgloria.py:llm=gervasio --config.llm.path=gervasio-7b-portuguese-ptpt-decoder ...

What section 5.3 states, and this config sets:
  * LLM, frozen: Glória 1.3B (GPT-Neo architecture, hub NOVA-vision-language/GlorIA-1.3B, d = 2048) or
    Gervásio 7B (LLaMA-2 7B fine-tuned for PT-PT, hub PORTULAN/gervasio-7b-portuguese-ptpt-decoder, d = 4096).
  * Vision, frozen: CLIP ViT-L/14; v(y) in R^m, m = 1024, "the [CLS] token embedding".
  * W_c: one linear layer v(y)^T W_c in R^d, i.e. one visual token (k = 1); W_i, W_t into q = 256.
  * Loss (eq. 5.1): 0.5 L_c + 0.5 (L_i2t + L_t2i), i.e. caption=0.5, no text-only CE, contrastive=1.0
    (bridgejax weighs the mean of the two InfoNCE directions).
  * Concatenated examples with probability 0.5; Adam, lr 3e-4, 100 warm-up steps, 2000 steps at batch 180
    ("1 epoch"); trained on CC3M PT-PT (2.7M pairs after filtering), evaluated on CC3M PT-PT, MSCOCO PT-PT and
    VisDial (zero-shot).
What it leaves open, kept at this repository's FROMAGe defaults (configs/base.py): which CLS (this reads
FROMAGe's pooler_output, the post-LayerNorm CLS of layer L; `post_norm=false` reads the raw one as the
chapter-6 fork did), Adam's betas/eps, gradient clipping, caption length, the compute dtype, and how visual
tokens are scaled (GPT-Neo and LLaMA have no embedding normaliser, so "sqrt_d" multiplies them by 1).
"""

from bridgejax.errors import UserError
from configs import base

LLMS = {  # llm= -> (llm.path default, param_count's arch name)
    "gloria": ("GlorIA-1.3B", "gloria-1.3b"),
    "gervasio": ("gervasio-7b-portuguese-ptpt-decoder", "gervasio-7b"),
}


def get_config(arg=None):
  args = base.parse_arg(arg, llm="gloria", post_norm=True, eval="standard")
  if args["llm"] not in LLMS:
    raise UserError(f"config argument llm={args['llm']!r}: use one of {sorted(LLMS)}")
  llm = args.pop("llm")
  config = base.bridge_config("cls_linear", f"vgloria_{llm}", k=1, layer=-1, **args)
  config.llm.path, config.llm.arch = LLMS[llm]
  config.loss.caption, config.loss.text, config.loss.contrastive = 0.5, 0.0, 1.0
  config.concat_prob = 0.5
  config.optim.lr, config.optim.warmup_steps = 3e-4, 100
  config.total_steps, config.batch_size = 2000, 180
  return config
