"""The thesis's best bridge (chapter 7: CrossAtt, k = 12 queries on layer L-1) on a SigLIP tower.

    python train.py --config configs/siglip_crossatt.py --config.vision.path=siglip-so400m-patch14-384 ...
    python train.py --config configs/siglip_crossatt.py:arch=siglip-base-patch16-224,k=4 ...

Not a thesis experiment: SigLIP replaces CLIP ViT-L/14. SigLIP has no CLS token, so the queries attend
to a stand-in plus the patches (bridges.base.CLS_EQUIVALENTS: `cls_equivalent=mean`, the patch mean, or
`pooled`, the attention-pool head's output at layer L); its images are squashed to the tower's square and
normalised with mean = std = 0.5 (data.image_resize="siglip", SiglipImageProcessor's preprocessing).
num_heads must divide the tower's width (so400m: 1152, base: 768; 4 does).
"""

from configs import base


def get_config(arg=None):
  args = base.parse_arg(arg, arch="siglip-so400m-patch14-384", layer=-2, k=12, num_heads=4, attention="equation",
                        cls_equivalent="mean", eval="standard")
  arch, cls_equivalent = args.pop("arch"), args.pop("cls_equivalent")
  config = base.bridge_config("crossatt", f"siglip_crossatt_layer{args['layer']}_k{args['k']}", **args)
  config.vision.path = config.vision.arch = arch
  config.vision.cls_equivalent = cls_equivalent
  config.data.image_resize = "siglip"
  return config
