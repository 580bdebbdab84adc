"""Pretrains the toy world's frozen backbones and saves them in Hugging Face format.

    python -m bridgejax.toy.pretrain [--out bridgejax/toy/assets] [--parts lm,clip] [--lm-steps N]
        [--clip-dense-steps N] [--clip-scene-steps N] [--clip-scene-batch N] [--clip-images N]

Writes, deterministically from fixed seeds and the toy world's train split:
  OUT/clip/    a tiny CLIP vision tower (CLIPVisionModel layout: config.json + model.safetensors):
               112 px images, patch 7, so a 16x16 grid and 257 tokens, the token geometry of
               ViT-L/14 at 224. Trained on per-patch shape attributes in windows around shapes,
               then on whole scenes with CLIP's symmetric InfoNCE against a small text tower and
               scene-attribute heads, all thrown away afterwards (pretrain_clip.py says why).
  OUT/gemma/   a tiny Gemma-architecture LM (GemmaForCausalLM layout) pretrained next-token on the
               toy language (captions, questions and answers, dialogs), the texts of one scene
               packed into each row so that it learns to continue in agreement with a prefix,
               with its byte-level BPE tokenizer (tokenizer.json).
Both load in transformers and through bridgejax.weights, like the real CLIP ViT-L/14 and Gemma-2B.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from bridgejax.losses import caption_loss
from bridgejax.models.gemma import Gemma, GemmaConfig
from bridgejax.toy import world
from bridgejax.toy.pretrain_clip import TOY_CLIP, pretrain_clip, render_pool, scene_targets

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")  # ids 0-3, Gemma's layout

def toy_lm_config(vocab_size: int) -> GemmaConfig:
  """Gemma 1 architecture (MQA, GeGLU, tied embeddings) at toy size."""
  return GemmaConfig(family="gemma", vocab_size=vocab_size, hidden_size=128, intermediate_size=512,
                     num_layers=4, num_heads=4, num_kv_heads=1, head_dim=32, query_pre_attn_scalar=32.0,
                     max_position_embeddings=512, bos_token_id=2, eos_token_ids=(1,), pad_token_id=0)


# --------------------------------------------------------------------------- the toy language


def corpus(num_examples: int, seed: int = 0, *, pic2word: bool = False) -> list[list[str]]:
  """The LM's rows of texts, each row about one train scene: its captions, questions and answers,
  and dialog rounds. No images.

  pic2word=True (`--pic2word-words`; not the shipped assets' recipe) adds Pic2Word's words: one
  "a photo of" caption per scene row, and per train index a row about a one-shape scene of its own
  said in the composed query's form ("a photo of a red circle , but blue") beside its captions and
  questions (world.composition_texts). The LM then reads "but" for colour and kind, but at one such
  row per scene row it also captions in that form: 259 of the demo's 500 captions said "a photo of",
  132 ", but", and its CIDEr fell from 1.19 to 0.82 (docs/toy_world.md)."""
  rows = []
  for ex in world.examples("train", num_examples, seed=seed, image=False, dialog_rounds=3):
    texts = (ex["captions"]
             + [f"Q: {q['question']}\nA: {q['multiple_choice_answer']}" for q in ex["questions"]]
             + [f"Q: {r['question']}\nA: {r['answer']}" for r in ex["dialog"]["rounds"]])
    if pic2word:
      scene = world.scene_of("train", ex["index"], seed)
      texts += world.pic2word_texts(world.rng_for("train", ex["index"], world.PHOTO, seed), scene)
    rows.append(texts)
  if pic2word:
    rows += [world.composition_texts("train", i, seed=seed) for i in range(num_examples)]
  return rows


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
  parser.add_argument("--clip-dense-steps", type=int, default=3600, help="toy CLIP phase 1: shape windows")
  parser.add_argument("--clip-scene-steps", type=int, default=640, help="toy CLIP phase 2: whole scenes")
  parser.add_argument("--clip-scene-batch", type=int, default=32)
  parser.add_argument("--lm-steps", type=int, default=2000)  # in-context use of a prefix appears at ~1-2k
  parser.add_argument("--num-images", type=int, default=4000, help="train scenes for the LM's corpus")
  parser.add_argument("--clip-images", type=int, default=8000, help="train images for the toy CLIP")
  parser.add_argument("--vocab-size", type=int, default=512)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--pic2word-words", action="store_true",
                      help="add Pic2Word's 'a photo of' and composed-query rows to the LM's corpus (not the shipped recipe)")
  args = parser.parse_args(argv)
  parts = {p.strip() for p in args.parts.split(",") if p.strip()}
  if not parts or parts - {"lm", "clip"}:
    parser.error(f"--parts takes lm, clip or lm,clip; got {args.parts!r}")
  from bridgejax.weights.clip import save_hf as save_clip
  from bridgejax.weights.gemma import save_hf as save_gemma

  scene_texts = corpus(args.num_images, args.seed, pic2word=args.pic2word_words)
  tokenizer = train_tokenizer(scene_texts, args.vocab_size)  # deterministic: both parts share it
  print(f"toy language: {sum(map(len, scene_texts))} texts, BPE vocabulary {tokenizer.get_vocab_size()}")
  summary_path = os.path.join(args.out, "pretrain_summary.json")
  summary = {}
  if os.path.exists(summary_path):  # rebuilding one part keeps the other's record
    with open(summary_path) as f:
      summary = json.load(f)
  common = {"num_images": args.num_images, "vocab_size": args.vocab_size, "seed": args.seed,
            **({"pic2word_words": True} if args.pic2word_words else {})}

  if "lm" in parts:
    start = time.time()
    lm_config, lm_params, lm_loss = pretrain_lm(scene_texts, tokenizer, steps=args.lm_steps, seed=args.seed)
    save_gemma(os.path.join(args.out, "gemma"), lm_config, lm_params)
    save_tokenizer(tokenizer, os.path.join(args.out, "gemma"))
    summary["lm"] = {"final_loss": lm_loss, "steps": args.lm_steps, "seconds": round(time.time() - start, 1), **common}

  if "clip" in parts:
    start = time.time()
    pixels, _ = render_pool("train", args.clip_images, args.seed)
    targets = scene_targets("train", args.clip_images, args.seed)
    captions = [ex["captions"] for ex in world.examples("train", args.clip_images, seed=args.seed, image=False,
                                                        num_questions=0, dialog_rounds=0)]
    ids, mask = encode_batch(tokenizer, [c for caps in captions for c in caps], 40)  # tokenised once
    ids, mask = (x.reshape(len(captions), -1, x.shape[-1]) for x in (ids, mask))
    clip_params, clip_losses = pretrain_clip(pixels, targets, ids, mask, tokenizer.get_vocab_size(),
                                             dense_steps=args.clip_dense_steps, scene_steps=args.clip_scene_steps,
                                             scene_batch=args.clip_scene_batch, seed=args.seed)
    save_clip(os.path.join(args.out, "clip"), TOY_CLIP, clip_params)
    summary["clip"] = {**clip_losses, "dense_steps": args.clip_dense_steps, "scene_steps": args.clip_scene_steps,
                       "scene_batch": args.clip_scene_batch,
                       "images": args.clip_images, "seconds": round(time.time() - start, 1), **common}

  os.makedirs(args.out, exist_ok=True)
  with open(summary_path, "w") as f:
    json.dump(summary, f, indent=2)
  print(json.dumps(summary, indent=2))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
