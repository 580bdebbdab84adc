"""Thesis tables 7.1-7.6: the all-token bridge 'regions' (equation and choices in bridgejax/bridges/alltokens.py).

    python train.py --config configs/regions.py --workdir DIR --config.data.dir=data/cc3m
"""

from configs import base


def get_config(arg=None):
  del arg
  return base.bridge_config("regions")
