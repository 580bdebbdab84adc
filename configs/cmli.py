"""crossatt_k12 plus FILIP's cross-modal late interaction (CMLI) as a second InfoNCE term: the
bridge's 12 visual tokens (the student's image tokens: the tower is frozen, so the bridge is what
this term trains) and the text pass's caption-token states, each through a 256-d head, scored
token-wise (bridgejax.losses.cmli_contrastive_loss; the CMLI report, eq. 1-4). `image_tokens=llm`
scores the LLM's states at the visual tokens instead, `image_tokens=tower` the frozen patches
(heads only: the bridge gets no gradient from it).

The heads add 2·(D·256 + 256) + 1 = 1,049,089 parameters at CLIP ViT-L/14 + Gemma-2B
(tower: W·256 + 256 + D·256 + 256 + 1 = 786,945).
chunk=20 scores 20 images at a time against the global batch of 180: 88 MB of similarities in
float32 instead of 796 MB for all pairs at once (value and gradient compiled: 0.46 GB of
temporaries instead of 4.0 GB).

    python train.py --config configs/cmli.py --workdir DIR --config.data.dir=data/cc3m
"""

from configs import base, crossatt_k12


def get_config(arg=None):
  args = base.parse_arg(arg, eval="standard", weight=1.0, chunk=20, image_tokens="bridge")
  config = crossatt_k12.get_config(f"eval={args['eval']}")
  config.name = "cmli"
  config.loss.cmli = args["weight"]
  config.cmli.chunk = args["chunk"]
  config.cmli.image_tokens = args["image_tokens"]
  return config
