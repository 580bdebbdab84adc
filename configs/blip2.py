"""BLIP-2's Q-Former in both of its stages: configs/qformer.py:blip2 under its own name, so that the toy
ablation (python -m bridgejax.ablate, which runs every configs/*.py) has a row for it.

    python train.py --config configs/blip2.py --workdir DIR --config.data.dir=data/cc3m
"""

from configs import qformer


def get_config(arg=None):
  return qformer.get_config(",".join(filter(None, ["blip2", arg])))
