"""SigLIP vision tower: parity with transformers on tiny random checkpoints written here (every hidden
state, the post-LayerNorm, the attention-pool head; float32 and bf16), SiglipImageProcessor's
preprocessing, the CLS stand-ins bridges read, conversion, errors, and a bridge training on it."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from backbone_helper import copy_with, perturb_norms_and_biases, train_bridge_steps
from bridgejax.bridges import VisionFeatures
from bridgejax.models.siglip import SiglipVisionTransformer
from bridgejax.weights import CheckpointError, load_vision_tower
from bridgejax.weights.convert import main as convert_main

SHAPES = {  # name: SiglipVisionConfig kwargs (head counts that are not powers of two on purpose)
    "img32_p8_2layers": dict(image_size=32, patch_size=8, hidden_size=24, intermediate_size=40,
                             num_hidden_layers=2, num_attention_heads=3),
    # 30 = 4 * 7 + 2: the last pixels fall outside the patch grid (as 384 = 27 * 14 + 6 in so400m)
    "img30_p7_3layers_nohead": dict(image_size=30, patch_size=7, hidden_size=30, intermediate_size=48,
                                    num_hidden_layers=3, num_attention_heads=5, vision_use_head=False),
}
ATOL = 1e-5


def _vision_model(shape, seed=0):
  torch.manual_seed(seed)
  model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SHAPES[shape])).eval()
  perturb_norms_and_biases(model, lambda name: "norm" in name and name.endswith("weight"), std=0.3)
  return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """name -> (HF directory, transformers model)."""
  root = tmp_path_factory.mktemp("tiny_siglips")
  out = {}
  for name in SHAPES:
    model = _vision_model(name)
    model.save_pretrained(str(root / name))
    out[name] = (str(root / name), model)
  return out


@pytest.fixture(scope="module")
def towers(tiny):
  return {name: load_vision_tower(path) for name, (path, _) in tiny.items()}


def _pixels(model, batch=2, seed=0):
  size = model.config.image_size
  return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def _reference(model, pixels):
  with torch.no_grad():
    return model(torch.from_numpy(pixels), output_hidden_states=True)


def _errors(ours, ref):
  """Max abs errors: every hidden state, last_hidden_state, then pooler_output when there is one."""
  diff = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float32) - b.float().numpy())))
  assert len(ours.hidden_states) == len(ref.hidden_states)
  errors = [diff(a, b) for a, b in zip(ours.hidden_states, ref.hidden_states)]
  errors.append(diff(ours.last_hidden_state, ref.last_hidden_state))
  if ref.pooler_output is not None:
    errors.append(diff(ours.pooler_output, ref.pooler_output))
  return errors


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_parity_fp32(name, tiny, towers):
  _, model = tiny[name]
  tower, pixels = towers[name], _pixels(model)
  assert isinstance(tower.module, SiglipVisionTransformer)
  assert tower.config.num_tokens == tower.config.grid_size**2  # no CLS token
  ours = tower(pixels)
  assert (ours.pooler_output is None) == (not model.config.vision_use_head)
  errors = _errors(ours, _reference(model, pixels))
  print(f"max errors: {['%.1e' % e for e in errors]}")
  assert max(errors) <= ATOL, errors


def test_parity_bf16(tiny):
  """bf16 params and compute: every output within 2e-2 relative L2 of float32 transformers."""
  path, model = tiny["img32_p8_2layers"]
  tower = load_vision_tower(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert tower.params["head"]["in_proj_kernel"].dtype == jnp.bfloat16
  pixels = _pixels(model)
  ours, ref = tower(pixels), _reference(model, pixels)
  relative = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float32) - b.numpy()) / np.linalg.norm(b.numpy()))
  errors = [relative(a, b) for a, b in zip(ours.hidden_states, ref.hidden_states)]
  errors += [relative(ours.last_hidden_state, ref.last_hidden_state), relative(ours.pooler_output, ref.pooler_output)]
  print(f"bf16 relative errors: {['%.1e' % e for e in errors]}")
  assert max(errors) <= 2e-2, errors


def test_siglip_model_checkpoint_reads_the_vision_half(tmp_path):
  """A SiglipModel directory (vision_model. prefix, a text tower, logit scale and bias) loads its vision tower."""
  torch.manual_seed(1)
  text = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
              max_position_embeddings=16)
  full = transformers.SiglipModel(transformers.SiglipConfig(
      vision_config=SHAPES["img32_p8_2layers"], text_config=text)).eval()
  full.save_pretrained(str(tmp_path))
  pixels = _pixels(full.vision_model)
  errors = _errors(load_vision_tower(str(tmp_path))(pixels), _reference(full.vision_model, pixels))
  assert max(errors) <= ATOL, errors


def test_preprocessing_equals_siglip_image_processor():
  """clip_preprocess(resize="siglip"): the whole image to a square, no crop, (x / 255 - 0.5) / 0.5."""
  from PIL import Image

  from bridgejax.data.image import clip_preprocess

  image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
  want = transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32})(image, return_tensors="np")
  ours = clip_preprocess(image, 32, "siglip")
  assert ours.shape == (3, 32, 32)
  np.testing.assert_allclose(ours, want["pixel_values"][0], atol=1e-6)


def test_cls_stand_ins(tiny, towers):
  """SigLIP has no CLS: "mean" puts each layer's patch mean first, "pooled" the head's output at layer L."""
  _, model = tiny["img32_p8_2layers"]
  tower = towers["img32_p8_2layers"]
  out = tower(_pixels(model))
  post_norm = tower.params["post_norm"]
  mean = VisionFeatures.from_tower(out.hidden_states, post_norm, cls_equivalent="mean")
  for ours, raw in zip(mean.hidden_states, out.hidden_states):
    assert ours.shape == (2, 1 + 16, 24)
    np.testing.assert_array_equal(ours[:, 1:], raw)
    np.testing.assert_allclose(ours[:, 0], np.asarray(raw).mean(1), atol=1e-6)
  pooled = VisionFeatures.from_tower(out.hidden_states, post_norm, cls_equivalent="pooled", pooled=out.pooler_output)
  np.testing.assert_array_equal(pooled.cls(-1, post_norm=False), out.pooler_output)
  np.testing.assert_array_equal(pooled.cls(-2, post_norm=False), mean.cls(-2, post_norm=False))
  with pytest.raises(ValueError, match="cls_equivalent='first' is not one of 'mean', 'pooled'"):
    VisionFeatures.from_tower(out.hidden_states, post_norm, cls_equivalent="first")
  with pytest.raises(ValueError, match="needs the tower's pooled output"):
    VisionFeatures.from_tower(out.hidden_states, post_norm, cls_equivalent="pooled")


def test_convert_round_trip(tiny, towers, tmp_path, capsys):
  path, model = tiny["img30_p7_3layers_nohead"]
  assert convert_main(["--hf", path, "--out", str(tmp_path / "conv")]) == 0
  assert "siglip_vision" in capsys.readouterr().out
  converted = load_vision_tower(str(tmp_path / "conv"))
  assert converted.config == towers["img30_p7_3layers_nohead"].config
  pixels = _pixels(model)
  for a, b in zip(converted(pixels).hidden_states, towers["img30_p7_3layers_nohead"](pixels).hidden_states):
    np.testing.assert_array_equal(a, b)


def test_bad_checkpoints_fail_clearly(tiny, tmp_path):
  path, _ = tiny["img32_p8_2layers"]
  bad = copy_with(path, tmp_path / "a", drop=["head.attention.in_proj_bias"])
  with pytest.raises(CheckpointError, match=r"missing tensors \(1\): head.attention.in_proj_bias"):
    load_vision_tower(bad)
  bad = copy_with(path, tmp_path / "b", reshape={"encoder.layers.1.mlp.fc1.weight": (30, 24)})
  with pytest.raises(CheckpointError, match=r"encoder.layers.1.mlp.fc1.weight: expected \(40, 24\), got \(30, 24\)"):
    load_vision_tower(bad)
  bad = copy_with(path, tmp_path / "c", config={"vision_use_head": False})  # the head's tensors are then unexpected
  with pytest.raises(CheckpointError, match=r"unexpected tensors \(11\): head.attention.in_proj_bias"):
    load_vision_tower(bad)
  bad = copy_with(path, tmp_path / "d", config={"architectures": ["Dinov2Model"], "model_type": "dinov2"})
  with pytest.raises(CheckpointError, match="unknown vision architecture 'Dinov2Model'.*SiglipVisionModel, SiglipModel"):
    load_vision_tower(bad)
  assert convert_main(["--hf", bad, "--out", str(tmp_path / "out")]) == 1


def test_a_bridge_trains_on_siglip_with_the_backbones_frozen(tiny, towers):
  """The FROMAGe bridge reads the pooled stand-in: its image feature is transformers' pooler_output
  through the post-LayerNorm; then 3 AdamW steps with every frozen weight bitwise unchanged."""
  from bridgejax.model import BridgeModel
  from bridgejax.models.gemma import Gemma, GemmaConfig
  from configs.fromage import get_config

  _, model = tiny["img32_p8_2layers"]
  tower = towers["img32_p8_2layers"]
  llm = GemmaConfig(vocab_size=30, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                    head_dim=8, query_pre_attn_scalar=8)
  frozen = {"vision": tower.params, "llm": jax.jit(Gemma(llm).init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]}
  pooled = lambda config: config.vision.update(cls_equivalent="pooled")

  config = get_config(None)
  pooled(config)
  bridge_model = BridgeModel.create(config, tower.config, llm)
  assert bridge_model.cls_equivalent == "pooled"
  params = {**frozen, **bridge_model.init_trainable(jax.random.key(1), frozen)}
  pixels = _pixels(model)
  feature = bridge_model.encode_images(params, pixels).image_feature
  with torch.no_grad():
    want = model.post_layernorm(_reference(model, pixels).pooler_output).numpy()
  np.testing.assert_allclose(feature, want, atol=1e-5)

  losses = train_bridge_steps(tower.config, llm, frozen, configure=pooled)
  print(f"losses: {losses}")
  assert BridgeModel.create(get_config(None), tower.config, llm).cls_equivalent == "mean"  # the default


def test_config_json_without_vision_config_defaults(tiny):
  """A SiglipModel config.json that omits vision_config gets transformers' defaults (siglip-base-patch16-224)."""
  from bridgejax.models.siglip import SiglipVisionConfig
  from bridgejax.weights.vision import config_from_hf

  assert config_from_hf({"architectures": ["SiglipModel"], "model_type": "siglip"}) == SiglipVisionConfig()
  with open(os.path.join(tiny["img32_p8_2layers"][0], "config.json")) as f:
    assert config_from_hf(json.load(f)).num_heads == 3
