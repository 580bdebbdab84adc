"""Shared pytest fixtures, and one persistent JAX compilation cache for the whole session."""

import dataclasses
import os
import shutil
import tempfile

import pytest

# Many tests compile the same programs (the tiny world's train step, eval, decoding) in separate
# functions, processes and subprocesses. A compilation cache shared by the whole session, fresh
# each session, compiles each program once. Set through the environment before JAX is imported, so
# the subprocesses that tests start use it too.
# The process that makes the directory owns it: pytest-xdist's workers inherit it from the controller
# and leave it alone when they finish; the controller removes it at the very end.
_JAX_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _JAX_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="bridgejax-test-jax-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
if "jax" in __import__("sys").modules:  # a plugin imported JAX before this file: tell it directly
  import jax
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# Whole files that take minutes run first, so that with `-n 2` one worker runs them while the other
# works through the rest, instead of one of them starting near the end (longest first).
LONG_FILES = ("test_demo.py", "test_ablate.py", "test_own_data_example.py")


def pytest_collection_modifyitems(session, config, items):
  del session, config
  items.sort(key=lambda item: item.path.name not in LONG_FILES)  # stable: files stay whole, in order


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _JAX_CACHE is not None:
    shutil.rmtree(_JAX_CACHE, ignore_errors=True)

# ------------------------------------------------------------------------------------------------
# Tiny random Gemma checkpoints (test_gemma.py, test_generate.py): one per family / attention layout.

_GEMMA_COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_attention_heads=4, head_dim=8,
                     initializer_range=0.5, pad_token_id=0, eos_token_id=1, bos_token_id=2)
TINY_GEMMAS = {  # name: (transformers model class, config class, config kwargs)
    "gemma_mqa": ("GemmaForCausalLM", "GemmaConfig", dict(num_hidden_layers=2, num_key_value_heads=1)),
    "gemma_gqa": ("GemmaForCausalLM", "GemmaConfig", dict(num_hidden_layers=2, num_key_value_heads=2)),
    "gemma_mha": ("GemmaForCausalLM", "GemmaConfig", dict(num_hidden_layers=2, num_key_value_heads=4)),
    # soft-capping low enough to bite; a window shorter than the test sequences; layers slide, global, slide
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(
        num_hidden_layers=3, num_key_value_heads=2, sliding_window=4, query_pre_attn_scalar=6,
        attn_logit_softcapping=3.0, final_logit_softcapping=4.0)),
    # pattern 2 (slide, global, ...); global RoPE 1M with linear scaling 2, local 10k
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(
        num_hidden_layers=4, num_key_value_heads=1, sliding_window=4, sliding_window_pattern=2,
        query_pre_attn_scalar=6, rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})),
}


@dataclasses.dataclass
class TinyGemma:
  name: str
  path: str  # a save_pretrained directory
  model: object  # the transformers model (eval mode, float32)


def make_tiny_gemma(name: str, path, seed: int = 0, **overrides) -> TinyGemma:
  import torch
  import transformers

  model_class, config_class, kwargs = TINY_GEMMAS[name]
  kwargs = {**kwargs, **overrides}
  torch.manual_seed(seed)
  model = getattr(transformers, model_class)(getattr(transformers, config_class)(**{**_GEMMA_COMMON, **kwargs})).eval()
  with torch.no_grad():  # transformers initialises norms at 0 (scale 1 + 0): make (1 + w) matter
    for param_name, param in model.named_parameters():
      if "norm" in param_name:
        param.normal_(0.0, 0.5)
    # Small embeddings, so that the residual stream is not just the (sqrt(D)-scaled) input token
    # and greedy decoding says more than one word.
    table = model.get_input_embeddings().weight
    table.mul_(0.05 / table.std())
  model.save_pretrained(str(path))
  return TinyGemma(name, str(path), model)


@pytest.fixture(scope="session")
def tiny_gemmas(tmp_path_factory) -> dict[str, TinyGemma]:
  root = tmp_path_factory.mktemp("tiny_gemmas")
  return {name: make_tiny_gemma(name, root / name) for name in TINY_GEMMAS}


# ------------------------------------------------------------------------------------------------
# The tiny CLIP + Gemma BridgeModel of the model and loss tests (test_model.py, test_loss_gradients.py,
# test_token_types_and_cmli.py, test_blip2_stages.py); its geometry and a caption batch are in model_helper.py.

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  """Random tiny HF checkpoints (CLIP 28 px / patch 7, Gemma MQA), loaded: (config with a cls_linear
  bridge of k=K, vision config, LLM config, frozen params, the transformers Gemma)."""
  import ml_collections
  import torch
  import transformers

  from bridgejax import weights
  from configs import base
  from model_helper import K, VOCAB
  root = tmp_path_factory.mktemp("tiny")
  torch.manual_seed(0)
  transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      image_size=28, patch_size=7, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4)).save_pretrained(root / "clip")
  gemma = transformers.GemmaForCausalLM(transformers.GemmaConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=1, head_dim=8, pad_token_id=0, bos_token_id=2, eos_token_id=1)).eval()
  gemma.save_pretrained(root / "gemma")
  vision = weights.load_vision_tower(str(root / "clip"))
  lm = weights.load_language_model(str(root / "gemma"))
  config = base.get_config()
  config.bridge = ml_collections.ConfigDict({"name": "cls_linear", "k": K, "layer": -1, "post_norm": True})
  frozen = {"vision": vision.params, "llm": lm.params}
  return config, vision.config, lm.config, frozen, gemma
