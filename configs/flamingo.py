"""Flamingo as the bridge: the Perceiver resampler's 64 latents (configs/resampler.py's) read by
tanh-gated cross-attention + FFW blocks before every 4th frozen Gemma layer; only one <image> token
enters the sequence (bridgejax/bridges/flamingo.py). At initialisation the gates are 0 and the LLM's
logits are exactly the frozen LM's.

    python train.py --config configs/flamingo.py --workdir DIR --config.data.dir=data/cc3m
    python train.py --config configs/flamingo.py:cross_attention_every=1 ...   # a block before every layer

Not a thesis experiment: 266.5M bridge parameters at ViT-L/14 + Gemma-2B (267.3M with the retrieval
heads; 5 blocks of 37.8M, the resampler 77.8M). The concat trick works: a token cross-attends to the
latents of the most recent image before it, so in a joined pair the second caption reads the
second image (Flamingo's image-causal masking).
"""

from configs import base


def get_config(arg=None):
  args = base.parse_arg(arg, k=64, num_layers=6, num_heads=8, mlp_ratio=4, layer=-1, post_norm=True,
                        retrieval_feature="mean", cross_attention_every=4, xattn_heads=8, xattn_head_dim=64,
                        ff_mult=4, eval="standard")
  return base.bridge_config("flamingo", **args)
