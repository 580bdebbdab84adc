"""The CMLI report's token-wise contrastive term (eq. 1-4; FILIP's cross-modal late interaction):
each image token is matched with its most similar text token and vice versa, the mean of those
maxima is the pair's similarity, and an InfoNCE over the global batch trains on it
(losses.cmli_contrastive_loss; config.cmli.chunk images are scored at a time, 0 = all).

Which states stand for the report's student tokens. FILIP trains both encoders with CMLI; here both
backbones are frozen and the bridge is what trains, so the term trains it only if its image side
depends on it (config.cmli.image_tokens):
  "bridge" (default)  the bridge's visual tokens, through cmli_visual_proj (D -> d)       trains it
  "llm"               the LLM's states at them in the captioning pass (they precede the
                      caption, so they see no text), through cmli_visual_proj             trains it
  "tower"             the frozen layer-L patches (post-LayerNorm, CLS left out, as FILIP's
                      last layer), through cmli_image_proj (W -> d): the heads alone learn,
                      the matching space of Target-CMLI (configs/target_cmli.py)          does not
The text side: the text pass's caption-token states (BOS, [RET] and padding out, as the report
leaves out CLS, EOS and PAD) through cmli_text_proj (D -> d), frozen functions of the caption.

Heads (ret/): cmli_text_proj D·d + d, cmli_logit_scale 1, and cmli_visual_proj D·d + d or
cmli_image_proj W·d + d. Axis legend: B batch, K visual tokens, T text, N patches, d config.cmli.dim.
"""

from __future__ import annotations

from bridgejax.terms.base import Head, LossTerm

IMAGE_TOKENS = ("bridge", "llm", "tower")
KEYS = {"dim": 256, "chunk": 0, "image_tokens": IMAGE_TOKENS}  # FILIP's d = 256


def heads(options, dims):
  d = options["dim"]
  image = (Head("cmli_image_proj", "dense", d, "vision") if options["image_tokens"] == "tower"
           else Head("cmli_visual_proj", "dense", d, "llm"))
  return (Head("cmli_text_proj", "dense", d, "llm"), Head("cmli_logit_scale", "scalar", init=dims.logit_scale_init),
          image)


def loss(model, params, states, options) -> dict:
  from bridgejax import losses  # lazy: jax; configs read this declaration before jax loads
  image = {"tower": ("cmli_image_proj", states.patches), "bridge": ("cmli_visual_proj", states.visual_tokens),
           "llm": ("cmli_visual_proj", states.visual_hidden)}[options["image_tokens"]]
  value, parts = losses.cmli_contrastive_loss(model.head(params, *image),
                                              model.head(params, "cmli_text_proj", states.text_hidden),
                                              model.head(params, "cmli_logit_scale"), text_mask=states.caption_tokens,
                                              chunk=options["chunk"])
  return {"cmli": value, "cmli_i2t": parts["loss_i2t"], "cmli_t2i": parts["loss_t2i"]}


def trains_bridge(options) -> dict[str, bool]:
  on_bridge = options["image_tokens"] != "tower"
  return {"cmli": on_bridge, "cmli_i2t": on_bridge, "cmli_t2i": on_bridge}


TERM = LossTerm(name="cmli", section="cmli", keys=KEYS, heads=heads, loss=loss, trains_bridge=trains_bridge,
                reads=("visual_tokens", "visual_hidden", "text_hidden", "caption_tokens", "patches", "tower:all"))
