"""bench/train_step.py: the analytic FLOP count (bench/train_step_flops.py) by hand and against the
traced model, and a reduced-size CPU run with the transformers peer (one JSON object, a positive
finite speedup)."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import pytest

from bridgejax.models.clip import CLIPVisionConfig
from bridgejax.models.gemma import GemmaConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "train_step.py")


def _bench():
  spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


sys.path.insert(0, os.path.dirname(SCRIPT))  # bench/ is not a package: the script's helpers are imported from there
import train_step_flops as flops  # noqa: E402
import train_step_model as model_lib  # noqa: E402

bench = _bench()
VISION = CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, image_size=4, patch_size=2)
LLM = GemmaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                  head_dim=4)


def _fromage(concat_prob=0.0, embed_dim=4):
  config = bench.load_config(os.path.join(ROOT, "configs", "fromage.py"))
  config.concat_prob = concat_prob
  config.ret.embed_dim = embed_dim
  return config


def test_flops_by_hand():
  # B=2, T=3, k=1 (S=4); CLIP N=5, W=8, M=16, P=2, C=3; Gemma D=8, H=2, G=1, h=4, F=16, V=10; E=4
  clip = 2 * (2 * 4 * 3 * 4 * 8 + (5 * (8 * 64 + 4 * 8 * 16) + 4 * 25 * 8))  # forward only
  bridge = 3 * (2 * 2 * 8 * 8)  # Linear(W, D k), forward + 2 gradients
  lin = 2 * (2 * 8 * 2 * 4 + 2 * 8 * 1 * 4 + 3 * 8 * 16)  # per token: q, o; k, v; GeGLU
  llm_linear = 2 * (2 * (4 + 3) * lin)  # forward + activation gradients, caption and text tokens
  lm_head = 2 * ((2 * 3 + 2 * 2) * 2 * 8 * 11)  # all but the last position of each pass, V + [RET]
  attention = 3 * (2 * 4 * 16 * 8 + 2 * 4 * 9 * 8)  # 4 s^2 H h per row, s = 4 and 3
  heads = 3 * (2 * 2 * 4 * (8 + 8) + 4 * 4 * 4)
  assert flops.flops_per_step(_fromage(), VISION, LLM, 2, 3) == (
      clip + bridge + llm_linear + lm_head + attention + heads) == 55680


SMALL_VISION = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, image_size=8,
                                patch_size=2)
SMALL_LLM = GemmaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=4)


def _abstract_small(config, vision=SMALL_VISION, llm=SMALL_LLM):
  """The config's model on 2-layer backbones, with abstract (shape-only) params and a batch of 4 x 5."""
  model = model_lib.build_model(config, vision, llm)
  frozen = jax.eval_shape(model_lib.frozen_init(model), jax.random.key(0))
  trainable = jax.eval_shape(lambda f: model.init_trainable(jax.random.key(0), f), frozen)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in model_lib.random_batch(0, 4, 5, vision, llm).items()}
  return model, trainable, frozen, batch


@pytest.mark.parametrize("config_file,concat_prob", [("fromage.py", 0.0), ("fromage.py", 0.5),
                                                     ("crossatt_k12.py", 0.0)])
def test_forward_flops_equal_the_traced_loss(config_file, concat_prob):
  """The analytic forward equals the dot/conv FLOPs of model.loss's jaxpr (shapes only)."""
  config = bench.load_config(os.path.join(ROOT, "configs", config_file))
  config.concat_prob = concat_prob
  model, trainable, frozen, batch = _abstract_small(config)
  traced = flops._traced_matmul_flops(jax.make_jaxpr(model.loss)(trainable, frozen, batch, jax.random.key(0)).jaxpr)
  assert sum(flops.flops_breakdown(config, SMALL_VISION, SMALL_LLM, 4, 5)["forward"].values()) == traced


def test_real_fromage_count_is_near_the_issue_figure():
  config = _fromage(embed_dim=256)
  vision, llm = model_lib.backbone_sizes(config, "real")
  assert 115e12 < flops.flops_per_step(config, vision, llm, 180, 24) < 118e12  # 116.9 TFLOP


def _tiny_config(tmp_path) -> str:
  """configs/demo.py with one-layer toy backbones: only their config.json is read."""
  for part, changes in (("clip", {"num_hidden_layers": 1, "image_size": 28}), ("gemma", {"num_hidden_layers": 1})):
    with open(os.path.join(model_lib.TOY_ASSETS, part, "config.json")) as f:
      hf = {**json.load(f), **changes}
    os.makedirs(tmp_path / part)
    with open(tmp_path / part / "config.json", "w") as f:
      json.dump(hf, f)
  path = tmp_path / "tiny.py"
  path.write_text(f"""from configs import demo


def get_config(arg=None):
  config = demo.get_config(arg)
  config.name = "tiny"
  config.vision.path = {str(tmp_path / 'clip')!r}
  config.llm.path = {str(tmp_path / 'gemma')!r}
  config.batch_size = 4
  config.data.max_caption_tokens = 8
  return config
""")
  return str(path)


def test_reduced_cpu_run_with_peer(tmp_path):
  out = subprocess.run([sys.executable, SCRIPT, "--config", _tiny_config(tmp_path), "--size", "reduced",
                        "--warmup", "1", "--steps", "2", "--peer", "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  for key in ("step_s", "samples_per_s", "compile_s", "flops_per_step", "temp_bytes", "peer_step_s",
              "peer_samples_per_s", "speedup", "matmul_bf16_flops_per_s", "utilisation"):
    assert isinstance(result[key], (int, float)) and math.isfinite(result[key]) and result[key] > 0, key
  assert result["config"] == "tiny" and result["batch_size"] == 4 and result["size"] == "reduced"
  assert result["backend"] == "cpu" and result["peak_bytes"] is None and result["peer_concat"] is False
  assert result["samples_per_s"] == pytest.approx(4 / result["step_s"])
  assert "crossatt" in result["peer_bridge"] and math.isfinite(result["loss"])
  assert result["jax"] == jax.__version__ and result["device_kind"]


def test_memory_only_allocates_nothing_and_reports_xla_memory(tmp_path):
  result = bench.run(bench.parse_args(["--config", _tiny_config(tmp_path), "--size", "reduced", "--memory-only",
                                       "--remat", "llm", "--concat-prob", "0"]))
  assert result["temp_bytes"] > 0 and result["argument_bytes"] > 0 and result["compile_s"] > 0
  assert result["step_s"] is None and result["peak_bytes"] is None and result["remat"] == "llm"
  assert "peer_step_s" not in result and "utilisation" not in result


def test_remat_shrinks_the_backward_residuals():
  """What the backward keeps from the forward falls strictly from remat "none" to "llm" to "all"
  (the CPU's temp buffer cannot show it: XLA:CPU drops the recomputation)."""
  measured = {}
  for remat in ("none", "llm", "all"):
    config = _fromage(concat_prob=0.5)
    config.remat = remat
    model, trainable, frozen, batch = _abstract_small(config)
    measured[remat] = bench.residual_bytes(model, trainable, frozen, batch)
  assert measured["none"] > measured["llm"] > measured["all"] > 0, measured
