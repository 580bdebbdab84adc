"""The CMLI report's Target-CMLI term (eq. 5-10): the frozen tower is the teacher, and the student's
tokens regress the teacher's patches, each direction an L2 regression (losses.target_cmli_loss).

  i2t (eq. 7)  the bridge's visual tokens, through target_image_proj (D -> W), regress patch k for
               token k when K = N ("per_patch"), or each its best-matched patch ("matched";
               config.cmli.target_image "auto" picks by K)                                 trains it
  t2i (eq. 9)  caption token states, through target_text_proj (D -> W), regress their matched patch
               (config.cmli.target_text): "caption" (default) the captioning pass's, which see
               the image, so the bridge moves; "text" the text pass's (frozen: the head alone)
  total (eq. 10) their mean; config.cmli.target_directions="i2t" or "t2i" keeps one direction (an
               ablation: which direction moves the bridge where; the CMLI report trains both).
Matching is in the CMLI space (terms/cmli.py): D-wide students through cmli_text_proj, patches
through cmli_image_proj; the argmax carries no gradient. The teacher: the tower's layer-L patches
(post-LayerNorm, CLS left out).

Heads (ret/): target_image_proj and target_text_proj 2·(D·W + W), plus the CMLI space's
cmli_text_proj, cmli_image_proj and cmli_logit_scale (shared with the CMLI term when both are on).
"""

from __future__ import annotations

from bridgejax.errors import UserError
from bridgejax.terms.base import Head, LossTerm

TARGET_TEXT = ("caption", "text")
TARGET_IMAGE = ("auto", "per_patch", "matched")
TARGET_DIRECTIONS = ("both", "i2t", "t2i")
KEYS = {"dim": 256, "target_text": TARGET_TEXT, "target_image": TARGET_IMAGE, "target_directions": TARGET_DIRECTIONS}


def heads(options, dims):
  d, w = options["dim"], dims.vision_width
  return (Head("cmli_text_proj", "dense", d, "llm"), Head("cmli_logit_scale", "scalar", init=dims.logit_scale_init),
          Head("cmli_image_proj", "dense", d, "vision"), Head("target_image_proj", "dense", w, "llm"),
          Head("target_text_proj", "dense", w, "llm"))


def loss(model, params, states, options) -> dict:
  from bridgejax import losses  # lazy: jax; configs read this declaration before jax loads
  k, n = states.visual_tokens.shape[1], states.patches.shape[1]
  per_patch = options["target_image"] == "per_patch" or (options["target_image"] == "auto" and k == n)
  if per_patch and k != n:
    raise UserError(f"--config.cmli.target_image=per_patch (eq. 7) pairs visual token k with patch k, but the "
                    f"bridge gives {k} tokens for {n} patches: use 'matched' or 'auto'")
  student_text = states.caption_hidden if options["target_text"] == "caption" else states.text_hidden
  head = lambda name, x: model.head(params, name, x)
  image_match = None if per_patch else head("cmli_text_proj", states.visual_tokens)
  value, parts = losses.target_cmli_loss(
      head("target_image_proj", states.visual_tokens), states.patches, head("target_text_proj", student_text),
      states.caption_tokens, head("cmli_text_proj", student_text), head("cmli_image_proj", states.patches), image_match)
  value = {"both": value, "i2t": parts["loss_i2t"], "t2i": parts["loss_t2i"]}[options["target_directions"]]
  return {"target_cmli": value, "target_cmli_i2t": parts["loss_i2t"], "target_cmli_t2i": parts["loss_t2i"]}


def trains_bridge(options) -> dict[str, bool]:
  t2i = options["target_text"] == "caption"
  total = {"both": True, "i2t": True, "t2i": t2i}[options["target_directions"]]
  return {"target_cmli": total, "target_cmli_i2t": True, "target_cmli_t2i": t2i}


TERM = LossTerm(name="target_cmli", section="cmli", keys=KEYS, heads=heads, loss=loss, trains_bridge=trains_bridge,
                reads=("visual_tokens", "caption_hidden", "text_hidden", "caption_tokens", "patches", "tower:all"))
