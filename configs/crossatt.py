"""Thesis chapter 7: k learned queries cross-attend (4 heads) to every token of one ViT layer.

    python train.py --config configs/crossatt.py:layer=-1,k=4 ...   # table 7.1 (CrossAtt row)
    python train.py --config configs/crossatt.py:layer=-2,k=4 ...   # tables 7.7-7.12 (layer=-1..-4)
    python train.py --config configs/crossatt.py:layer=-1,k=8 ...   # tables 7.13-7.18 (k = 4, 8, 12, 16, 20)
    python train.py --config configs/crossatt.py:layer=-2,k=8 ...   # tables 7.19-7.24

attention="equation" is eq. 7.15-7.17 as written (no query or extra output projection); its
parameter count is the one that fits the thesis (bridgejax/bridges/crossatt.py). `attention=mha`
runs the torch nn.MultiheadAttention reading instead.
"""

from configs import base


def get_config(arg=None):
  args = base.parse_arg(arg, layer=-1, k=4, num_heads=4, attention="equation", eval="standard")
  return base.bridge_config("crossatt", f"crossatt_layer{args['layer']}_k{args['k']}", **args)
