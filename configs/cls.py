"""Thesis chapter 6 (tables 6.1-6.18): the CLS of one ViT layer -> Linear to k LLM tokens.

    python train.py --config configs/cls.py:layer=-1,k=1 ...   # table 6.1-6.6, row L   (layer=-2,-3,-4: L-1..L-3)
    python train.py --config configs/cls.py:layer=-1,k=8 ...   # tables 6.7-6.12 (k = 1, 4, 8, 12, 16, 20)
    python train.py --config configs/cls.py:layer=-2,k=8 ...   # tables 6.13-6.18

The thesis's fork reads hidden_states[layer][:, 0] without CLIP's post-LayerNorm (post_norm=False,
the default here); post_norm=True with layer=-1 is FROMAGe's pooler_output.
"""

from configs import base


def get_config(arg=None):
  args = base.parse_arg(arg, layer=-1, k=1, post_norm=False, eval="standard")
  name = f"cls_layer{args['layer']}_k{args['k']}" + ("_postnorm" if args["post_norm"] else "")
  return base.bridge_config("cls_linear", name, **args)
