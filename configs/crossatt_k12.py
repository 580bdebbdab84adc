"""The thesis's best model: cross-attention with k=12 queries over the tokens of layer L-1
(MSCOCO BLEU-4 10.81, CIDEr 46.96 in the thesis).

    python train.py --config configs/crossatt_k12.py --workdir DIR --config.data.dir=data/cc3m
"""

from configs import base, crossatt


def get_config(arg=None):
  args = base.parse_arg(arg, eval="standard")
  config = crossatt.get_config(f"layer=-2,k=12,eval={args['eval']}")
  config.name = "crossatt_k12"
  return config
