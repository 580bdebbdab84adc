"""BLIP-2's Q-Former as the bridge (bridgejax/bridges/querying.py): learned queries through layers of
self-attention, cross-attention to every token of layer L-1 and an FFN, then Linear(H, E) into the
LLM's visual prefix.

    python train.py --config configs/qformer.py --workdir DIR --config.data.dir=data/cc3m
    python train.py --config configs/qformer.py:blip2 --workdir DIR ...   # BLIP-2's Q-Former, both stages

Default (this project's, not BLIP-2's): 32 queries at the vision width, 2 layers with cross-attention
in each, LayerNorm eps 1e-5, trained in one stage through the LLM with FROMAGe's losses: 35.7M bridge
parameters at ViT-L/14 + Gemma-2B (36.5M with the retrieval heads). It is the default because with no
BERT to start from and no stage 1, a small Q-Former learns faster through the LLM alone.

`blip2` (Li et al. 2023, and the lecture's two stages): width 768 (BERT-base's), 12 heads, 12 layers
with cross-attention in every 2nd (keys and values read the 1024-wide vision tokens), LayerNorm eps
1e-12, a Linear(768, E) to the LLM. Stage 1 (representation learning: the queries and a text branch
sharing self-attention, trained with ITC, ITM and ITG, no LLM) runs for `representation_share` of
total_steps in WORKDIR/representation, then stage 2 (the generative bridge, this project's losses)
starts from its checkpoint for the rest (config.init_from). BLIP-2 ran 250k stage-1 and 80k stage-2
steps (a share of 0.76); 0.5 here. The Q-Former starts from random weights (BLIP-2 starts from
BERT-base, which cannot be downloaded here). Stage 1's text branch reads the LLM's tokenizer: its
own word embeddings (V + 1 rows, the last the [DEC] token) and the ITG decoder tied to them.
`blip2,stage=representation` runs stage 1 alone; `representation_share=0` stage 2 alone.
"""

from configs import base

BLIP2 = dict(num_layers=12, cross_attention_every=2, num_heads=12, width=768, layer_norm_eps=1e-12)


def get_config(arg=None):
  args = base.parse_arg(arg, blip2=False, stage="generative", representation_share=0.5, k=32, num_layers=2,
                        cross_attention_every=1, num_heads=16, mlp_ratio=4, layer=-2, post_norm=False,
                        retrieval_feature="mean", width=0, layer_norm_eps=1e-5, eval="standard")
  blip2, stage, share = args.pop("blip2"), args.pop("stage"), args.pop("representation_share")
  if blip2:
    given = {item.partition("=")[0] for item in filter(None, (arg or "").split(","))}
    args.update({key: value for key, value in BLIP2.items() if key not in given})
  config = base.bridge_config("qformer", "blip2" if blip2 else None, **args)
  config.stage = stage
  config.representation_share = share if blip2 and stage == "generative" else 0.0
  return config
