"""FROMAGe as released: the post-LayerNorm CLS of layer L (pooler_output) -> Linear to k=1 token.

    python train.py --config configs/fromage.py --workdir DIR --config.data.dir=data/cc3m
"""

from configs import base


def get_config(arg=None):
  return base.bridge_config("cls_linear", "fromage", k=1, layer=-1, post_norm=True, **base.parse_arg(arg, eval="standard"))
