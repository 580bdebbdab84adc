"""Pretrains the toy world's frozen backbones and saves them in Hugging Face format.

    python -m bridgejax.toy.pretrain [--out bridgejax/toy/assets] [--parts lm,clip] [--clip-steps N] [--lm-steps N]

Writes, deterministically from fixed seeds and the toy world's train split:
  OUT/clip/    a tiny CLIP vision tower (CLIPVisionModel layout: config.json + model.safetensors):
               112 px images, patch 7, so a 16x16 grid and 257 tokens, the token geometry of
               ViT-L/14 at 224. Trained contrastively (CLIP's symmetric InfoNCE) against a small
               text tower that is then thrown away, as the real CLIP's text tower is unused here.
  OUT/gemma/   a tiny Gemma-architecture LM (GemmaForCausalLM layout) pretrained next-token on the
               toy language (captions, questions and answers, dialogs), the texts of one scene
               packed into each row so that it learns to continue in agreement with a prefix,
               with its byte-level BPE tokenizer (tokenizer.json).
Both load in transformers and through bridgejax.weights, like the real CLIP ViT-L/14 and Gemma-2B.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
from tqdm import tqdm

from bridgejax.data.image import clip_preprocess
from bridgejax.losses import contrastive_loss, caption_loss
from bridgejax.models.clip import CLIPVisionConfig, CLIPVisionTransformer, EncoderLayer
from bridgejax.models.gemma import Gemma, GemmaConfig
from bridgejax.toy import world

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")  # ids 0-3, Gemma's layout

# Width 64 and 2 heads (not ViT-like 128/4): on a 2-core CPU the attention maps of 257 tokens
# dominate a step, and this size pretrains in minutes and keeps the demo's frozen forward cheap.
TOY_CLIP = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_layers=4, num_heads=2,
                            image_size=world.IMAGE_SIZE, patch_size=7)


def toy_lm_config(vocab_size: int) -> GemmaConfig:
  """Gemma 1 architecture (MQA, GeGLU, tied embeddings) at toy size."""
  return GemmaConfig(family="gemma", vocab_size=vocab_size, hidden_size=128, intermediate_size=512,
                     num_layers=4, num_heads=4, num_kv_heads=1, head_dim=32, query_pre_attn_scalar=32.0,
                     max_position_embeddings=512, bos_token_id=2, eos_token_ids=(1,), pad_token_id=0)


# --------------------------------------------------------------------------- the toy language


def corpus(num_examples: int, seed: int = 0) -> tuple[list[list[str]], list[list[str]]]:
  """(texts per image for the LM: captions, questions and answers, dialog rounds; captions per
  image) from the train split, no images."""
  scene_texts, image_captions = [], []
  for ex in world.examples("train", num_examples, seed=seed, image=False, dialog_rounds=3):
    image_captions.append(ex["captions"])
    scene_texts.append(ex["captions"]
                       + [f"Q: {q['question']}\nA: {q['multiple_choice_answer']}" for q in ex["questions"]]
                       + [f"Q: {r['question']}\nA: {r['answer']}" for r in ex["dialog"]["rounds"]])
  return scene_texts, image_captions


def pack_scenes(tokenizer, scene_texts, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Rows of `<bos> text <eos> <bos> text <eos> ...`, every text of a row about the same scene.

  Packing without a document mask, as real LMs are pretrained, teaches the toy LM what a real LLM
  brings to a bridge: text after a `<bos>` agrees with whatever came before it. A bridge's visual
  tokens sit before `<bos>` in the captioning pass, so this is the skill they rely on. A row of
  standalone texts would give a frozen LM no reason to read a prefix at all.
  """
  rng = np.random.default_rng(seed)
  rows: list[list[int]] = []
  for texts in scene_texts:
    row: list[int] = []
    for encoding in tokenizer.encode_batch([texts[i] for i in rng.permutation(len(texts))]):
      tokens = (encoding.ids + [1])[:length]  # the post-processor put <bos> first
      if len(row) + len(tokens) > length:
        rows.append(row)
        row = []
      row += tokens
    rows.append(row)
  ids = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    ids[i, :len(row)] = row
  return ids, (ids != 0).astype(np.int32)


def train_tokenizer(scene_texts: list[list[str]], vocab_size: int):
  """A byte-level BPE (lossless decoding) with Gemma's special-token ids and BOS prepended."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator([t for texts in scene_texts for t in texts], trainer)
  tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
  return tokenizer


def save_tokenizer(tokenizer, path: str) -> None:
  os.makedirs(path, exist_ok=True)
  tokenizer.save(os.path.join(path, "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
            "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
            "padding_side": "right", "model_max_length": 512}
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)


def encode_batch(tokenizer, texts, length: int, add_eos: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded (ids, mask) of <bos> text <eos>, truncated to `length`."""
  ids = np.zeros((len(texts), length), np.int32)
  for row, encoding in enumerate(tokenizer.encode_batch(list(texts))):
    tokens = (encoding.ids + [1] if add_eos else encoding.ids)[:length]
    ids[row, :len(tokens)] = tokens
  return ids, (ids != 0).astype(np.int32)


# --------------------------------------------------------------------------- the toy CLIP


class TextTower(nn.Module):
  """A small transformer text encoder for contrastive pretraining (discarded afterwards): token
  and position embeddings, CLIP encoder layers, the final-LayerNorm state of the last token."""

  vocab_size: int
  length: int
  width: int = 128
  layers: int = 2
  embed_dim: int = 128

  @nn.compact
  def __call__(self, ids, mask):  # (B, T) -> (B, E)
    c = CLIPVisionConfig(hidden_size=self.width, intermediate_size=4 * self.width, num_layers=self.layers,
                         num_heads=4, image_size=7, patch_size=7)  # only the layer sizes are used
    x = nn.Embed(self.vocab_size, self.width)(ids) + self.param(
        "pos_embed", nn.initializers.normal(0.01), (self.length, self.width))
    for i in range(self.layers):  # padding is attended to: harmless for this throwaway encoder
      x = EncoderLayer(c, name=f"layer_{i}")(x)
    x = nn.LayerNorm()(x)
    last = jnp.take_along_axis(x, (jnp.sum(mask, axis=1) - 1)[:, None, None], axis=1)[:, 0]
    return nn.Dense(self.embed_dim, use_bias=False)(last)


def render_pool(num_images: int, seed: int = 0) -> np.ndarray:
  """(N, 3, 112, 112) CLIP-normalised train images."""
  pixels = []
  for ex in tqdm(world.examples("train", num_images, seed=seed, num_questions=0, dialog_rounds=0),
                 total=num_images, desc="render toy images", leave=False):
    pixels.append(clip_preprocess(Image.open(io.BytesIO(ex["image"])), world.IMAGE_SIZE))
  return np.stack(pixels)


def pretrain_clip(pixels, captions, tokenizer, *, steps: int, batch_size: int = 64, lr: float = 1e-3,
                  seed: int = 0, text_length: int = 40):
  """Vision tower params (CLIPVisionModel layout, no projection) after contrastive training."""
  vision_cfg = dataclasses.replace(TOY_CLIP, projection_dim=128)
  vision = CLIPVisionTransformer(vision_cfg)
  text = TextTower(tokenizer.get_vocab_size(), text_length)
  rng = jax.random.key(seed)
  size = vision_cfg.image_size
  params = {"vision": vision.init(rng, jnp.zeros((1, 3, size, size)))["params"],
            "text": text.init(rng, jnp.zeros((1, text_length), jnp.int32), jnp.ones((1, text_length), jnp.int32))["params"],
            "logit_scale": jnp.asarray(np.log(1 / 0.07), jnp.float32)}
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 20, 1), steps, lr * 0.05)
  tx = optax.adamw(schedule, weight_decay=0.05)
  opt_state = tx.init(params)

  def loss_fn(params, images, ids, mask):
    img = vision.apply({"params": params["vision"]}, images).image_embeds
    txt = text.apply({"params": params["text"]}, ids, mask)
    loss, parts = contrastive_loss(img, txt, params["logit_scale"], max_scale=100.0)
    return loss, parts

  @jax.jit
  def step(params, opt_state, images, ids, mask):
    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, images, ids, mask)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, parts

  data_rng = np.random.default_rng(seed)
  progress = tqdm(range(steps), desc="pretrain toy CLIP")
  for i in progress:
    rows = data_rng.choice(len(pixels), batch_size, replace=False)  # distinct images: true negatives
    texts = [captions[r][data_rng.integers(len(captions[r]))] for r in rows]
    ids, mask = encode_batch(tokenizer, texts, text_length)
    params, opt_state, loss, parts = step(params, opt_state, pixels[rows], ids, mask)
    if i % 20 == 0 or i == steps - 1:
      progress.set_postfix(loss=f"{float(loss):.3f}", i2t_top1=f"{float(parts['i2t_top1']):.0f}%")
  vision_params = {k: v for k, v in params["vision"].items() if k != "visual_projection"}
  return vision_params, float(loss)


# --------------------------------------------------------------------------- the toy LM


def pretrain_lm(scene_texts, tokenizer, *, steps: int, batch_size: int = 32, lr: float = 3e-3, seed: int = 0,
                length: int = 96):
  config = toy_lm_config(tokenizer.get_vocab_size())
  model = Gemma(config)
  ids_all, mask_all = pack_scenes(tokenizer, scene_texts, length, seed)
  params = model.init(jax.random.key(seed), jnp.zeros((1, length), jnp.int32))["params"]
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 20, 1), steps, lr * 0.05)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, ids, mask):
    def loss_fn(params):
      logits = model.apply({"params": params}, ids, mask).logits
      return caption_loss(logits, ids, mask)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  data_rng = np.random.default_rng(seed)
  progress = tqdm(range(steps), desc="pretrain toy LM")
  for i in progress:
    rows = data_rng.integers(len(ids_all), size=batch_size)
    params, opt_state, loss = step(params, opt_state, ids_all[rows], mask_all[rows])
    if i % 50 == 0 or i == steps - 1:
      progress.set_postfix(loss=f"{float(loss):.3f}")
  return config, params, float(loss)


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default=ASSETS)
  parser.add_argument("--parts", default="lm,clip", help="which backbones to rebuild: lm, clip or both")
  parser.add_argument("--clip-steps", type=int, default=400)
  parser.add_argument("--lm-steps", type=int, default=2000)  # in-context use of a prefix appears at ~1-2k
  parser.add_argument("--num-images", type=int, default=4000)
  parser.add_argument("--vocab-size", type=int, default=512)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  parts = {p.strip() for p in args.parts.split(",") if p.strip()}
  if not parts or parts - {"lm", "clip"}:
    parser.error(f"--parts takes lm, clip or lm,clip; got {args.parts!r}")
  from bridgejax.weights.clip import save_hf as save_clip
  from bridgejax.weights.gemma import save_hf as save_gemma

  scene_texts, image_captions = corpus(args.num_images, args.seed)
  tokenizer = train_tokenizer(scene_texts, args.vocab_size)  # deterministic: both parts share it
  print(f"toy language: {sum(map(len, scene_texts))} texts, BPE vocabulary {tokenizer.get_vocab_size()}")
  summary_path = os.path.join(args.out, "pretrain_summary.json")
  summary = {}
  if os.path.exists(summary_path):  # rebuilding one part keeps the other's record
    with open(summary_path) as f:
      summary = json.load(f)
  common = {"num_images": args.num_images, "vocab_size": args.vocab_size, "seed": args.seed}

  if "lm" in parts:
    start = time.time()
    lm_config, lm_params, lm_loss = pretrain_lm(scene_texts, tokenizer, steps=args.lm_steps, seed=args.seed)
    save_gemma(os.path.join(args.out, "gemma"), lm_config, lm_params)
    save_tokenizer(tokenizer, os.path.join(args.out, "gemma"))
    summary["lm"] = {"final_loss": lm_loss, "steps": args.lm_steps, "seconds": round(time.time() - start, 1), **common}

  if "clip" in parts:
    start = time.time()
    pixels = render_pool(args.num_images, args.seed)
    clip_params, clip_loss = pretrain_clip(pixels, image_captions, tokenizer, steps=args.clip_steps, seed=args.seed)
    save_clip(os.path.join(args.out, "clip"), TOY_CLIP, clip_params)
    summary["clip"] = {"final_loss": clip_loss, "steps": args.clip_steps, "seconds": round(time.time() - start, 1),
                       **common}

  os.makedirs(args.out, exist_ok=True)
  with open(summary_path, "w") as f:
    json.dump(summary, f, indent=2)
  print(json.dumps(summary, indent=2))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
