"""KV-cache decoding: greedy equals transformers' generate on every tiny family, cached logits equal
a full recompute, embedding prompts and [RET] rows, stop tokens, sampling, beam search, compilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from bridgejax import generate as generation
from bridgejax.weights import load_language_model
from conftest import TINY_GEMMAS, make_tiny_gemma

PROMPTS = [[2, 17, 33, 5, 60, 71, 9], [2, 44, 12], [2, 80, 3, 91, 27]]  # lengths 7, 3, 5
NEW = 12  # prompt + new tokens run past the sliding windows (4)


def _right_padded(prompts, pad=0):
  width = max(map(len, prompts))
  ids = np.full((len(prompts), width), pad, np.int32)
  mask = np.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, :len(p)], mask[i, :len(p)] = p, 1
  return ids, mask


def _hf_generate(model, prompt=None, embeds=None, n=NEW, **kwargs):
  """transformers' new tokens for one unpadded prompt, padded to n with 0 after a stop."""
  with torch.no_grad():
    if embeds is not None:
      out = model.generate(inputs_embeds=torch.from_numpy(np.asarray(embeds)[None]), max_new_tokens=n,
                           do_sample=False, pad_token_id=0, **kwargs)[0]
    else:
      out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0,
                           **kwargs)[0, len(prompt):]
  return out.tolist() + [0] * (n - len(out))


@pytest.mark.parametrize("name", sorted(TINY_GEMMAS))
def test_greedy_equals_transformers_on_a_ragged_batch(name, tiny_gemmas):
  tiny = tiny_gemmas[name]
  lm = load_language_model(tiny.path)
  ids, mask = _right_padded(PROMPTS)
  ours = np.asarray(lm.generate(ids, attention_mask=mask, max_new_tokens=NEW))  # stops at the config's EOS
  assert ours.shape == (3, NEW) and ours.dtype == np.int32
  np.testing.assert_array_equal(ours, [_hf_generate(tiny.model, p) for p in PROMPTS])
  assert len({t for row in ours for t in row}) > 3  # the tiny models say more than one word


def test_cached_logits_equal_a_full_recompute(tiny_gemmas):
  """Prefill + cached steps give the logits of the full forward pass over prompt + new tokens."""
  for name in ("gemma2", "gemma3"):
    lm = load_language_model(tiny_gemmas[name].path)
    ids, mask = _right_padded(PROMPTS)
    lengths = jnp.asarray(mask.sum(1))
    new = np.asarray(lm.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_ids=()))
    padded = np.pad(ids, [(0, 0), (0, 16 - ids.shape[1])])
    logits, cache = generation.prefill(lm.module, lm.params, padded, None, lengths, None, 128)
    cached = [logits]
    step_fn = jax.jit(generation._step, static_argnums=0)
    for step in range(5):
      logits, cache = step_fn(lm.module, lm.params, jnp.asarray(new[:, step]), lengths + step, cache, None)
      cached.append(logits)
    full_ids, full_mask = _right_padded([p + new[i].tolist() for i, p in enumerate(PROMPTS)])
    full = np.asarray(lm(input_ids=full_ids, attention_mask=full_mask).logits)
    for row, p in enumerate(PROMPTS):
      for step in range(6):
        np.testing.assert_allclose(cached[step][row], full[row, len(p) - 1 + step], atol=1e-4)


def test_prompt_from_embeddings_with_a_visual_prefix(tiny_gemmas):
  """Captioning: [visual tokens] + embedded text as inputs_embeds, then ids; as transformers."""
  tiny = tiny_gemmas["gemma3"]
  lm = load_language_model(tiny.path)
  ids, mask = _right_padded(PROMPTS)
  from_embeds = lm.generate(inputs_embeds=lm.embed(ids), attention_mask=mask, max_new_tokens=NEW)
  np.testing.assert_array_equal(from_embeds, lm.generate(ids, attention_mask=mask, max_new_tokens=NEW))

  visual = np.random.default_rng(0).standard_normal((3, 2, 32)).astype(np.float32)
  embeds = np.concatenate([visual, np.asarray(lm.embed(ids))], axis=1)
  full_mask = np.concatenate([np.ones((3, 2), np.int32), mask], axis=1)
  ours = np.asarray(lm.generate(inputs_embeds=embeds, attention_mask=full_mask, max_new_tokens=NEW))
  want = [_hf_generate(tiny.model, embeds=embeds[i, :2 + len(p)]) for i, p in enumerate(PROMPTS)]
  np.testing.assert_array_equal(ours, want)


def test_ret_rows_in_the_prompt_and_in_the_output(tiny_gemmas, tmp_path):
  """extra_embeddings: [RET] (id 96) readable in the prompt and generatable, as a grown vocabulary."""
  tiny = tiny_gemmas["gemma_gqa"]
  lm = load_language_model(tiny.path)
  grown = make_tiny_gemma("gemma_gqa", tmp_path / "grown")
  extra = np.asarray(lm.params["embedding"][40:41]) * 3  # a row likely to win the argmax somewhere
  with torch.no_grad():
    grown.model.resize_token_embeddings(97)
    grown.model.get_input_embeddings().weight[96:] = torch.from_numpy(extra)
  prompts = [p + [96] for p in PROMPTS]
  ids, mask = _right_padded(prompts)
  ours = np.asarray(lm.generate(ids, attention_mask=mask, max_new_tokens=NEW, extra_embeddings=extra))
  np.testing.assert_array_equal(ours, [_hf_generate(grown.model, p) for p in prompts])


def test_stop_tokens_end_each_row_on_its_own(tiny_gemmas):
  lm = load_language_model(tiny_gemmas["gemma2"].path)
  ids, mask = _right_padded(PROMPTS)
  free = np.asarray(lm.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_ids=()))
  stop = int(free[0, 3])
  stopped = np.asarray(lm.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_ids=(),
                                   stop_tokens=[stop], pad_id=95))
  for row in range(3):
    hits = np.flatnonzero(free[row] == stop)
    end = hits[0] + 1 if hits.size else NEW
    np.testing.assert_array_equal(stopped[row, :end], free[row, :end])  # the stop token is kept
    assert (stopped[row, end:] == 95).all()


def test_new_prompt_lengths_do_not_recompile_the_loop(tiny_gemmas):
  lm = load_language_model(tiny_gemmas["gemma_mqa"].path)
  rng = np.random.default_rng(0)
  run = lambda length: lm.generate(rng.integers(3, 96, (2, length)), max_new_tokens=8, cache_length=64)
  run(5)
  loops, prefills = generation._sample_loop._cache_size(), generation.prefill._cache_size()
  run(9)  # same bucket (16): nothing compiles
  assert (generation._sample_loop._cache_size(), generation.prefill._cache_size()) == (loops, prefills)
  run(20)  # a new bucket (32) compiles the prefill only
  assert generation._sample_loop._cache_size() == loops
  assert generation.prefill._cache_size() == prefills + 1


def test_sampling(tiny_gemmas):
  lm = load_language_model(tiny_gemmas["gemma3"].path)
  ids, mask = _right_padded(PROMPTS)
  greedy = np.asarray(lm.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_ids=()))
  sample = lambda **kw: np.asarray(lm.generate(ids, attention_mask=mask, max_new_tokens=NEW, method="sample",
                                               eos_token_ids=(), **kw))
  np.testing.assert_array_equal(sample(top_p=1e-6, rng=jax.random.key(1)), greedy)  # the nucleus is the argmax
  logits = jax.random.normal(jax.random.key(0), (4, 96))
  top1 = generation.Sampler("sample", temperature=2.0, top_k=1).choose(logits, jax.random.key(1))
  np.testing.assert_array_equal(top1, jnp.argmax(logits, -1))
  a, b = sample(temperature=1.5, rng=jax.random.key(3)), sample(temperature=1.5, rng=jax.random.key(4))
  np.testing.assert_array_equal(a, sample(temperature=1.5, rng=jax.random.key(3)))  # reproducible
  assert (a != b).any() and (a != greedy).any()
  assert ((a >= 0) & (a < 96)).all()


def test_top_p_filter_keeps_the_smallest_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = lambda p: np.isfinite(np.asarray(generation.top_p_filter(logits, p)))[0].tolist()
  assert kept(0.5) == [True, False, False, False]
  assert kept(0.6) == [True, True, False, False]
  assert kept(0.9) == [True, True, True, False]
  assert kept(1.0) == [True, True, True, True]


def test_beam_search(tiny_gemmas):
  tiny = tiny_gemmas["gemma2"]
  lm = load_language_model(tiny.path)
  ids, mask = _right_padded(PROMPTS)
  kw = dict(attention_mask=mask, max_new_tokens=8, eos_token_ids=())
  greedy = np.asarray(lm.generate(ids, **kw))
  np.testing.assert_array_equal(lm.generate(ids, method="beam", num_beams=1, **kw), greedy)
  beams = np.asarray(lm.generate(ids, method="beam", num_beams=3, **kw))
  # without EOS every hypothesis has the same length: transformers' beam search finds the same ones
  want = [_hf_generate(tiny.model, p, n=8, num_beams=3, eos_token_id=None) for p in PROMPTS]
  np.testing.assert_array_equal(beams, want)

  def log_probs(new):  # summed log p of each row's new tokens, one forward pass over the batch
    full_ids, full_mask = _right_padded([p + new[i].tolist() for i, p in enumerate(PROMPTS)])
    logp = np.asarray(jax.nn.log_softmax(lm(input_ids=full_ids, attention_mask=full_mask).logits))
    return [sum(logp[row, len(p) - 1 + i, t] for i, t in enumerate(new[row])) for row, p in enumerate(PROMPTS)]

  assert (np.array(log_probs(beams)) >= np.array(log_probs(greedy)) - 1e-4).all()


def test_bad_prompts_are_refused(tiny_gemmas):
  lm = load_language_model(tiny_gemmas["gemma_mqa"].path)
  ids, mask = _right_padded(PROMPTS)
  with pytest.raises(ValueError, match="right padded"):
    lm.generate(ids, attention_mask=mask[:, ::-1])  # left padding
  with pytest.raises(ValueError, match="does not fit cache_length"):
    lm.generate(ids, attention_mask=mask, max_new_tokens=30, cache_length=32)
  with pytest.raises(ValueError, match="exactly one"):
    lm.generate(ids, inputs_embeds=lm.embed(ids))
  with pytest.raises(ValueError, match="method"):
    lm.generate(ids, method="nucleus")
