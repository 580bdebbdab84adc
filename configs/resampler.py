"""Flamingo's Perceiver resampler as the bridge: 64 latents through 6 layers that attend to
[patches; latents], then Linear(D, E) into 64 prefix tokens (bridgejax/bridges/querying.py).

    python train.py --config configs/resampler.py --workdir DIR --config.data.dir=data/cc3m
    python train.py --config configs/resampler.py:num_layers=2,k=32 ...   # a smaller resampler

Not a thesis experiment: 77.8M bridge parameters at ViT-L/14 + Gemma-2B (78.5M with the retrieval
heads). W_i reads the mean of the 64 latents (retrieval_feature="mean"); `retrieval_feature=attention_pool`
gives it a 1-query attention over the tokens instead.
"""

from configs import base


def get_config(arg=None):
  args = base.parse_arg(arg, k=64, num_layers=6, num_heads=8, mlp_ratio=4, layer=-1, post_norm=True,
                        retrieval_feature="mean", eval="standard")
  return base.bridge_config("perceiver_resampler", "resampler", **args)
