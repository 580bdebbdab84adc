"""eP-ALM as the bridge: the CLS tokens of CLIP's last 6 layers, one Linear(D, E) each, injected into
the last 12 of Gemma's layers (a new one every 2 layers, replacing the previous), and a 10-token soft
prompt through an MLP (bridgejax/bridges/epalm.py).

    python train.py --config configs/epalm.py --workdir DIR --config.data.dir=data/cc3m
    python train.py --config configs/epalm.py:adapters=true,prompt_tokens=0 ...   # eP-ALM_ada

Not a thesis experiment: 21.0M bridge parameters at ViT-L/14 + Gemma-2B (21.8M with the retrieval
heads; adapters add 37.8M). The concat trick works as for prefix bridges: each image's CLS slot is
its own column, so a joined pair injects each image's CLS at its own slot.
"""

from configs import base


def get_config(arg=None):
  args = base.parse_arg(arg, num_cls=6, inject_layers=12, shared_projection=False, post_norm=False, prompt_tokens=10,
                        prompt_mlp=True, adapters=False, adapter_reduction=8, eval="standard")
  return base.bridge_config("epalm", **args)
