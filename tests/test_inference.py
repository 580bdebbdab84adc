"""The inference API and `python -m bridgejax.predict` on tiny random backbones."""

import json
import os
import sys
import tempfile

import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import tiny_eval_world as tw  # noqa: E402

from bridgejax import predict  # noqa: E402
from bridgejax.data.records import open_split  # noqa: E402
from bridgejax.inference import Hit, ImageIndex, Pipeline  # noqa: E402
from bridgejax.heads import RetrievalHeads  # noqa: E402


@pytest.fixture(scope="module")
def pipe_and_images():
  setup, trainable = tw.setup_and_params()
  pipe = Pipeline(setup, {**setup.frozen, **trainable}, name="tiny@3", max_new_tokens=5, batch_size=4)
  folder = tempfile.mkdtemp()
  split = open_split(tw.world()["data"], "val")
  for i in range(5):  # 5 images, batch 4: the index pads its last batch
    with open(os.path.join(folder, f"img{i}.png"), "wb") as f:
      f.write(split[i]["image"])
  return pipe, folder


def _ret_state_embedding(pipe, visual, ids, position):
  """W_t of the final hidden state at `position` of [visual] + ids, straight through the model."""
  model, params = pipe.model, pipe.params
  mask = jnp.ones((1, len(ids)), jnp.int32)
  ids = jnp.asarray([ids], jnp.int32)
  embeds, full = model.embed_text(params, ids), mask  # every token real, [RET]s included
  if visual is not None:
    embeds = jnp.concatenate([jnp.asarray(visual, embeds.dtype), embeds], axis=1)
    full = jnp.ones(embeds.shape[:2], jnp.int32)
  _, hidden = model.run_llm(params, embeds, full)
  emb = model.heads.apply({"params": params["ret"]}, hidden[:, position], method=RetrievalHeads.text_embedding)
  emb = np.asarray(emb[0])
  return emb / np.linalg.norm(emb)


def test_index_and_retrieval(pipe_and_images, tmp_path):
  pipe, folder = pipe_and_images
  index = pipe.build_index(folder)
  assert len(index) == 5 and index.embeddings.shape == (5, 16)
  np.testing.assert_allclose(np.linalg.norm(index.embeddings, axis=1), 1.0, rtol=1e-5)
  direct_tokens, direct = pipe.engine.encode(pipe.pixels(index.paths))
  direct = np.asarray(direct) / np.linalg.norm(direct, axis=1, keepdims=True)
  np.testing.assert_allclose(index.embeddings, direct, atol=1e-5)
  tokens, _ = pipe._encode(index.paths)  # the visual tokens of the same batches (4, then 1 padded to 4)
  np.testing.assert_allclose(tokens, direct_tokens, atol=1e-5)
  saved = ImageIndex.load(index.save(str(tmp_path / "index.npz")))
  assert saved.paths == index.paths and saved.model == "tiny@3"

  text = "a red circle above a blue square"
  hits = pipe.retrieve(text, index, k=3)
  ids = pipe.tokenizer.encode(text) + [pipe.model.ret_id]
  query = _ret_state_embedding(pipe, None, ids, len(ids) - 1)
  scores = index.embeddings @ query
  assert [h.path for h in hits] == [index.paths[i] for i in np.argsort(-scores, kind="stable")[:3]]
  np.testing.assert_allclose([h.score for h in hits], np.sort(scores)[::-1][:3], atol=1e-5)

  # Composed: [visual tokens] + BOS + text + [RET]; the query image itself is left out.
  query_image = index.paths[2]
  hits = pipe.retrieve_composed(query_image, "but blue", index, k=5)
  assert len(hits) == 4 and query_image not in [h.path for h in hits]
  visual, _ = pipe.engine.encode(pipe.pixels([query_image]))
  ids = pipe.tokenizer.encode("but blue") + [pipe.model.ret_id]
  want = _ret_state_embedding(pipe, visual, ids, visual.shape[1] + len(ids) - 1)
  np.testing.assert_allclose(pipe.composed_query(query_image, "but blue"), want, atol=1e-5)


def test_a_run_saved_before_newer_keys_predicts_and_evaluates_as_before(pipe_and_images, tmp_path, capsys):
  """A config.json written without the keys added since (stage, representation_share, remat,
  data.image_resize, ...) loads with their defaults (config_schema.complete): the run predicts,
  evaluates, passes the resume check against today's config and exports as the same run saved today."""
  import shutil
  from bridgejax import export
  from bridgejax.evaluation.run import evaluate
  from bridgejax.inference import load_config
  from bridgejax.train.loop import changed_keys
  pipe, folder = pipe_and_images
  new, old = str(tmp_path / "new"), str(tmp_path / "old")
  for workdir in (new, old):
    shutil.copytree(tw.workdir_with_checkpoint(), workdir)
  with open(os.path.join(old, "config.json")) as f:
    saved = json.load(f)
  for key in ("stage", "representation_share", "remat", "visual_token_scale", "token_type_embeddings",
              "matmul_precision", "wandb"):
    del saved[key]
  del saved["data"]["image_resize"], saved["data"]["features"], saved["vision"]["cls_equivalent"]
  with open(os.path.join(old, "config.json"), "w") as f:
    json.dump(saved, f)
  config = load_config(None, old)
  assert (config.stage, config.representation_share, config.remat, config.data.image_resize) == (
      "generative", 0.0, "none", "clip")
  assert json.loads(config.to_json()) == json.loads(load_config(None, new).to_json())
  assert changed_keys(pipe.setup.config, old) == []  # resuming it with today's config changes nothing

  image = os.path.join(folder, "img0.png")
  loaded = Pipeline.from_workdir(old, max_new_tokens=5, batch_size=4)
  assert loaded.image_resize == "clip" and loaded.caption(image) == pipe.caption(image)
  np.testing.assert_allclose(loaded.build_index(folder).embeddings, pipe.build_index(folder).embeddings, atol=1e-6)
  assert predict.main(["--workdir", old, "--json", "caption", image]) == 0
  capsys.readouterr()

  results = [evaluate(load_config(None, w), w, tasks=["retrieval"], setup=pipe.setup, report=False, quiet=True)
             for w in (new, old)]
  assert results[0]["retrieval"]["metrics"] == results[1]["retrieval"]["metrics"]
  assert export.export(old, str(tmp_path / "exported"))["config"] == "tiny"


def test_caption_and_answer_are_strings(pipe_and_images):
  pipe, folder = pipe_and_images
  image = os.path.join(folder, "img0.png")
  caps = pipe.captions([image, image], prompt="a picture of")
  assert len(caps) == 2 and caps[0] == caps[1] and caps[0] == pipe.caption(image, prompt="a picture of")
  answer = pipe.answer(image, "is there a red hexagon?")
  assert isinstance(answer, str) and "\n" not in answer


def test_interleaved_generation_retrieves_at_ret(pipe_and_images, monkeypatch):
  pipe, folder = pipe_and_images
  index = pipe.build_index(folder)
  tok, ret = pipe.tokenizer, pipe.model.ret_id
  words = tok.encode(" red circle", add_bos=False)
  more = tok.encode(" and", add_bos=False)
  fake = np.asarray([words + [ret] + more + [ret, tok.eos_id, 5, 6]])  # what "generation" emits
  monkeypatch.setattr(pipe.engine, "generate", lambda *a, **k: fake)
  image = os.path.join(folder, "img1.png")
  segments = pipe.generate("Q: show me\nA:", image=image, index=index)
  assert [type(s) for s in segments] == [str, Hit, str, Hit]
  assert segments[0] == tok.decode(words) and segments[2] == tok.decode(more)
  # The first [RET]'s embedding: its final hidden state over [visual] + BOS + prompt + generated.
  prompt = tok.encode("Q: show me\nA:")
  visual, _ = pipe.engine.encode(pipe.pixels([image]))
  ids = prompt + words + [ret]
  emb = _ret_state_embedding(pipe, visual, ids, visual.shape[1] + len(ids) - 1)
  best = int(np.argmax(index.embeddings @ emb))
  assert segments[1].path == index.paths[best]
  assert pipe.generate("Q: show me\nA:", image=image) == [segments[0], "[RET]", segments[2], "[RET]"]


def test_predict_cli(pipe_and_images, capsys):
  _, folder = pipe_and_images
  workdir = tw.workdir_with_checkpoint()
  assert predict.main(["--workdir", workdir, "--json", "retrieve", "--index", folder, "a red hexagon", "-k", "2"]) == 0
  hits = json.loads(capsys.readouterr().out)
  assert len(hits) == 2 and all(os.path.dirname(h["path"]) == folder for h in hits)
  assert predict.main(["--workdir", workdir, "--step", "9", "caption", os.path.join(folder, "img0.png")]) == 2
  assert "available steps: [3]" in capsys.readouterr().err


def test_predict_refuses_a_prompt_longer_than_the_context_in_one_line(pipe_and_images, capsys):
  _, folder = pipe_and_images
  workdir = tw.workdir_with_checkpoint()
  capsys.readouterr()
  question = "is it red? " * 1000  # 10k characters; it hung for minutes and printed nothing
  assert predict.main(["--workdir", workdir, "answer", os.path.join(folder, "img0.png"), question]) == 2
  err = capsys.readouterr().err
  assert len(err.splitlines()) == 1 and err.startswith("error: the prompt is ") and "max_position_embeddings" in err


def _folder_with_bad_images(folder, good, tmp_path):
  """`good` readable images from `folder`, an empty file, a corrupt one and a truncated PNG, in a subfolder too."""
  import shutil
  mixed = tmp_path / "mixed"
  (mixed / "sub").mkdir(parents=True)
  for i in range(good):
    shutil.copy(os.path.join(folder, f"img{i}.png"), mixed / ("sub" if i % 2 else "") / f"img{i}.png")
  (mixed / "empty.jpg").write_bytes(b"")
  (mixed / "sub" / "corrupt.png").write_bytes(b"not a png at all")
  data = open(os.path.join(folder, "img0.png"), "rb").read()
  (mixed / "truncated.png").write_bytes(data[:len(data) // 2])
  return mixed


def test_index_skips_unreadable_images_with_one_line(pipe_and_images, tmp_path):
  pipe, folder = pipe_and_images
  mixed = _folder_with_bad_images(folder, 5, tmp_path)
  lines = []
  index = pipe.build_index(str(mixed), report=lines.append)
  assert len(index) == 5 and index.embeddings.shape == (5, 16)
  assert sorted(os.path.basename(p) for p in index.paths) == [f"img{i}.png" for i in range(5)]
  assert sorted(os.path.basename(p) for p, _ in index.skipped) == ["corrupt.png", "empty.jpg", "truncated.png"]
  reference = pipe.build_index(sorted(index.paths))  # the same images, none skipped: the same embeddings
  want = dict(zip(reference.paths, reference.embeddings))
  np.testing.assert_allclose(index.embeddings, [want[p] for p in index.paths], atol=1e-5)
  [line] = lines
  assert line.startswith(f"skipped 3 of 8 images under {str(mixed)!r} that cannot be read: ")
  assert f"{mixed / 'empty.jpg'} (empty: 0 bytes)" in line and line.endswith("; the index holds the other 5")
  with pytest.warns(UserWarning, match="skipped 3 of 8 images"):  # the Python API's default: a warning
    pipe.build_index(str(mixed))


def test_index_of_no_readable_image_is_an_error(pipe_and_images, tmp_path):
  pipe, folder = pipe_and_images
  mixed = _folder_with_bad_images(folder, 0, tmp_path)
  with pytest.raises(ValueError, match=r"none of the 3 images under .* can be read \(e\.g\. .*empty\.jpg: empty: 0 "
                                       r"bytes\); pass a folder of readable images"):
    pipe.build_index(str(mixed))


def test_predict_index_warns_in_one_line_and_max_new_tokens_is_checked(pipe_and_images, tmp_path, capsys):
  _, folder = pipe_and_images
  workdir = tw.workdir_with_checkpoint()
  mixed = _folder_with_bad_images(folder, 2, tmp_path)
  assert predict.main(["--workdir", workdir, "index", str(mixed), "--out", str(tmp_path / "i.npz")]) == 0
  captured = capsys.readouterr()
  assert captured.out.splitlines()[1:] == ["images\t2", "skipped\t3"]
  assert captured.err.splitlines()[-1].startswith("warning: skipped 3 of 5 images under ")
  image = os.path.join(folder, "img0.png")
  for value, message in [("1e5", "error: --max-new-tokens '1e5' is not a positive integer"),
                         ("0", "error: --max-new-tokens '0' is not a positive integer"),
                         ("100000", "error: max_new_tokens=100,000 does not fit: the LM's context holds 512 positions")]:
    assert predict.main(["--workdir", workdir, "caption", image, "--max-new-tokens", value]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(message), err
  assert predict.main(["--workdir", workdir, "generate", "--index", folder, "hi", "--max-new-tokens", "-2"]) == 2
  assert "'-2' is not a positive integer" in capsys.readouterr().err
