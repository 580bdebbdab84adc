"""Thesis tables 7.1-7.6: the all-token bridge 'grouped' (equation and choices in bridgejax/bridges/alltokens.py).

    python train.py --config configs/grouped.py --workdir DIR --config.data.dir=data/cc3m
"""

from configs import base


def get_config(arg=None):
  del arg
  return base.bridge_config("grouped")
