"""Thesis tables 6.19-6.24: the multi-CLS bridge 'l2lx2' (equation and choices in bridgejax/bridges/cls.py).

    python train.py --config configs/l2lx2.py --workdir DIR --config.data.dir=data/cc3m
"""

from configs import base


def get_config(arg=None):
  return base.bridge_config("l2lx2", **base.parse_arg(arg, eval="standard"))
