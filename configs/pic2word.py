"""crossatt_k12 plus Pic2Word's mapping network (bridgejax/pic2word.py): the image's CLS through a
2-layer ReLU MLP (width 512) becomes one pseudo word, trained contrastively with the text pass of
"a photo of *" against the image embedding; composed queries ("predict compose", the `compose`
eval task) then read "a photo of * , {modification}" [RET].

On crossatt_k12, the thesis's best bridge, so that composed retrieval is added to the strongest
captioner and retriever without changing either (f_M alone learns from its term), as tte.py and
cmli.py add their options. f_M adds W·512 + 512 + 512·512 + 512 + 512·D + D = 1,838,080 trainable
parameters at CLIP ViT-L/14 + Gemma-2B.

    python train.py --config configs/pic2word.py --workdir DIR --config.data.dir=data/cc3m
    python eval.py --config configs/pic2word.py --workdir DIR --tasks=compose --config.evals.compose.data=DIR
"""

import ml_collections

from bridgejax.evaluation.evaluators import eval_task
from configs import base, crossatt_k12


def get_config(arg=None):
  args = base.parse_arg(arg, eval="standard", weight=1.0, hidden=512, layers=2)
  config = crossatt_k12.get_config(f"eval={args['eval']}")
  config.name = "pic2word"
  config.loss.pic2word = args["weight"]
  config.pic2word = ml_collections.ConfigDict({"hidden": args["hidden"], "layers": args["layers"]})
  config.evals.compose = eval_task("compose", args["eval"])
  return config
