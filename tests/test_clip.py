"""CLIP vision tower: parity with transformers on tiny random checkpoints, conversion, errors."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from bridgejax.weights import CheckpointError, MissingCheckpointError, load_vision_tower
from bridgejax.weights.convert import main as convert_main

SHAPES = {  # name: CLIPVisionConfig kwargs (head counts that are not powers of two on purpose)
    "img32_p8_1layer": dict(image_size=32, patch_size=8, hidden_size=36, intermediate_size=40,
                            num_hidden_layers=1, num_attention_heads=3),
    "img48_p12_2layers": dict(image_size=48, patch_size=12, hidden_size=30, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=5),
    "img32_p8_3layers_gelu": dict(image_size=32, patch_size=8, hidden_size=24, intermediate_size=48,
                                  num_hidden_layers=3, num_attention_heads=6, hidden_act="gelu"),
}


def _save(model, path, **kwargs):
  model.save_pretrained(path, **kwargs)
  return str(path)


def _vision_model(shape, seed=0):
  torch.manual_seed(seed)
  return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**SHAPES[shape])).eval()


def _pixels(model, batch=2, seed=0):
  c = model.config
  return np.random.default_rng(seed).standard_normal((batch, 3, c.image_size, c.image_size)).astype(np.float32)


def _reference(model, pixels):
  with torch.no_grad():
    return model(torch.from_numpy(pixels), output_hidden_states=True)


def _max_abs(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - b.float().numpy())))


def _assert_parity(ours, ref, atol=1e-5):
  assert len(ours.hidden_states) == len(ref.hidden_states)
  for i, (a, b) in enumerate(zip(ours.hidden_states, ref.hidden_states)):
    assert _max_abs(a, b) <= atol, f"hidden_states[{i}]"
  assert _max_abs(ours.last_hidden_state, ref.last_hidden_state) <= atol
  assert _max_abs(ours.pooler_output, ref.pooler_output) <= atol


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_vision_model_parity_fp32(shape, tmp_path):
  model = _vision_model(shape)
  pixels = _pixels(model)
  tower = load_vision_tower(_save(model, tmp_path))
  assert tower.config.num_layers == model.config.num_hidden_layers
  _assert_parity(tower(pixels), _reference(model, pixels))


def _relative_error(a, b):
  a, b = np.asarray(a, np.float32), b.float().numpy()
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("shape", ["img32_p8_1layer", "img48_p12_2layers"])
def test_vision_model_parity_bf16_compute(shape, tmp_path):
  model = _vision_model(shape)
  pixels = _pixels(model)
  tower = load_vision_tower(_save(model, tmp_path), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert tower.params["layer_0"]["fc1"]["kernel"].dtype == jnp.bfloat16
  ours, ref = tower(pixels), _reference(model, pixels)
  errors = [_relative_error(a, b) for a, b in zip(ours.hidden_states, ref.hidden_states)]
  errors.append(_relative_error(ours.pooler_output, ref.pooler_output))
  assert max(errors) <= 2e-2, errors


def test_clip_model_and_projection_checkpoints(tmp_path):
  torch.manual_seed(1)
  vision = SHAPES["img48_p12_2layers"]
  text = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=2, max_position_embeddings=16)
  full = transformers.CLIPModel(transformers.CLIPConfig(
      vision_config=vision, text_config=text, projection_dim=12)).eval()
  pixels = _pixels(full.vision_model)
  tower = load_vision_tower(_save(full, tmp_path / "clip"))  # text tower is ignored, not an error
  with torch.no_grad():
    ref = full.vision_model(torch.from_numpy(pixels), output_hidden_states=True)
    ref_embeds = full.get_image_features(torch.from_numpy(pixels))
  ours = tower(pixels)
  _assert_parity(ours, ref)
  ref_embeds = getattr(ref_embeds, "pooler_output", ref_embeds)  # transformers 5 wraps it
  assert _max_abs(ours.image_embeds, ref_embeds) <= 1e-5

  with_proj = transformers.CLIPVisionModelWithProjection(
      transformers.CLIPVisionConfig(**vision, projection_dim=7)).eval()
  tower = load_vision_tower(_save(with_proj, tmp_path / "proj"))
  with torch.no_grad():
    ref = with_proj(torch.from_numpy(pixels), output_hidden_states=True)
  ours = tower(pixels)
  assert _max_abs(ours.image_embeds, ref.image_embeds) <= 1e-5
  for a, b in zip(ours.hidden_states, ref.hidden_states):
    assert _max_abs(a, b) <= 1e-5


def test_sharded_and_bf16_checkpoints(tmp_path):
  model = _vision_model("img48_p12_2layers")
  pixels = _pixels(model)
  sharded = _save(model, tmp_path / "sharded", max_shard_size="20KB")
  assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
  _assert_parity(load_vision_tower(sharded)(pixels), _reference(model, pixels))

  bf16 = _save(model.to(torch.bfloat16), tmp_path / "bf16")  # stored as BF16 tensors
  ours = load_vision_tower(bf16)(pixels)  # upcast to float32 parameters
  _assert_parity(ours, _reference(model.float(), pixels))  # the bf16 weights, in float32


def test_convert_cli_round_trip(tmp_path):
  model = _vision_model("img32_p8_3layers_gelu")
  pixels = _pixels(model)
  hf = _save(model, tmp_path / "hf")
  out = tmp_path / "converted"
  result = subprocess.run([sys.executable, "-m", "bridgejax.weights.convert", "--hf", hf, "--out", str(out)],
                          capture_output=True, text=True, check=True)
  assert "clip_vision" in result.stdout
  _assert_parity(load_vision_tower(str(out))(pixels), _reference(model, pixels))
  # bf16 storage + bf16 compute from the converted directory too
  assert convert_main(["--hf", hf, "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
  tower = load_vision_tower(str(tmp_path / "bf16"), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert _relative_error(tower(pixels).pooler_output, _reference(model, pixels).pooler_output) <= 2e-2
  # refusing to overwrite is an error message, not a traceback
  assert convert_main(["--hf", hf, "--out", str(out)]) == 1


# ---------------------------------------------------------------------------- error paths


@pytest.fixture
def checkpoint(tmp_path):
  return _save(_vision_model("img32_p8_1layer"), tmp_path / "ckpt")


def _edit_tensors(path, edit):
  from safetensors.numpy import load_file, save_file
  file = os.path.join(path, "model.safetensors")
  tensors = load_file(file)
  edit(tensors)
  save_file(tensors, file)


def test_error_missing_directory(tmp_path):
  with pytest.raises(MissingCheckpointError, match="does not exist"):
    load_vision_tower(str(tmp_path / "nope"))


def test_error_missing_config_and_weights(checkpoint):
  os.remove(os.path.join(checkpoint, "model.safetensors"))
  open(os.path.join(checkpoint, "pytorch_model.bin"), "w").close()
  with pytest.raises(MissingCheckpointError, match=r"neither model.safetensors.*safe_serialization"):
    load_vision_tower(checkpoint)
  os.remove(os.path.join(checkpoint, "config.json"))
  with pytest.raises(MissingCheckpointError, match="no config.json"):
    load_vision_tower(checkpoint)


def test_error_unknown_architecture(checkpoint):
  with open(os.path.join(checkpoint, "config.json"), "w") as f:
    json.dump({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, f)
  with pytest.raises(CheckpointError, match=r"unknown vision architecture 'GPT2LMHeadModel'.*CLIPVisionModel"):
    load_vision_tower(checkpoint)


def test_error_missing_and_unexpected_tensors(checkpoint):
  def edit(t):
    del t["encoder.layers.0.mlp.fc1.bias"]
    t["encoder.layers.0.mlp.extra.weight"] = np.zeros(3, np.float32)
  _edit_tensors(checkpoint, edit)
  with pytest.raises(CheckpointError) as e:
    load_vision_tower(checkpoint)
  assert "missing tensors (1): encoder.layers.0.mlp.fc1.bias" in str(e.value)
  assert "unexpected tensors (1): encoder.layers.0.mlp.extra.weight" in str(e.value)


def test_error_shape_mismatch(checkpoint):
  with open(os.path.join(checkpoint, "config.json")) as f:
    config = json.load(f)
  config["intermediate_size"] = 50
  with open(os.path.join(checkpoint, "config.json"), "w") as f:
    json.dump(config, f)
  with pytest.raises(CheckpointError, match=r"encoder.layers.0.mlp.fc1.weight: expected \(50, 36\), got \(40, 36\)"):
    load_vision_tower(checkpoint)


def test_error_truncated_safetensors(checkpoint):
  file = os.path.join(checkpoint, "model.safetensors")
  with open(file, "r+b") as f:
    f.truncate(os.path.getsize(file) // 2)
  with pytest.raises(CheckpointError, match="truncated"):
    load_vision_tower(checkpoint)


def test_error_converted_directory_of_another_kind(checkpoint, tmp_path):
  out = tmp_path / "converted"
  assert convert_main(["--hf", checkpoint, "--out", str(out)]) == 0
  header = out / "bridgejax.json"
  header.write_text(header.read_text().replace("clip_vision", "gemma"))
  with pytest.raises(CheckpointError, match="holds a 'gemma' model, not a 'clip_vision' one"):
    load_vision_tower(str(out))


def test_error_wrong_pixel_shape(checkpoint):
  tower = load_vision_tower(checkpoint)
  with pytest.raises(ValueError, match=r"pixel_values must be \(B, 3, 32, 32\) \(NCHW\), got \(1, 32, 32, 3\)"):
    tower(np.zeros((1, 32, 32, 3), np.float32))


@pytest.mark.parametrize("projection_dim", [None, 6])
def test_save_hf_loads_in_transformers(projection_dim, tmp_path):
  from bridgejax.models.clip import CLIPVisionConfig, CLIPVisionTransformer
  from bridgejax.weights.clip import save_hf
  import jax
  config = CLIPVisionConfig(hidden_size=24, intermediate_size=40, num_layers=2, num_heads=3, image_size=28,
                            patch_size=7, projection_dim=projection_dim)
  module = CLIPVisionTransformer(config)
  pixels = np.random.default_rng(0).standard_normal((2, 3, 28, 28)).astype(np.float32)
  params = module.init(jax.random.key(0), pixels)["params"]
  save_hf(str(tmp_path), config, params)
  cls = transformers.CLIPVisionModel if projection_dim is None else transformers.CLIPVisionModelWithProjection
  reference = cls.from_pretrained(str(tmp_path)).eval()
  ours = module.apply({"params": params}, pixels)
  with torch.no_grad():
    ref = reference(torch.from_numpy(pixels), output_hidden_states=True)
  for a, b in zip(ours.hidden_states, ref.hidden_states):
    assert _max_abs(a, b) <= 1e-5
  if projection_dim:
    assert _max_abs(ours.image_embeds, ref.image_embeds) <= 1e-5
  reloaded = load_vision_tower(str(tmp_path))
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), reloaded.params, params))
