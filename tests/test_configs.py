"""Every experiment config builds and runs with tiny backbones; param_count counts parameters exactly."""

import glob
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from ml_collections import config_flags  # noqa: F401  (configs are loaded like train.py does)

from bridgejax import bridges
from bridgejax.param_count import count
from bridgejax.model import BridgeModel
from bridgejax.models.clip import CLIPVisionTransformer
from bridgejax.models.gemma import Gemma
from model_helper import TINY_LLM, TINY_VISION, experiment_config

CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob("configs/*.py") if not p.endswith("__init__.py"))


def test_every_config_file_is_covered():
  assert {"base", "fromage", "cls", "l4l", "l2l", "l2lx2", "comp", "grouped", "regions", "wavg", "crossatt",
          "crossatt_k12", "demo"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_and_gives_k_tokens(name):
  config = experiment_config(name)
  for key in ("total_steps", "batch_size", "seed", "log_every_steps", "checkpoint_every_steps",
              "eval_every_steps"):
    assert isinstance(config[key], int), key
  assert {"data", "model"} <= set(config.mesh) and config.vision.path and config.llm.path
  model = BridgeModel.create(config, TINY_VISION, TINY_LLM)
  # shapes only (jax.eval_shape): the bridges' widths are the configs' own, up to BLIP-2's 100M-parameter
  # Q-Former, which would take most of a minute to initialise; test_bridges* run them for real
  x = jnp.zeros((2, 3, 28, 28))
  frozen = {"vision": jax.eval_shape(CLIPVisionTransformer(TINY_VISION).init, jax.random.key(0), x)["params"],
            "llm": jax.eval_shape(Gemma(TINY_LLM).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]}
  trainable = jax.eval_shape(model.init_trainable, jax.random.key(1), frozen)
  params = {**frozen, **trainable}
  out = jax.eval_shape(model.encode_images, params, x)
  dims = dict(vision_width=16, vision_layers=4, grid_size=4, llm_width=24)
  k = bridges.num_tokens(config.bridge, **dims)
  assert out.tokens.shape == (2, k, 24)
  assert jax.eval_shape(model.image_embedding, params, out).shape == (2, config.ret.embed_dim)


@pytest.mark.parametrize("arg,bridge", [("layer=-2,k=8", dict(layer=-2, k=8, post_norm=False)),
                                        ("k=20,post_norm=true", dict(layer=-1, k=20, post_norm=True))])
def test_cls_sweep_arguments(arg, bridge):
  config = experiment_config("cls", arg)
  assert {k: config.bridge[k] for k in bridge} == bridge and config.bridge.name == "cls_linear"


def test_crossatt_k12_is_the_thesis_best():
  config = experiment_config("crossatt_k12")
  assert (config.bridge.name, config.bridge.k, config.bridge.layer) == ("crossatt", 12, -2)
  assert config.bridge.attention == "equation"  # eq. 7.15-7.17 as written: the count that fits 7.4


THESIS_CONFIGS = [n for n in CONFIGS if n not in ("demo", "demo_gemma3")]  # the demos evaluate the toy world


@pytest.mark.parametrize("name", THESIS_CONFIGS)
def test_eval_protocol_argument(name):
  """`:eval=thesis`: COCO val2017 (5k images) squashed to 224x224, greedy, 32 tokens for captioning
  and retrieval, as the thesis's fork, and FROMAGe's VisDial scoring on squashed images; the default
  stays the standard Karpathy-test protocol. The
  bridge and the rest of the config do not change."""
  from bridgejax.evaluation.evaluators import protocol_of
  thesis, standard = experiment_config(name, "eval=thesis"), experiment_config(name)
  for task in ("caption", "retrieval"):
    assert (thesis.evals[task].split, thesis.evals[task].image_resize) == ("val2017", "squash")
    assert (standard.evals[task].split, standard.evals[task].image_resize) == ("test", "clip")
  assert (thesis.evals.caption.num_beams, thesis.evals.caption.max_new_tokens) == (1, 32)
  assert thesis.evals.vqa.to_dict() == {**standard.evals.vqa.to_dict(), "protocol": "thesis"}
  # VisDial as FROMAGe's eval_visdial_generation.py, which the thesis follows (§5.5.3)
  assert thesis.evals.visdial.to_dict() == {**standard.evals.visdial.to_dict(), "protocol": "thesis",
                                            "scoring": "fromage", "image_resize": "squash"}
  assert {t: protocol_of(c) for t, c in thesis.evals.items()} == dict.fromkeys(thesis.evals, "thesis")
  assert {t: protocol_of(c) for t, c in standard.evals.items()} == dict.fromkeys(standard.evals, "standard")
  thesis.evals = standard.evals
  assert thesis.to_dict() == standard.to_dict()
  with pytest.raises(ValueError, match="config argument eval='karpathy' is unknown; choose from \\['standard', 'thesis'\\]"):
    experiment_config(name, "eval=karpathy")


@pytest.mark.parametrize("name", ["grouped", "regions", "wavg"])
def test_all_token_configs_take_the_retrieval_feature(name):
  assert experiment_config(name).bridge.retrieval_feature == "mean"
  assert experiment_config(name, "retrieval_feature=attention_pool").bridge.retrieval_feature == "attention_pool"


def test_bad_config_argument_is_a_clear_error():
  with pytest.raises(ValueError, match=r"config argument 'depth=3': expected key=value with key in"):
    experiment_config("cls", "depth=3")


def _ret_heads(feature_width, llm_width, embed=256):
  return feature_width * embed + embed + llm_width * embed + embed + llm_width + 1  # W_i, W_t, [RET], scale


# config, argument, W_i's input width, the total `param_count` prints (what docs/experiments.md and the
# bridge docstrings quote; the thesis's own figures in the comments)
COUNTS = [
    ("cls", "k=20", 1024, 42_772_993),  # thesis 7.1: "42M"
    ("cls", "layer=-2,k=4", 1024, 9_185_793),
    ("fromage", None, 1024, 2_888_193),
    ("l4l", None, 1024, 9_185_793), ("l2l", None, 1024, 4_987_393), ("l2lx2", None, 1024, 9_185_793),
    ("comp", None, 1024, 9_185_793),
    ("regions", None, 65_536, 151_523_841),  # thesis 7.1: "the Regions model trains 151M"
    ("regions", "retrieval_feature=attention_pool", 1024, 139_208_193),
    ("grouped", None, 65_536, 151_523_841), ("grouped", "retrieval_feature=attention_pool", 1024, 139_208_193),
    ("wavg", None, 1024, 2_886_209), ("wavg", "retrieval_feature=attention_pool", 1024, 7_085_633),
    ("crossatt", None, 1024, 9_188_865),
    ("crossatt_k12", None, 1024, 9_197_057),  # thesis 7.4: "just slightly more" than cls k=4's 9,185,793
    ("crossatt", "layer=-2,k=12,attention=mha", 1024, 11_298_305),
]


@pytest.mark.parametrize("name,arg,feature_width,total", COUNTS)
def test_inspect_counts_equal_the_formulas_at_real_sizes(name, arg, feature_width, total):
  config = experiment_config(name, arg)
  result = count(config)  # CLIP ViT-L/14 + Gemma-2B from config.*.arch: no weights needed
  dims = dict(vision_width=1024, vision_layers=24, grid_size=16, llm_width=2048)
  assert result["trainable_params"] == bridges.num_params(config.bridge, **dims) + _ret_heads(feature_width, 2048)
  assert result["trainable_params"] == total
  assert result["by_module"]["ret/image_proj"] == feature_width * 256 + 256
  assert sum(result["by_module"].values()) == result["trainable_params"]


def test_docs_quote_these_counts():
  # docs/experiments.md (its table and the paragraphs under it) quotes every total above but l2l's
  with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "experiments.md")) as f:
    text = f.read()
  missing = sorted({f"{total:,}" for name, _, _, total in COUNTS if name != "l2l"} - set(re.findall(r"\d[\d,]*\d", text)))
  assert not missing, f"docs/experiments.md does not quote {missing}"


def test_inspect_cli_json():
  out = subprocess.run([sys.executable, "-m", "bridgejax.param_count", "--config", "configs/cls.py:k=20", "--json"],
                       capture_output=True, text=True, check=True).stdout
  result = json.loads(out)
  assert result["trainable_params"] == 20 * 2048 * 1025 + _ret_heads(1024, 2048) == 42_772_993  # thesis: "42M"
  assert result["by_module"]["bridge/proj"] == 20 * 2048 * 1025
  out = subprocess.run([sys.executable, "-m", "bridgejax.param_count", "--config", "configs/regions.py", "--json"],
                       capture_output=True, text=True, check=True).stdout
  assert json.loads(out)["trainable_params"] == 151_523_841  # thesis 7.1: "the Regions model trains 151M"


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_is_within_the_value_ranges(name):
  from bridgejax.config_schema import problems
  assert problems(experiment_config(name)) == []


@pytest.mark.parametrize("name", CONFIGS)
def test_every_key_of_every_config_is_declared_once(name):
  """Each leaf of each shipped config is a schema key, a key of its bridge (bridgejax.bridges), of its
  eval task's type (evaluators) or of an optimiser group; and every schema key is in the base config."""
  from bridgejax import bridges
  from bridgejax.cli import flat_keys
  from bridgejax.config_schema import GROUP_KEYS, declared
  from bridgejax.evaluation.evaluators import COMMON_KEYS, REGISTRY
  config = experiment_config(name)
  keys = set(flat_keys(config))
  leaves = {k for k in keys if not any(other.startswith(k + ".") for other in keys)}
  bridge_keys = set(bridges.REGISTRY[config.bridge.name].defaults) | {"name"}
  for key in sorted(leaves):
    section, _, leaf = key.partition(".")
    if section == "bridge":
      assert leaf in bridge_keys, key
    elif section == "evals":
      task, _, leaf = leaf.partition(".")
      assert leaf in set(COMMON_KEYS) | set(REGISTRY[config.evals[task].type].keys), key
    elif key.startswith("optim.groups."):
      assert key.rpartition(".")[2] in GROUP_KEYS + ("params",), key
    else:
      assert key in declared() or key == "optim.groups", key
  if name == "base":
    assert {k for k, key in declared().items() if not key.optional} <= keys


def test_every_pattern_names_a_real_key():
  """The schema's evals.* and optim.groups.* rules name keys the evaluators and the optimiser have."""
  from bridgejax.config_schema import GROUP_KEYS, PATTERNS
  from bridgejax.evaluation.evaluators import COMMON_KEYS, REGISTRY
  keys = {"evals.*.": set(COMMON_KEYS).union(*(e.keys for e in REGISTRY.values())), "optim.groups.*.": set(GROUP_KEYS)}
  for pattern in PATTERNS:
    prefix = next(p for p in keys if pattern.startswith(p))
    assert pattern.removeprefix(prefix) in keys[prefix], pattern
  assert {f"evals.*.{k}" for k in COMMON_KEYS} <= set(PATTERNS)


def test_resume_harmless_keys_come_from_the_schema():
  """What a resumed run may change: how it is driven, logged, placed, and evaluated; not what it trains."""
  from bridgejax.config_schema import harmless
  for key in ("total_steps", "log_every_steps", "checkpoint_every_steps", "eval_every_steps", "keep_checkpoints",
              "tensorboard", "eval_after_training", "evals.caption.batch_size", "eval.caption.data",
              "data.num_workers", "data.val_split", "data.val_examples", "data.val_batch_size", "data.dir",
              "data.features", "vision.path", "llm.path", "llm.tokenizer", "mesh.data", "frozen_sharding",
              "max_nonfinite_steps", "name", "best_metric", "wandb.project"):
    assert harmless(key), key
  for key in ("batch_size", "seed", "bridge.k", "bridge.name", "optim.lr", "optim.groups.prompt.lr", "loss.caption",
              "data.train_split", "data.max_caption_tokens", "remat", "compute_dtype", "cmli.dim", "gone.key"):
    assert not harmless(key), key


def test_complete_fills_what_a_config_lacks_with_the_schema_defaults():
  """A config.json saved before a key existed: each declared key it lacks comes back at its default,
  what it holds and what the schema does not declare stay; the optional keys (data.toy) stay absent."""
  import ml_collections
  from bridgejax.cli import flat_keys
  from bridgejax.config_schema import complete, declared, default_config
  old = default_config().to_dict()
  for section, key in (("", "stage"), ("", "representation_share"), ("", "remat"), ("data", "image_resize"),
                       ("vision", "cls_equivalent"), ("optim", "init_lr_fraction"), ("loss", "cmli")):
    del (old[section] if section else old)[key]
  del old["wandb"]
  old["bridge"] = {"name": "crossatt", "k": 3, "num_heads": 4}  # a bridge's own keys: not the schema's
  old["batch_size"], old["optim"]["lr"] = 7, 1e-3
  config = ml_collections.ConfigDict(old)
  config.lock()
  assert complete(config) is config and config.is_locked
  assert (config.stage, config.representation_share, config.remat, config.data.image_resize) == (
      "generative", 0.0, "none", "clip")
  assert (config.vision.cls_equivalent, config.optim.init_lr_fraction, config.loss.cmli) == ("mean", 0.0, 0.0)
  assert config.wandb.to_dict() == {"project": "", "entity": "", "name": ""}
  assert (config.batch_size, config.optim.lr, config.bridge.to_dict()) == (7, 1e-3, old["bridge"])
  assert "toy" not in config.data
  wanted = {k for k, key in declared().items() if not key.optional}
  assert wanted <= set(flat_keys(config))
  plain = {"data": {"dir": "d"}, "extra": [1]}  # a dict as read from JSON (train/loop.changed_keys, table)
  assert complete(plain)["data"] == {**default_config().data.to_dict(), "dir": "d"} and plain["extra"] == [1]


@pytest.mark.parametrize("name", CONFIGS)
def test_complete_never_changes_a_present_value(name):
  """Every shipped config is complete already, and so is one with each declared key off its default."""
  from bridgejax.cli import flat_keys
  from bridgejax.config_schema import complete, declared
  config = experiment_config(name)
  before = config.to_json_best_effort(sort_keys=True)
  assert complete(config).to_json_best_effort(sort_keys=True) == before
  present = set(flat_keys(config))
  for dotted, key in declared().items():
    if dotted in present and isinstance(key.default, (bool, int, float, str)):
      *sections, leaf = dotted.split(".")
      node = config
      for section in sections:
        node = node[section]
      default = key.default
      node[leaf] = (not default if isinstance(default, bool) else default + "_x" if isinstance(default, str)
                    else default + 1)
  before = config.to_json_best_effort(sort_keys=True)
  assert complete(config).to_json_best_effort(sort_keys=True) == before


def test_a_config_file_without_newer_keys_loads_with_their_defaults(tmp_path):
  """cli.load_config_file (train.py's --config reads the same way, through cli.run_absl)."""
  from bridgejax.cli import load_config_file
  path = tmp_path / "old.py"
  path.write_text("import ml_collections\n\ndef get_config():\n"
                  "  return ml_collections.ConfigDict({'name': 'old', 'remat': 'llm', 'data': {'dir': 'd'}})\n")
  config = load_config_file(str(path))
  assert (config.name, config.remat, config.data.dir) == ("old", "llm", "d")
  assert (config.stage, config.data.image_resize, config.batch_size) == ("generative", "clip", 180)


def test_config_values_name_every_value_out_of_range():
  from bridgejax.config_schema import check_config_values
  from bridgejax.errors import UserError
  config = experiment_config("demo")
  config.optim.lr, config.keep_checkpoints, config.evals.caption.max_examples = float("nan"), 0, -2
  config.remat = "layers"
  with pytest.raises(UserError) as e:
    check_config_values(config)
  assert str(e.value) == ("--config.remat='layers' must be one of 'none', 'llm', 'all'; --config.optim.lr=nan must be "
                          "a finite number > 0 (the peak learning rate); --config.keep_checkpoints=0 must be an "
                          "integer >= 1 (0 would keep no checkpoint: the trained model would be thrown away); "
                          "--config.evals.caption.max_examples=-2 must be an integer >= 0 (0 = the whole split)")


def test_the_configuration_page_lists_every_key():
  from bridgejax.config_schema import markdown
  with open("docs/configuration.md") as f:
    assert markdown() in f.read(), "docs/configuration.md: paste the output of python -m bridgejax.config_schema"
