"""Thesis tables 7.1-7.6: the all-token bridge 'wavg' (equation and choices in bridgejax/bridges/alltokens.py).

    python train.py --config configs/wavg.py --workdir DIR --config.data.dir=data/cc3m
"""

from configs import base


def get_config(arg=None):
  del arg
  return base.bridge_config("wavg")
