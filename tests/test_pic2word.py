"""Pic2Word composed retrieval: the mapping network's size, its loss and queries against independent
numpy computations, the toy benchmark's determinism and edits, the compose metric, and a short
train -> eval -> predict run on the tiny world."""

import functools
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import tiny_eval_world as tw  # noqa: E402

from bridgejax import pic2word, predict, terms  # noqa: E402
from bridgejax.data.image import clip_preprocess, decode_image  # noqa: E402
from bridgejax.data.records import open_split  # noqa: E402
from bridgejax.evaluation import retrieval  # noqa: E402
from bridgejax.evaluation.evaluators import REGISTRY, eval_task  # noqa: E402
from bridgejax.engine import Engine, pad_rows  # noqa: E402
from bridgejax.experiment import build  # noqa: E402
from bridgejax.inference import Pipeline  # noqa: E402
from bridgejax.heads import RetrievalHeads  # noqa: E402
from bridgejax.toy import world  # noqa: E402
from bridgejax.toy.scene import IMAGE_SIZE  # noqa: E402

HIDDEN = 8  # f_M's width on the tiny world


def test_mapping_network_count_at_real_size():
  # Pic2Word's IM2TEXT at CLIP ViT-L/14 (CLS width 1024) -> Gemma-2B (2048), middle 512, 2 hidden layers
  by_hand = (1024 * 512 + 512) + (512 * 512 + 512) + (512 * 2048 + 2048)
  assert pic2word.num_params(1024, 2048, 512, 2) == by_hand == 1_838_080
  from bridgejax.param_count import count
  from configs import pic2word as pic2word_config
  result = count(pic2word_config.get_config())  # what `python -m bridgejax.param_count --json` prints
  assert result["by_module"]["ret/pic2word"] == by_hand
  assert result["trainable_params"] == 9_197_057 + by_hand == 11_035_137  # crossatt_k12 + f_M


@pytest.fixture(scope="module")
def p2w():
  """The tiny world's setup with Pic2Word on, its trainable params, and a batch of val images."""
  config = tw.config()
  config.loss.pic2word = 1.0
  config.pic2word.hidden = HIDDEN
  setup = build(config)
  trainable = jax.jit(setup.model.init_trainable)(jax.random.key(2), setup.frozen)  # one program, not op by op
  assert set(trainable["ret"]["pic2word"]) == {"hidden_0", "hidden_1", "out"}
  split = open_split(tw.world()["data"], "val")
  pipe = Pipeline(setup, {**setup.frozen, **trainable}, name="p2w", batch_size=4)
  images = pipe.pixels([split[i]["image"] for i in range(4)])
  return setup, trainable, pipe, images


def _mlp(params, x):
  """f_M in numpy: ReLU hidden layers, then the output layer."""
  for name in ("hidden_0", "hidden_1"):
    x = np.maximum(x @ np.asarray(params[name]["kernel"]) + np.asarray(params[name]["bias"]), 0)
  return x @ np.asarray(params["out"]["kernel"]) + np.asarray(params["out"]["bias"])


def _word_query(setup, params, images, ids, word_position):
  """W_t of [RET] after the text `ids` with the image's pseudo word at `word_position`, built by hand:
  the CLS post-LayerNorm from the tower's own output, f_M in numpy, the LLM through run_llm (each
  JAX stage jitted whole: one compile each instead of one per op)."""
  model = setup.model
  pooled = jax.jit(lambda p, x: model.vision.apply({"params": p}, x).pooler_output)(params["vision"], jnp.asarray(images))
  words = _mlp(params["ret"]["pic2word"], np.asarray(pooled, np.float64)) * model.llm.embed_scale
  embeds = np.array(jax.jit(model.embed_text)(params, jnp.asarray([ids] * len(images), jnp.int32)))
  embeds[:, word_position] = words
  query = jax.jit(lambda p, e, m: model.heads.apply({"params": p["ret"]}, model.run_llm(p, e, m)[1][:, -1],
                                                     method=RetrievalHeads.text_embedding))
  return np.asarray(query(params, jnp.asarray(embeds, jnp.float32), jnp.ones(embeds.shape[:2], jnp.int32)))


def _info_nce(image, text, log_scale):
  image, text = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (image, text))
  logits = np.exp(log_scale) * image @ text.T
  lse = lambda a, axis: np.log(np.exp(a).sum(axis))
  diag = np.diag(logits)
  return ((lse(logits, 1) - diag).mean() + (lse(logits, 0) - diag).mean()) / 2


def _term(model):
  return next(active for active in model.terms if active.name == "pic2word")


def _pic2word_loss(model, params, features, image_emb):
  """The term's value as BridgeModel.loss computes it, from the states it reads."""
  states = terms.States(features=features, image_emb=image_emb, visual_tokens=None, visual_hidden=None,
                        caption_hidden=None, text_hidden=None, caption_tokens=None, patches=None)
  active = _term(model)
  return active.term.loss(model, params, states, active.options)["pic2word"]


def test_pic2word_loss_is_infonce_of_a_photo_of_the_pseudo_word_and_trains_f_m_only(p2w):
  setup, trainable, _, images = p2w
  model, tok = setup.model, setup.tokenizer
  ids = tok.encode("a photo of", add_bos=True) + [tok.pad_id, model.ret_id]
  assert _term(model).options["prompt"] == tuple(ids)
  params = {**setup.frozen, **trainable}
  features = jax.jit(model.vision_features)(params, jnp.asarray(images))
  image_emb = jax.jit(lambda p, f: model.image_embedding(p, model.bridge_output(p, f)))(params, features)
  got = jax.jit(functools.partial(_pic2word_loss, model))(params, features, image_emb)
  text = _word_query(setup, params, images, ids, len(ids) - 2)
  want = _info_nce(np.asarray(image_emb, np.float64), text.astype(np.float64), float(trainable["ret"]["logit_scale"]))
  np.testing.assert_allclose(float(got), want, rtol=2e-4)

  batch = {"image": jnp.asarray(images), **dict(zip(("text_ids", "text_mask"), tok.batch_encode(
      ["a red circle", "two squares", "a blue star", "a cross"], 16, add_bos=True, append_ret=True)))}
  total, metrics = jax.jit(model.loss)(trainable, setup.frozen, batch, jax.random.key(0))
  parts = [metrics[f"{name}_loss"] for name in ("caption", "text", "contrastive", "pic2word")]  # weights 1
  np.testing.assert_allclose(float(total), float(sum(parts)), rtol=1e-6)

  def term(t):  # the Pic2Word term alone, through the whole model
    p = {**setup.frozen, **t}
    f = model.vision_features(p, batch["image"])
    return _pic2word_loss(model, p, f, model.image_embedding(p, model.bridge_output(p, f)))

  grads = jax.jit(jax.grad(term))(trainable)
  mapping = grads["ret"].pop("pic2word")
  assert all(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(mapping))
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads))  # the rest is Pic2Word's frozen CLIP


def test_composed_query_reads_the_template_with_the_pseudo_word(p2w):
  setup, trainable, pipe, images = p2w
  tok, ret = setup.tokenizer, setup.model.ret_id
  ids = tok.encode("a photo of", add_bos=True) + [tok.pad_id] + tok.encode(" , but blue", add_bos=False) + [ret]
  assert pipe.engine.composed_ids("but blue") == (ids, len(tok.encode("a photo of", add_bos=True)))
  want = _word_query(setup, pipe.params, images[:1], ids, ids.index(tok.pad_id))[0]
  folder = tempfile.mkdtemp()
  path = os.path.join(folder, "query.png")
  with open(path, "wb") as f:
    f.write(open_split(tw.world()["data"], "val")[0]["image"])
  np.testing.assert_allclose(pipe.composed_query(path, "but blue"), want / np.linalg.norm(want), atol=1e-5)
  # without the mapping network the query is [visual tokens] + BOS + text + [RET] (tests/test_inference.py)
  plain = Engine(tw.setup_and_params()[0].model, {**setup.frozen, **tw.setup_and_params()[1]}, tok)
  assert plain.composed_ids("but blue") == (tok.encode("but blue", add_bos=True) + [ret], -1)


def test_composed_ranks_equal_a_numpy_ranking():
  rng = np.random.default_rng(0)
  gallery = rng.standard_normal((9, 4)).astype(np.float32)
  gallery[5] = gallery[2]  # a tie: the lower index ranks first
  queries = rng.standard_normal((6, 4)).astype(np.float32)
  queries[0] = gallery[3] + gallery[1]  # its reference (1) would outrank its target (3) if it were kept
  targets, references = np.array([3, 5, 2, 0, 8, 4]), np.array([1, 0, 7, 1, 2, 6])
  want = []
  for q, t, r in zip(queries, targets, references):
    order = [g for g in np.argsort(-(gallery @ q), kind="stable") if g != r]
    want.append(order.index(t) + 1)
  got = retrieval.composed_ranks(queries, gallery, targets, references, chunk_size=4)
  np.testing.assert_array_equal(got, want)
  recalls = retrieval.recall_from_ranks(got, (1, 5))
  assert recalls == {1: np.mean(np.asarray(want) <= 1), 5: np.mean(np.asarray(want) <= 5)}
  with pytest.raises(ValueError, match="other than its query's reference"):
    retrieval.composed_ranks(queries, gallery, references, references)


def test_toy_benchmark_is_deterministic_and_changes_exactly_the_named_attribute():
  seen = set()
  for i in range(30):
    ex = world.composed_example("val", i)
    assert ex == world.composed_example("val", i)  # the same bytes, alone (random access)
    ref, target = ex["reference_scene"], ex["target_scene"]
    assert len(ref["shapes"]) == 1
    changed = {k for k in ("color", "kind") if ref["shapes"][0][k] != target["shapes"][0][k]}
    changed |= {"background"} if ref["background"] != target["background"] else set()
    assert changed == {ex["attribute"]} and ref["shapes"][0]["row"] == target["shapes"][0]["row"]
    new = target["background"] if ex["attribute"] == "background" else target["shapes"][0][ex["attribute"]]
    assert new == ex["value"] and ex["modification"] == world.modification_text(ex["attribute"], new)
    a, b = (np.asarray(decode_image(ex[k])) for k in ("reference_image", "target_image"))
    assert a.shape == b.shape == (IMAGE_SIZE,) * 2 + (3,) and np.any(a != b)
    seen.add(ex["attribute"])
  assert seen == set(world.COMPOSE_ATTRIBUTES)
  assert world.composed_example("val", 3, seed=1) != world.composed_example("val", 3)
  assert world.modification_text("kind", "star") == "but a star"
  # prepared: query i's reference and target are rows 2i and 2i + 1 of the gallery table
  data = tw.world()["data"]
  queries = open_split(data, "compose_val")
  gallery = open_split(data, "compose_val-images")
  assert len(queries) == 6 and len(gallery) == 12
  ex = world.composed_example("val", 4)
  assert (queries[4]["image_index"], queries[4]["target_index"]) == (8, 9)
  assert queries[4]["image"] == gallery[8]["image"] == ex["reference_image"] and gallery[9]["image"] == ex["target_image"]


def test_compose_eval_without_the_mapping_network_ranks_the_bridge_queries():
  setup, trainable = tw.setup_and_params()
  engine = Engine(setup.model, {**setup.frozen, **trainable}, setup.tokenizer)
  cfg = ml_collections.ConfigDict(eval_task("compose", data=tw.world()["data"], split="compose_val", batch_size=4,
                                            max_examples=5, progress=False))
  result = REGISTRY["compose"].run(engine, tw.world()["data"], "compose_val", cfg)
  assert result.counts == {"queries": 5, "gallery": 10} and result.settings["query_template"] == "[visual tokens] {} [RET]"
  # the ranks are the numpy ranking of the engine's own embeddings
  split = open_split(tw.world()["data"], "compose_val")
  gallery_split = open_split(tw.world()["data"], "compose_val-images")
  pixels = lambda records: np.stack([clip_preprocess(decode_image(r["image"]), 28) for r in records])
  _, gallery = engine.encode(pixels([gallery_split[i] for i in range(10)]))
  gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
  for p in result.predictions:
    ids, word = engine.composed_ids(split[p["index"]]["modification"])
    row, mask = pad_rows([ids], 16, setup.tokenizer.pad_id)
    q = engine.composed_query(pixels([split[p["index"]]]), row, mask, [word])[0]
    scores = gallery @ (q / np.linalg.norm(q))
    order = [g for g in np.argsort(-scores, kind="stable") if g != p["reference_index"]]
    assert p["rank"] == order.index(p["target_index"]) + 1 and p["top_gallery"] == order[:5]
  ranks = np.asarray([p["rank"] for p in result.predictions])
  assert result.metrics["R@1"] == pytest.approx(100 * np.mean(ranks <= 1))
  assert result.metrics["R@10"] == pytest.approx(100 * np.mean(ranks <= 10))
  # Pic2Word's baselines: the reference's own embedding, the modification's text embedding, their sum
  unit = lambda x: x / np.linalg.norm(x)
  tok, ret = setup.tokenizer, setup.model.ret_id
  baselines = {"image_only": [], "text_only": [], "image_plus_text": []}
  for p in result.predictions:
    ids = tok.encode(split[p["index"]]["modification"], add_bos=True) + [ret]
    row, mask = pad_rows([ids], 16, tok.pad_id)
    image, text = gallery[p["reference_index"]], unit(engine.text_embedding(row, mask)[0])
    for name, q in (("image_only", image), ("text_only", text), ("image_plus_text", unit(image + text))):
      order = [g for g in np.argsort(-(gallery @ q), kind="stable") if g != p["reference_index"]]
      baselines[name].append(order.index(p["target_index"]) + 1)
  for name, got in baselines.items():
    for k in (1, 5, 10):
      assert result.metrics[f"{name}_R@{k}"] == pytest.approx(100 * np.mean(np.asarray(got) <= k), abs=1e-6), name


def test_train_eval_and_predict_compose_with_pic2word(tmp_path, capsys, monkeypatch):
  from bridgejax.main import run
  w = tw.world()
  config = tw.config()
  config.update_from_flattened_dict({"loss.pic2word": 1.0, "pic2word.hidden": HIDDEN, "total_steps": 2,
                                     "log_every_steps": 1, "checkpoint_every_steps": 2, "data.val_split": "",
                                     "tensorboard": False, "eval_after_training": True})
  config.evals = ml_collections.ConfigDict(
      {"compose": eval_task("compose", data=w["data"], split="compose_val", batch_size=4, progress=False)})
  workdir = str(tmp_path / "run")
  state = run(config, workdir)["state"]
  assert "pic2word" in state.params["ret"]
  logged = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert all(np.isfinite(r["train/pic2word_loss"]) for r in logged)
  saved = json.load(open(os.path.join(workdir, "eval", "compose.json")))
  assert saved["counts"] == {"queries": 6, "gallery": 12} and saved["checkpoint_step"] == 2
  assert set(saved["metrics"]) >= {"R@1", "R@5", "R@10"} and all(0 <= v <= 100 for v in saved["metrics"].values())
  assert saved["settings"]["query_template"] == "a photo of * , {} [RET]"

  folder = str(tmp_path / "gallery")
  os.makedirs(folder)
  gallery = open_split(w["data"], "compose_val-images")
  for i in range(4):
    with open(os.path.join(folder, f"g{i}.png"), "wb") as f:
      f.write(gallery[i]["image"])
  made = []  # the Pipeline predict builds from the run
  from_workdir = Pipeline.from_workdir.__func__
  monkeypatch.setattr(Pipeline, "from_workdir", classmethod(lambda cls, *a, **k: made.append(from_workdir(cls, *a, **k))
                                                            or made[-1]))
  capsys.readouterr()
  query = os.path.join(folder, "g0.png")
  assert predict.main(["--workdir", workdir, "--json", "compose", "--index", folder, query, "but blue", "-k", "5"]) == 0
  hits = json.loads(capsys.readouterr().out)
  assert len(hits) == 3 and query not in [h["path"] for h in hits]  # the query image is left out
  pipe = made[0]
  assert _term(pipe.model).options["hidden"] == HIDDEN and "pic2word" in pipe.params["ret"]
  index = pipe.build_index(folder)
  scores = index.embeddings @ pipe.composed_query(query, "but blue")
  assert [h["path"] for h in hits] == [index.paths[i] for i in np.argsort(-scores, kind="stable") if i != 0]
