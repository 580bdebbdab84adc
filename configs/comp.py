"""Thesis tables 6.19-6.24: the multi-CLS bridge 'comp' (equation and choices in bridgejax/bridges/cls.py).

    python train.py --config configs/comp.py --workdir DIR --config.data.dir=data/cc3m
"""

from configs import base


def get_config(arg=None):
  return base.bridge_config("comp", **base.parse_arg(arg, eval="standard"))
