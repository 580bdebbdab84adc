"""BLIP-2's Q-Former as the bridge: 32 learned queries through 2 layers of self-attention,
cross-attention to every token of layer L-1 and an FFN, then Linear(D, E) into 32 prefix tokens
(bridgejax/bridges/querying.py).

    python train.py --config configs/qformer.py --workdir DIR --config.data.dir=data/cc3m
    python train.py --config configs/qformer.py:num_layers=12,cross_attention_every=2 ...   # BLIP-2's depth

Not a thesis experiment: 35.7M bridge parameters at ViT-L/14 + Gemma-2B (36.5M with the retrieval
heads). W_i reads the mean of the 32 query outputs (retrieval_feature="mean").
"""

from configs import base


def get_config(arg=None):
  args = base.parse_arg(arg, k=32, num_layers=2, cross_attention_every=1, num_heads=16, mlp_ratio=4, layer=-2,
                        post_norm=False, retrieval_feature="mean", eval="standard")
  return base.bridge_config("qformer", **args)
