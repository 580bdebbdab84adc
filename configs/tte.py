"""crossatt_k12 with token-type embeddings: one learned embedding for visual tokens and one for text
tokens, added to every LLM input through one shared per-dimension LayerScale initialised at 1e-5
(bridgejax.heads.RetrievalHeads; the TTE report, eq. 4-5, where it gave +0.6 ImageNet top-1 and
+0.3 MSCOCO retrieval over no TTE). 3 · 2048 = 6,144 more trainable parameters.

    python train.py --config configs/tte.py --workdir DIR --config.data.dir=data/cc3m
"""

from configs import base, crossatt_k12


def get_config(arg=None):
  args = base.parse_arg(arg, eval="standard")
  config = crossatt_k12.get_config(f"eval={args['eval']}")
  config.name = "tte"
  config.token_type_embeddings = True
  return config
