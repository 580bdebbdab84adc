"""crossatt_k12 plus Target-CMLI (the CMLI report, eq. 5-10): the frozen vision tower is the teacher;
the bridge's visual tokens and the text pass's caption-token states (the student) regress its
layer-L patch features with an MSE, each text token against the patch it matches best in the CMLI
space (bridgejax.losses.target_cmli_loss). CMLI's InfoNCE stays on (weight `cmli`) so that the
matching space is learned; cmli=0 leaves it at its random initialisation.

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
  return config
