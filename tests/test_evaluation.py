"""Eval task runners, eval.py, the report and the table on tiny random backbones and a tiny toy
dataset (an untrained bridge: the numbers mean nothing; shapes, files and exact equalities do)."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import tiny_eval_world as tw  # noqa: E402

from bridgejax import losses  # noqa: E402
from bridgejax.data.image import clip_preprocess, decode_image  # noqa: E402
from bridgejax.data.records import RecordError, open_split  # noqa: E402
from bridgejax.evaluation import captioning, retrieval, vqa  # noqa: E402
from bridgejax.evaluation.evaluators import REGISTRY, check_task, visdial as visdial_task  # noqa: E402
from bridgejax.evaluation.validation import quick_validation  # noqa: E402
from bridgejax.engine import Engine, pad_rows  # noqa: E402
from bridgejax.losses import l2_normalize  # noqa: E402
from bridgejax.generate import generate  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def env():
  setup, trainable = tw.setup_and_params()
  params = {**setup.frozen, **trainable}
  engine = Engine(setup.model, params, setup.tokenizer, max_new_tokens=6)
  return setup, params, engine, tw.config().evals, tw.world()["data"]


def _pixels(split, indices, size=28):
  return np.stack([clip_preprocess(decode_image(split[i]["image"]), size) for i in indices])


def _direct_nll(setup, params, visual, ctx, cand):
  """Summed CE of `cand` after [visual] + ctx, from one full model.run_llm pass per sequence."""
  model = setup.model
  rows = [c + x for c, x in zip(ctx, cand)]
  ids, mask = pad_rows(rows, max(map(len, rows)), setup.tokenizer.pad_id)
  embeds, full, _, _ = model.caption_inputs(params, jnp.asarray(visual), jnp.asarray(ids), jnp.asarray(mask))
  logits, _ = model.run_llm(params, embeds, full)
  nll = np.asarray(losses.token_nll(logits[:, :-1], jnp.asarray(np.pad(ids, ((0, 0), (visual.shape[1], 0))))[:, 1:]))
  k = visual.shape[1]
  return np.asarray([nll[i, k + len(c) - 1: k + len(c) - 1 + len(x)].sum() for i, (c, x) in enumerate(zip(ctx, cand))])


def test_candidate_nll_equals_full_forward_ce(env):
  setup, params, engine, _, data = env
  tok = setup.tokenizer
  split = open_split(data, "visdial_val")
  tokens, _ = engine.encode(_pixels(split, [0, 1]))
  dialogs = [split[0], split[1]]
  ctx = [tok.encode(visdial_task.it2t_context(d, r, with_caption=c), add_bos=True)
         for d, r, c in ((dialogs[0], 3, False), (dialogs[1], 0, True))]
  cands = [[tok.encode(" " + o, add_bos=False) for o in d["rounds"][r]["options"][:5]]
           for d, r in ((dialogs[0], 3), (dialogs[1], 0))]
  ctx_ids, ctx_mask = pad_rows(ctx, 128, tok.pad_id)
  cand = [pad_rows(c, 24, tok.pad_id) for c in cands]
  got = engine.candidate_nll(tokens, ctx_ids, ctx_mask, np.stack([c[0] for c in cand]), np.stack([c[1] for c in cand]))
  assert got.shape == (2, 5)
  for r in range(2):
    want = _direct_nll(setup, params, np.repeat(np.asarray(tokens)[r:r + 1], 5, 0), [ctx[r]] * 5, cands[r])
    np.testing.assert_allclose(got[r], want, rtol=2e-4, atol=2e-4)
    np.testing.assert_array_equal(np.argsort(got[r], kind="stable"), np.argsort(want, kind="stable"))


def test_visdial_it2t_ranking_equals_direct_ce_and_t2i(env):
  setup, params, engine, cfg, data = env
  cfg = tw.config(max_examples=2, visdial={"rounds_per_step": 3}).evals.visdial
  result = REGISTRY["visdial"].run(engine, data, "visdial_val", cfg)
  assert result.counts["dialogs"] == 2 and result.counts["rounds"] == 20
  for key in ("R@1", "R@5", "R@10", "MRR", "mean_rank", "NDCG", "t2i_R@1", "i2t_R@1"):
    assert key in result.metrics and np.isfinite(result.metrics[key])
  # Round 2 of dialog 1, all 100 candidates, straight through model.run_llm.
  tok = setup.tokenizer
  split = open_split(data, "visdial_val")
  dialog, r = split[1], 2
  tokens, image_emb = engine.encode(_pixels(split, [1]))
  ctx = tok.encode(visdial_task.it2t_context(dialog, r, with_caption=False), add_bos=True)
  options = dialog["rounds"][r]["options"]
  nll = _direct_nll(setup, params, np.repeat(np.asarray(tokens), len(options), 0), [ctx] * len(options),
                    [tok.encode(" " + o, add_bos=False) for o in options])
  pred = result.predictions[1]["rounds"][r]
  gt = dialog["rounds"][r]["gt_index"]
  assert pred["predicted"] == options[int(np.argmin(nll))]
  ranks = np.empty(len(options), int)
  ranks[np.argsort(nll, kind="stable")] = np.arange(1, len(options) + 1)
  assert pred["gt_rank"] == ranks[gt]
  # T2I: the dialog embedding is the text pass over the FROMAGe dialog text + [RET].
  ids, mask = tok.batch_encode([visdial_task.t2i_text(dialog, with_caption=False)], 512, append_ret=True)
  assert ids[0, int(mask.sum()) - 1] == setup.model.ret_id
  assert result.predictions[1]["t2i_rank"] in (1, 2)


def test_visdial_fromage_scoring_is_unshifted_ce_with_a_bos_per_answer(env):
  """scoring="fromage" against FROMAGe's eval_visdial_generation.py recomputed in numpy: context
  '...\\nA: ', BOS + answer, log-softmax of the logits at each answer position taken at that same
  position's token, summed over the answer (its BOS included)."""
  setup, params, engine, _, data = env
  cfg = tw.config(visdial={"max_examples": 1, "rounds_per_step": 3, "scoring": "fromage"}).evals.visdial
  result = REGISTRY["visdial"].run(engine, data, "visdial_val", cfg)
  assert "unshifted" in result.notes["scoring"]
  tok, model = setup.tokenizer, setup.model
  split = open_split(data, "visdial_val")
  dialog, r = split[0], 2
  contexts = []  # FROMAGe's loop over the rounds, as its script builds them
  for i in range(r + 1):
    if i > 0:
      contexts.append("A: " + dialog["rounds"][i - 1]["answer"])
    contexts.append("Q: " + dialog["rounds"][i]["question"].rstrip("?") + "?")
  fromage = visdial_task.SCORINGS["fromage"]
  assert visdial_task.it2t_context(dialog, r, with_caption=False) + fromage.answer_cue == "\n".join(contexts) + "\nA: "
  assert fromage.candidate_prefix == "" and fromage.candidate_bos
  ctx = tok.encode("\n".join(contexts) + "\nA: ", add_bos=True)
  options = dialog["rounds"][r]["options"]
  answers = [tok.encode(o, add_bos=True) for o in options]
  assert all(a[0] == tok.bos_id for a in answers)
  tokens, _ = engine.encode(_pixels(split, [0]))
  ids, mask = pad_rows([ctx + a for a in answers], len(ctx) + max(map(len, answers)), tok.pad_id)
  embeds, full, _, _ = model.caption_inputs(params, jnp.repeat(jnp.asarray(tokens), len(options), 0),
                                            jnp.asarray(ids), jnp.asarray(mask))
  logits = np.asarray(model.run_llm(params, embeds, full)[0], np.float64)  # (N, K + T, V)
  log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  start = tokens.shape[1] + len(ctx)  # the answer's BOS
  want = np.asarray([-sum(log_probs[n, start + j, t] for j, t in enumerate(a)) for n, a in enumerate(answers)])
  ctx_ids, ctx_mask = pad_rows([ctx], 128, tok.pad_id)
  cand_ids, cand_mask = pad_rows(answers, 24, tok.pad_id)
  got = engine.candidate_nll(tokens, ctx_ids, ctx_mask, cand_ids[None], cand_mask[None], unshifted=True)[0]
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
  shifted = engine.candidate_nll(tokens, ctx_ids, ctx_mask, cand_ids[None], cand_mask[None])[0]
  assert np.abs(shifted - want).max() > 1.0  # the two scorings differ: the test can tell them apart
  # The task's choice and rank agree, up to near-ties: every candidate's BOS term is the same, so
  # FROMAGe's scores of short answers lie close together (here within ~1e-2).
  pred, near = result.predictions[0]["rounds"][r], 1e-3
  gt = want[dialog["rounds"][r]["gt_index"]]
  assert want[options.index(pred["predicted"])] <= want.min() + near
  assert np.sum(want < gt - near) + 1 <= pred["gt_rank"] <= np.sum(want < gt + near) + 1


def test_retrieval_uses_model_embeddings(env):
  setup, params, engine, _, data = env
  cfg = tw.config(max_examples=3).evals.retrieval
  result = REGISTRY["retrieval"].run(engine, data, "val", cfg)
  assert result.counts == {"images": 3, "texts": 15}
  split = open_split(data, "val")
  out = setup.model.encode_images(params, jnp.asarray(_pixels(split, range(3))))
  images = setup.model.image_embedding(params, out)
  captions = [c for i in range(3) for c in split[i]["captions"][:5]]
  ids, mask = setup.tokenizer.batch_encode(captions, 24, append_ret=True)
  _, texts = setup.model.text_embedding(params, jnp.asarray(ids), jnp.asarray(mask))
  want = retrieval.recall_at_k(l2_normalize(images), l2_normalize(texts), np.repeat(np.arange(3), 5))
  assert result.metrics == pytest.approx({k: 100 * v for k, v in want.items()})  # R@k in percent
  ranks = retrieval.ranks(l2_normalize(images), l2_normalize(texts), np.repeat(np.arange(3), 5))
  assert [p["i2t_rank"] for p in result.predictions] == ranks["i2t"].tolist()
  assert [q["t2i_rank"] for p in result.predictions for q in p["queries"]] == ranks["t2i"].tolist()


def test_caption_is_generate_decoded_and_cut(env):
  setup, params, engine, _, data = env
  cfg = tw.config(max_examples=3, caption_prompt="a picture of").evals.caption
  result = REGISTRY["caption"].run(engine, data, "val", cfg)
  assert set(result.metrics) >= set(captioning.METRICS) | {"SPICE", "empty_fraction"}
  assert result.metrics["SPICE"] is None and "SPICE" in result.notes
  assert result.counts["images"] == 3 and len(result.predictions) == 3
  split = open_split(data, "val")
  tok = setup.tokenizer
  tokens, _ = engine.encode(_pixels(split, range(3)))
  ids, mask = tok.batch_encode(["a picture of"] * 3, 32)
  embeds, full, _, _ = setup.model.caption_inputs(params, tokens, jnp.asarray(ids), jnp.asarray(mask))
  new = np.asarray(generate(setup.model.llm, params["llm"], inputs_embeds=embeds, attention_mask=full,
                            extra_embeddings=params["ret"]["ret_embedding"], max_new_tokens=6,
                            eos_token_ids=(tok.eos_id, setup.model.ret_id)))
  for row, p in zip(new, result.predictions):
    stop = [i for i, t in enumerate(row.tolist()) if t in (tok.eos_id, setup.model.ret_id)]
    text = tok.decode(row[:stop[0]] if stop else row)
    assert p["generated"] == text and p["caption"] == captioning.cut_caption(text)
    assert p["references"] == split[p["index"]]["captions"]


def test_vqa_truncates_and_scores(env):
  setup, params, engine, _, data = env
  result = REGISTRY["vqa"].run(engine, data, "vqa_val", tw.config(max_examples=6).evals.vqa)
  assert set(result.metrics) == {"overall", "yes/no", "number", "other"}
  assert result.counts["questions"] == 6
  for p in result.predictions:
    assert p["answer"] == vqa.truncate_to_reference_length(p["generated"], p["answers"])
  want = vqa.score({p["question_id"]: p["answer"] for p in result.predictions},
                   {p["question_id"]: {"answers": p["answers"], "answer_type": p["answer_type"]}
                    for p in result.predictions})
  assert result.metrics == want


def test_quick_validation_matches_the_training_loss(env):
  setup, params, _, _, data = env
  trainable = {k: params[k] for k in ("bridge", "ret")}
  out = quick_validation(setup, trainable)  # 5 examples in batches of 4: the last one padded
  assert set(out) == {"caption_loss", "text_loss", "contrastive_loss", "examples", "i2t_R@1", "i2t_R@5",
                      "t2i_R@1", "t2i_R@5"}
  assert all(isinstance(v, float) and np.isfinite(v) for v in out.values()) and out["examples"] == 5
  split = open_split(data, "val")
  ids, mask = setup.tokenizer.batch_encode([split[i]["captions"][0] for i in range(5)], 24, append_ret=True)
  batch = {"image": jnp.asarray(_pixels(split, range(5))), "text_ids": jnp.asarray(ids), "text_mask": jnp.asarray(mask)}
  model = dataclasses.replace(setup.model, concat_prob=0.0)
  _, metrics = jax.jit(lambda t, f, b: model.loss(t, f, b, jax.random.key(0)))(trainable, setup.frozen, batch)
  assert out["caption_loss"] == pytest.approx(float(metrics["caption_loss"]), rel=1e-4)
  assert out["text_loss"] == pytest.approx(float(metrics["text_loss"]), rel=1e-4)
  assert out == quick_validation(setup, trainable)  # cached jit, same numbers


def test_errors_name_the_problem_and_the_fix(env):
  from bridgejax.evaluation import evaluators
  from bridgejax.evaluation import run
  with pytest.raises(ValueError, match="unknown eval task.*'captioning'.*config.evals has .*'caption'"):
    evaluators.eval_tasks(tw.config(), "caption,captioning")
  with pytest.raises(RecordError, match="no vqa split named 'val'.*it has: .*vqa_val \\(vqa\\).*evals.vqa.split"):
    evaluators.task_data("vqa", tw.config(vqa={"split": "val"}).evals.vqa)  # no vqa_<split> guess
  assert evaluators.task_data("visdial", tw.config().evals.visdial) == (tw.world()["data"], "visdial_val")
  with pytest.raises(ValueError, match=r"^--config.evals.visdial.scoring='fromag' is unknown; choose from "
                                       r"\['fromage', 'next_token'\]$"):
    run.evaluate(tw.config(visdial={"scoring": "fromag"}), tempfile.mkdtemp())  # before any checkpoint is read
  with pytest.raises(ValueError, match=r"^--config.evals.caption.image_resize='crop' is unknown"):
    check_task("caption", tw.config(caption={"image_resize": "crop"}).evals.caption)
  setup, _ = tw.setup_and_params()
  with pytest.raises(FileNotFoundError, match="available steps: \\[3\\]"):
    run.load_params(setup, tw.workdir_with_checkpoint(), 7)
  with pytest.raises(FileNotFoundError, match="has no checkpoints/"):
    run.load_params(setup, tempfile.mkdtemp(), None)


# --------------------------------------------------------------------------- eval.py end to end


def _as_val2017(data_dir: str, out: str) -> str:
  """The tiny world with its val split also named val2017, the thesis protocol's split (links to its files)."""
  os.makedirs(out, exist_ok=True)
  for name in os.listdir(data_dir):
    if name != "dataset_info.json" and not os.path.exists(os.path.join(out, name)):
      os.symlink(os.path.join(data_dir, name), os.path.join(out, name))
  with open(os.path.join(data_dir, "dataset_info.json")) as f:
    info = json.load(f)
  info["splits"]["val2017"] = info["splits"]["val"]
  with open(os.path.join(out, "dataset_info.json"), "w") as f:
    json.dump(info, f)
  return out


@pytest.fixture(scope="module")
def evaluated():
  """python eval.py on the tiny world, all four tasks, in a subprocess (as a user runs it): the
  thesis protocol (caption and retrieval on all of "val2017", squashed, greedy, 32 tokens), VQA and
  VisDial on 5 examples (so "custom"), VisDial scored as FROMAGe's script does."""
  w = tw.world()
  workdir = tw.workdir_with_checkpoint()
  val2017 = _as_val2017(w["data"], os.path.join(w["root"], "data_val2017"))
  config_file = os.path.join(w["root"], "tiny_config.py")
  with open(config_file, "w") as f:
    f.write(f"""from configs import base


def get_config():
  c = base.get_config("eval=thesis")
  c.name = "tiny"
  c.vision.path, c.llm.path = {w['clip']!r}, {w['gemma']!r}
  c.compute_dtype = c.frozen_param_dtype = "float32"
  c.bridge.k, c.ret.embed_dim, c.data.dir, c.data.num_workers = 2, 16, {w['data']!r}, 0
  for task in c.evals.values():
    task.update(batch_size=4, report_examples=3, progress=False)
  c.evals.caption.data = c.evals.retrieval.data = {val2017!r}
  c.evals.vqa.update(data={w['data']!r}, split="vqa_val", max_new_tokens=4)
  c.evals.visdial.update(data={w['data']!r}, split="visdial_val")
  return c
""")
  env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), "--config", config_file, "--workdir", workdir,
                         "--checkpoint", "3", "--config.evals.vqa.max_examples=5",
                         "--config.evals.visdial.max_examples=5", "--config.evals.visdial.scoring=fromage"],
                        capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir, proc.stdout


def test_eval_py_writes_valid_json(evaluated):
  workdir, stdout = evaluated
  assert "tiny @ step 3" in stdout and "report.html" in stdout
  expected = {"caption": ("BLEU-4", "images", 6, "val2017", "thesis"),
              "retrieval": ("t2i_R@1", "images", 6, "val2017", "thesis"),
              "vqa": ("overall", "questions", 5, "vqa_val", "custom"),
              "visdial": ("MRR", "dialogs", 5, "visdial_val", "custom")}
  for task, (metric, count, n, split, protocol) in expected.items():
    with open(os.path.join(workdir, "eval", f"{task}.json")) as f:
      summary = json.load(f)
    assert summary["task"] == task and summary["config"] == "tiny" and summary["checkpoint_step"] == 3
    assert summary["dataset"]["split"] == split and os.path.isdir(summary["dataset"]["dir"])
    assert summary["protocol"] == protocol and summary["type"] == task and summary["settings"]["split"] == split
    assert summary["counts"][count] == n and summary["wall_time_s"] > 0 and metric in summary["metrics"]
    with open(os.path.join(workdir, "eval", f"{task}_predictions.json")) as f:
      preds = json.load(f)
    assert len(preds["predictions"]) == n and preds["checkpoint_step"] == 3
  caption = json.load(open(os.path.join(workdir, "eval", "caption.json")))["settings"]
  assert (caption["image_resize"], caption["num_beams"], caption["max_new_tokens"]) == ("squash", 1, 32)
  visdial = json.load(open(os.path.join(workdir, "eval", "visdial.json")))
  assert visdial["settings"]["scoring"] == "fromage" and "unshifted" in visdial["notes"]["scoring"]


def test_table_cli(evaluated):
  workdir, _ = evaluated
  other = os.path.join(os.path.dirname(workdir), "copy_of_run")
  shutil.rmtree(other, ignore_errors=True)
  shutil.copytree(os.path.join(workdir, "eval"), os.path.join(other, "eval"))
  from bridgejax.evaluation import table
  text = table.table([workdir, other])
  lines = text.splitlines()
  assert len(lines) == 4 and "B-4" in lines[0] and "VD R@1" in lines[0] and "(copy_of_run)" in lines[3]
  md = table.table([workdir], markdown=True, tasks=["caption"], metrics=["BLEU-4", "CIDEr"])
  assert md.splitlines()[0] == "| run | protocol | seeds | B-4 | CIDEr |"
  rows = json.loads(table.table([workdir], as_json=True))
  assert rows[0]["retrieval/t2i_R@1"] is not None and rows[0]["caption/SPICE"] is None
  assert table.main([tempfile.mkdtemp()]) == 2


def test_report_renders_in_headless_chromium(evaluated):
  workdir, _ = evaluated
  report = os.path.join(workdir, "eval", "report.html")
  page = open(report, encoding="utf-8").read()
  images = page.count("<img ")
  # captions 3, retrieval 3 rows x (1 + 5 retrieved), vqa 3, visdial 3 x (1 + 5): all base64 inline
  assert images == 3 + 3 * 6 + 3 + 3 * 6 and page.count('src="data:image/png;base64,') == images
  chromium = shutil.which("chromium") or shutil.which("chromium-browser")
  if chromium is None:
    pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
  out = tempfile.mkdtemp()
  shot = os.path.join(out, "report.png")
  subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  f"--user-data-dir={os.path.join(out, 'profile')}", f"--screenshot={shot}", "--window-size=1200,1600",
                  "--hide-scrollbars", f"file://{report}"], capture_output=True, timeout=120, check=True)
  from PIL import Image
  pixels = np.asarray(Image.open(shot).convert("RGB"), np.int32)
  assert pixels.shape == (1600, 1200, 3)
  # Non-blank, and the thumbnails are there: many distinct colours, and the toy backgrounds'
  # gray (128) or saturated shape colours, which text on white never has.
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500
  saturated = (pixels.max(-1) - pixels.min(-1)) > 120
  assert saturated.mean() > 0.002
