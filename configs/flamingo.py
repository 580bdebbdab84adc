"""Flamingo as the bridge, as OpenFlamingo (open-flamingo 2.0.1) runs it: its Perceiver resampler (64
latents at the vision width, 6 layers of 8 heads of 64, no biases) read by tanh-gated cross-attention +
FFW blocks before the frozen Gemma layers l with (l + 1) % 4 == 0 (3, 7, 11, 15); each text token
attends to the latents of the most recent image at or before it; the resampler reads the tower's last
layer without its post-LayerNorm (post_norm=False: open_clip's output tokens as OpenFlamingo trained on
them); only one <image> token enters the sequence (bridgejax/bridges/flamingo.py). At initialisation the gates are 0 and the LLM's logits are
exactly the frozen LM's.

    python train.py --config configs/flamingo.py --workdir DIR --config.data.dir=data/cc3m
    python train.py --config configs/flamingo.py:cross_attention_every=1 ...   # a block before every layer
    python train.py --config configs/flamingo.py:media_attention=all_previous ...   # every earlier image too
    python train.py --config configs/flamingo.py:block_placement=first ...   # the earlier rule: layers 0, 4, ...

Not a thesis experiment: 209.9M bridge parameters at ViT-L/14 + Gemma-2B (210.6M with the retrieval
heads; 4 blocks of 36.7M, the resampler 63.0M), OpenFlamingo's modules 209.85M (the difference is the
<image> row). The concat trick works: a token cross-attends to the latents of the most recent image
before it, so in a joined pair the second caption reads the second image (Flamingo's image-causal
masking).
"""

from configs import base


def get_config(arg=None):
  args = base.parse_arg(arg, k=64, num_layers=6, num_heads=8, head_dim=64, mlp_ratio=4, layer=-1, post_norm=False,
                        retrieval_feature="mean", cross_attention_every=4, block_placement="openflamingo",
                        media_attention="immediate", xattn_heads=8, xattn_head_dim=64, ff_mult=4, eval="standard")
  return base.bridge_config("flamingo", **args)
