"""Thesis tables 6.19-6.24: the multi-CLS bridge 'l2l' (equation and choices in bridgejax/bridges/cls.py).

    python train.py --config configs/l2l.py --workdir DIR --config.data.dir=data/cc3m
"""

from configs import base


def get_config(arg=None):
  return base.bridge_config("l2l", **base.parse_arg(arg, eval="standard"))
