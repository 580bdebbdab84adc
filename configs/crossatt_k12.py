"""The thesis's best model: cross-attention with k=12 queries over the tokens of layer L-1
(MSCOCO BLEU-4 10.81, CIDEr 46.96 in the thesis).

    python train.py --config configs/crossatt_k12.py --workdir DIR --config.data.dir=data/cc3m
"""

from configs import crossatt


def get_config(arg=None):
  del arg
  config = crossatt.get_config("layer=-2,k=12")
  config.name = "crossatt_k12"
  return config
