"""crossatt_k12 plus Target-CMLI (the CMLI report, eq. 5-10): the frozen vision tower is the teacher;
the bridge's 12 visual tokens and the captioning pass's caption-token states (the student: both
depend on the bridge, the latter through the frozen LLM, since they see the image) regress its
layer-L patch features with an MSE, each token against the patch it matches best in the CMLI space
(bridgejax.losses.target_cmli_loss; K = 12 != N = 256, so eq. 7's per-patch pairing does not apply).
CMLI's InfoNCE stays on (weight `cmli`) on the tower's patches (`cmli.image_tokens="tower"`) so that
the matching space is learned: it trains those heads, not the bridge; cmli=0 leaves the matching
space at its random initialisation.

Parameters: the CMLI heads (786,945) + two Linear(D, W) regression heads 2 · (2048 · 1024 + 1024)
= 4,196,352, so 4,983,297 more at CLIP ViT-L/14 + Gemma-2B.

    python train.py --config configs/target_cmli.py --workdir DIR --config.data.dir=data/cc3m
"""

from configs import base, crossatt_k12


def get_config(arg=None):
  args = base.parse_arg(arg, eval="standard", weight=1.0, cmli=1.0, chunk=20)
  config = crossatt_k12.get_config(f"eval={args['eval']}")
  config.name = "target_cmli"
  config.loss.target_cmli = args["weight"]
  config.loss.cmli = args["cmli"]
  config.cmli.chunk = args["chunk"]
  config.cmli.image_tokens = "tower"  # the matching space; the Target-CMLI terms train the bridge
  return config
