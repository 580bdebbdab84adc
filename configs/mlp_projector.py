"""LLaVA-1.5's projector as the bridge: the 256 patch tokens of layer L-1 (CLS dropped) through
Linear(D, E), GELU, Linear(E, E), one LLM token per patch (bridgejax/bridges/projector.py).

    python train.py --config configs/mlp_projector.py --workdir DIR --config.data.dir=data/cc3m

Not a thesis experiment: 6.3M bridge parameters at ViT-L/14 + Gemma-2B (7.1M with the retrieval
heads). W_i reads the mean of the patch tokens (retrieval_feature="mean"); `layer=-1` reads layer L.
"""

from configs import base


def get_config(arg=None):
  args = base.parse_arg(arg, layer=-2, post_norm=False, num_heads=4, retrieval_feature="mean", eval="standard")
  return base.bridge_config("mlp_projector", **args)
