"""The shipped toy backbones load in transformers and through bridgejax.weights, with parity, and
they learned their world (the LM its language)."""

import os

import numpy as np
import torch
import transformers
from PIL import Image
import io

from bridgejax import weights
from bridgejax.data.image import clip_preprocess
from bridgejax.toy import world
from bridgejax.toy.scene import COLORS, IMAGE_SIZE, KINDS
from bridgejax.toy.pretrain import ASSETS

CLIP, GEMMA = os.path.join(ASSETS, "clip"), os.path.join(ASSETS, "gemma")


def _toy_images(n=4):
  return np.stack([clip_preprocess(Image.open(io.BytesIO(ex["image"])), IMAGE_SIZE)
                   for ex in world.examples("val", n, num_questions=0, dialog_rounds=0)])


def test_assets_are_small_hf_directories():
  for path in (CLIP, GEMMA):
    assert os.path.isfile(os.path.join(path, "config.json"))
    assert os.path.getsize(os.path.join(path, "model.safetensors")) < 5 * 2**20
  assert os.path.isfile(os.path.join(GEMMA, "tokenizer.json"))


def test_toy_clip_parity_with_transformers():
  pixels = _toy_images()
  reference = transformers.CLIPVisionModel.from_pretrained(CLIP).eval()
  with torch.no_grad():
    ref = reference(torch.from_numpy(pixels), output_hidden_states=True)
  ours = weights.load_vision_tower(CLIP)(pixels)
  assert ours.hidden_states[0].shape == (4, 257, 64)  # ViT-L/14's token geometry at toy width
  for a, b in zip(ours.hidden_states, ref.hidden_states):
    assert np.abs(np.asarray(a) - b.numpy()).max() <= 1e-4
  assert np.abs(np.asarray(ours.pooler_output) - ref.pooler_output.numpy()).max() <= 1e-4


def test_toy_gemma_parity_and_tokenizer_with_transformers():
  tok = weights.load_tokenizer(GEMMA)
  hf_tok = transformers.AutoTokenizer.from_pretrained(GEMMA)
  captions = [c for ex in world.examples("val", 4, num_questions=0, dialog_rounds=0, image=False)
              for c in ex["captions"][:1]]
  for caption in captions:
    assert tok.encode(caption) == hf_tok(caption)["input_ids"]
    assert tok.decode(tok.encode(caption)) == caption
  ids, mask = tok.batch_encode(captions, 40)
  reference = transformers.GemmaForCausalLM.from_pretrained(GEMMA).eval()
  with torch.no_grad():
    ref = reference(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).logits.numpy()
  ours = np.asarray(weights.load_language_model(GEMMA)(input_ids=ids, attention_mask=mask).logits)
  valid = mask.astype(bool)
  assert np.abs(ours[:, :, :ref.shape[-1]][valid] - ref[valid]).max() <= 1e-4


def test_toy_lm_speaks_the_toy_language():
  """Held-out captions are far more likely than under a uniform model, and greedy text is toy-like."""
  tok = weights.load_tokenizer(GEMMA)
  lm = weights.load_language_model(GEMMA)
  captions = [ex["captions"][0] for ex in world.examples("test", 16, image=False, num_questions=0, dialog_rounds=0)]
  ids, mask = tok.batch_encode(captions, 40)
  logits = np.asarray(lm(input_ids=ids, attention_mask=mask).logits, np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
  targets = ids[:, 1:]
  nll = -np.take_along_axis(logp[:, :-1], targets[..., None], -1)[..., 0]
  mean_nll = float((nll * mask[:, 1:]).sum() / mask[:, 1:].sum())
  assert mean_nll < 1.5 < np.log(tok.vocab_size)  # uniform would be log(512) = 6.2
  prompt, _ = tok.batch_encode(["a picture of a"], 8)
  out = lm.generate(prompt[:, :5], max_new_tokens=6)
  words = tok.decode(out[0]).split()
  vocabulary = set(" ".join(captions + list(COLORS) + list(KINDS)).split())
  assert words and sum(w in vocabulary for w in words) >= len(words) // 2, words


def test_toy_lm_reads_a_prefix_about_the_same_scene():
  """What a bridge relies on in a real LLM: text after <bos> agrees with what came before it. A
  caption is likelier after another caption of the same scene than after one of another scene
  (measured on these 64 test scenes: NLL 1.04 against 2.06)."""
  tok = weights.load_tokenizer(GEMMA)
  lm = weights.load_language_model(GEMMA)
  examples = list(world.examples("test", 64, image=False, num_questions=0, dialog_rounds=0))
  targets = [ex["captions"][1] for ex in examples]
  same = [ex["captions"][0] for ex in examples]

  def nll(prefixes):
    ids, mask = tok.batch_encode([p + "<eos><bos>" + t for p, t in zip(prefixes, targets)], 96)
    prefix_lengths = tok.batch_encode([p + "<eos><bos>" for p in prefixes], 96)[1].sum(1)
    logits = np.asarray(lm(input_ids=ids, attention_mask=mask).logits, np.float64)[:, :-1]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    scored = mask[:, 1:].astype(bool) & (np.arange(ids.shape[1] - 1)[None] >= prefix_lengths[:, None] - 1)
    return float(-np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0][scored].mean())

  matched, other = nll(same), nll(same[1:] + same[:1])
  assert matched < other - 0.5, (matched, other)
