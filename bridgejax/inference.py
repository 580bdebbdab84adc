"""Using a trained bridge: captions, answers, retrieval, composed retrieval, interleaved output.

    from bridgejax.inference import Pipeline
    pipe = Pipeline.from_workdir("runs/demo")                  # config from runs/demo/config.json
    pipe = Pipeline.from_pretrained("bridge/", vision=..., llm=...)    # python -m bridgejax.export's folder
                                                               # (a Hub id "org/name" needs the network or
                                                               #  a local HF cache: local_files_only=True)
    pipe.caption("cat.jpg")                                    # 'a cat on a sofa'
    pipe.answer("cat.jpg", "what colour is the sofa?")         # 'red'
    index = pipe.build_index("photos/")                        # W_i embeddings of a folder of images
                                                               # (unreadable ones skipped, with a warning)
    pipe.retrieve("a dog on a beach", index, k=5)              # [Hit(path, score), ...]
    pipe.retrieve_composed("cat.jpg", "but on the grass", index)
    pipe.generate("Q: what does a beach look like?\\nA:", index=index)   # ['sand and sea', Hit(...)]

Composed retrieval (Pic2Word): Pic2Word maps the query image to a pseudo word token, writes it into
a sentence with the modification text, encodes the sentence with the text encoder, and ranks the
gallery by similarity to that embedding. The LLM + [RET] + W_t is the text encoder here. A run with
Pic2Word's mapping network (configs/pic2word.py, bridgejax/pic2word.py) reads exactly that: BOS +
"a photo of * , {text}" + [RET], * the image's pseudo word. Without one, the bridge's k visual
tokens stand for the image, zero-shot, in the captioning pass's own layout: [visual tokens] + BOS +
text + [RET]. Either query's W_t embedding ranks the index's W_i embeddings by cosine similarity,
and the query image itself is left out of the results when it is in the index (as CIR benchmarks do).

Interleaved generation (FROMAGe): decode greedily from [visual tokens] + BOS + prompt (or BOS +
prompt without an image) until EOS, letting [RET] be generated; the text is split at every [RET],
and each [RET]'s final hidden state (the same state the training's text pass embeds) goes through
W_t to fetch the nearest image of the index. FROMAGe's optional boost of the [RET] logit is not
applied.

The new tokens (max_new_tokens) share the LM's context with the prompt and the image's visual tokens:
check_new_tokens refuses a count that is not a positive integer or leaves no room for a prompt, and
prompt_ids a prompt that does not fit next to them, each as one UserError line before any work.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from bridgejax import cli, export, paths as paths_lib
from bridgejax.config_schema import complete
from bridgejax.data.image import ImageError, clip_preprocess, decode_image, read_image_file
from bridgejax.errors import UserError
from bridgejax.evaluation.captioning import cut_caption
from bridgejax.engine import Engine, pad_rows, ret_embeddings_after, round_up
from bridgejax.evaluation.run import load_params
from bridgejax.evaluation.evaluators import vqa as vqa_task
from bridgejax.experiment import build
from bridgejax.losses import l2_normalize
from bridgejax.pretrained import check_backbone, pretrained_folder, read_manifest, read_trainable

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
# A bound on characters per token (Gemma's longest pieces are runs of 31 spaces), so that only
# this many characters per context position are tokenised to know a prompt is too long.
_MAX_CHARS_PER_TOKEN = 32


@dataclasses.dataclass(frozen=True)
class Hit:
  path: str
  score: float


@dataclasses.dataclass
class ImageIndex:
  """L2-normalised W_i embeddings (N, E) of image files; save/load as .npz."""

  paths: list[str]
  embeddings: np.ndarray
  model: str = ""  # what made it (config name @ step): embeddings of another model do not compare
  skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, why) left out; not saved

  def save(self, path: str) -> str:
    np.savez(path, embeddings=self.embeddings, paths=np.asarray(self.paths), model=np.asarray(self.model))
    return path if path.endswith(".npz") else path + ".npz"

  @classmethod
  def load(cls, path: str) -> "ImageIndex":
    data = np.load(path)
    return cls([str(p) for p in data["paths"]], data["embeddings"], str(data["model"]))

  def __len__(self) -> int:
    return len(self.paths)


def load_config(config=None, workdir: str | None = None):
  """A ConfigDict from: a ConfigDict, a config file path (configs/X.py[:arg]), or the workdir's config.json;
  keys it lacks (a config.json saved before they existed) at their defaults (config_schema.complete)."""
  if isinstance(config, ml_collections.ConfigDict):
    return complete(config)
  if config is None:
    path = paths_lib.path(workdir or ".") / "config.json"
    if not path.exists():
      raise FileNotFoundError(f"{workdir} has no config.json (train.py writes it); pass the config file too")
    return complete(ml_collections.ConfigDict(paths_lib.read_json(path)))
  return cli.load_config_file(str(config))


def list_images(folder: str) -> list[str]:
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"image folder {folder!r} does not exist")
  paths = sorted(str(p) for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
  if not paths:
    raise FileNotFoundError(f"{folder!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
  return paths


def check_new_tokens(value, most: int | None = None, why: str = "", name: str = "max_new_tokens") -> int:
  """`value` (an int, or a flag's text) as the number of tokens to generate: a positive integer, at
  most `most` (what the LM's context leaves; `why` says how), else one UserError line."""
  n = None
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    n = int(value)
  elif isinstance(value, str):
    try:
      n = int(value.strip())
    except ValueError:
      pass
  if n is None or n < 1:
    raise UserError(f"{name} {value!r} is not a positive integer: pass how many tokens to generate, e.g. 32")
  if most is not None and n > most:
    raise UserError(f"{name}={n:,d} does not fit: {why}; ask for at most {max(most, 0):,d} new tokens")
  return n


class Pipeline:
  """A trained model ready for use. Build with `from_workdir`, `from_pretrained`, or from parts (setup, params)."""

  def __init__(self, setup, params, *, name: str = "", max_new_tokens: int = 32, batch_size: int = 16):
    self.setup, self.model, self.tokenizer = setup, setup.model, setup.tokenizer
    self.name, self.batch_size = name, batch_size
    self.engine = Engine(self.model, params, self.tokenizer, mesh=setup.mesh, max_new_tokens=max_new_tokens)
    self.params = self.engine.params  # on the mesh, placed once: no call sends the weights again
    self.image_size = self.model.vision.config.image_size
    self.image_resize = setup.config.data.image_resize  # as the model was trained
    self._forward = jax.jit(self._forward_fn)

  @classmethod
  def from_workdir(cls, workdir: str, config=None, step: int | str | None = None, **kwargs) -> "Pipeline":
    """The checkpoint `step` (default: latest; "best": the best validation step) of a training run;
    config: a ConfigDict, a config file, or None for the run's own config.json."""
    config = load_config(config, workdir)
    setup = build(config)
    step, params = load_params(setup, workdir, step)
    return cls(setup, params, name=f"{config.name}@{step}", **kwargs)

  @classmethod
  def from_pretrained(cls, path_or_id: str, *, vision: str | None = None, llm: str | None = None,
                      revision: str | None = None, local_files_only: bool = False, cache_dir: str | None = None,
                      **kwargs) -> "Pipeline":
    """A bridge exported by `python -m bridgejax.export`: a folder, or a Hub repo id ("org/name",
    fetched with huggingface_hub.snapshot_download; `revision`, `local_files_only` and `cache_dir`
    go to it). vision / llm: the backbones' folders, overriding the paths the export recorded."""
    folder = pretrained_folder(path_or_id, revision, local_files_only, cache_dir)
    config = load_config(None, folder)
    manifest = read_manifest(folder)
    for part, given in (("vision", vision), ("llm", llm)):
      config[part].path = given or config[part].path
      check_backbone(part, config[part].path, manifest["backbones"][part])
    setup = build(config)
    trainable = read_trainable(setup, os.path.join(folder, export.PARAMS_FILE))
    return cls(setup, {**setup.frozen, **trainable}, name=f"{config.name}@{manifest['step']}", **kwargs)

  # ------------------------------------------------------------------ inputs

  def pixels(self, images) -> np.ndarray:
    """Paths, bytes, PIL images or uint8 HWC arrays -> (B, 3, S, S) CLIP-normalised pixels."""
    if not isinstance(images, (list, tuple)):
      images = [images]
    out = []
    for image in images:
      if isinstance(image, (str, os.PathLike)):
        image = decode_image(read_image_file(image), str(image))
      elif isinstance(image, bytes):
        image = decode_image(image)
      out.append(clip_preprocess(image, self.image_size, self.image_resize))
    return np.stack(out)

  def _encode(self, images, *, keep_tokens: bool = True, progress: bool = False, skipped: list | None = None):
    """Visual tokens (B, K, D) (None unless keep_tokens: an index of many images keeps only the
    embeddings) and W_i embeddings (B, E), not normalised, of images as `pixels` takes them.
    batch_size at a time: more images than that are cut into batches padded to batch_size (one
    compiled shape, one batch of pixels in memory); fewer are one batch of their own size.
    With a `skipped` list, an image that cannot be read is appended to it as (image, why) and left
    out of the result (B counts the rest) instead of raising."""
    images = images if isinstance(images, (list, tuple)) else [images]
    size = min(len(images), self.batch_size)
    tokens, embs = [], []
    for start in tqdm(range(0, len(images), size), disable=not progress, desc="images", unit="batch"):
      chunk = images[start:start + size]
      pixels = self.pixels(chunk) if skipped is None else self._readable_pixels(chunk, skipped)
      if not len(pixels):
        continue
      batch_tokens, batch_embs = self.engine.encode(np.pad(pixels, [(0, size - len(pixels))] + [(0, 0)] * 3))
      embs.append(batch_embs[:len(pixels)])
      if keep_tokens:
        tokens.append(batch_tokens[:len(pixels)])
    if not embs:
      return None, None
    return (np.concatenate(tokens) if keep_tokens else None), np.concatenate(embs)

  def _readable_pixels(self, images, skipped: list) -> np.ndarray:
    """`pixels` of the images that can be read; the others go to `skipped` as (image, why)."""
    out = []
    for image in images:
      try:
        out.append(self.pixels([image])[0])
      except (ImageError, OSError) as e:
        why = f"{e.reason}: {e.detail}" if isinstance(e, ImageError) else f"{type(e).__name__}: {e}"
        skipped.append((str(image), why))
    return np.stack(out) if out else np.zeros((0, 3, self.image_size, self.image_size), np.float32)

  @property
  def context(self) -> int:
    """Positions the LM was trained on (max_position_embeddings): the whole sequence must fit."""
    return int(self.model.llm.config.max_position_embeddings)

  def prompt_ids(self, text: str, *, reserve: int = 0, new_tokens: int = 0, append_ret: bool = False) -> list[int]:
    """BOS + text (+ [RET]) ids, or UserError when they do not fit in the LM's context next to
    `reserve` positions (visual tokens) and `new_tokens` (refused first, by check_new_tokens, when
    they leave no room for even an empty prompt). Too long a prompt is refused, not cut: cutting
    either end of a question or a query changes what is asked. Only a prefix of a huge text is
    tokenised to find out, so a 1 MB prompt fails at once."""
    tail = [self.model.ret_id] if append_ret else []
    if new_tokens:
      least = 1 + len(tail)  # BOS (+ [RET]): the shortest prompt
      check_new_tokens(new_tokens, self.context - reserve - least,
                       f"the LM's context holds {self.context} positions (max_position_embeddings), {reserve} of "
                       f"them for the image's visual tokens and at least {least} for the prompt")
      reserve += new_tokens
    limit = self.context - reserve
    head = text[:max(limit, 1) * _MAX_CHARS_PER_TOKEN]
    ids = self.tokenizer.encode(head, add_bos=True) + tail
    if len(head) < len(text) and len(ids) <= limit:  # tokens longer than the bound: tokenise it all
      head, ids = text, self.tokenizer.encode(text, add_bos=True) + tail
    if len(ids) > limit:
      size = f"{len(ids)}" + ("+" if len(head) < len(text) else "")
      raise UserError(
          f"the prompt is {size} tokens ({len(text):,d} characters), but the LM's context holds "
          f"{self.context} positions (max_position_embeddings), {reserve} of them for the image's visual "
          f"tokens and the new tokens: shorten the prompt to at most {max(limit - len(tail), 0)} tokens"
          + (" (or ask for fewer new tokens)" if reserve else ""))
    return ids

  def _ids(self, texts: Sequence[str], *, reserve: int = 0, new_tokens: int = 0, append_ret: bool = False):
    rows = [self.prompt_ids(t, reserve=reserve, new_tokens=new_tokens, append_ret=append_ret) for t in texts]
    return pad_rows(rows, round_up(max(map(len, rows)), 16), self.tokenizer.pad_id)

  def _new_tokens(self, max_new_tokens: int | None) -> int:
    return int(max_new_tokens or self.engine.max_new_tokens)

  # ------------------------------------------------------------------ text out

  def caption(self, image, prompt: str = "", max_new_tokens: int | None = None) -> str:
    """A caption (FROMAGe's cut rule); `prompt` e.g. "A picture of" is not repeated in the output."""
    return self.captions([image], prompt, max_new_tokens)[0]

  def captions(self, images, prompt: str = "", max_new_tokens: int | None = None) -> list[str]:
    tokens, _ = self._encode(images)
    ids, mask = self._ids([prompt] * tokens.shape[0], reserve=tokens.shape[1],
                          new_tokens=self._new_tokens(max_new_tokens))
    new = self.engine.generate(tokens, ids, mask, max_new_tokens=max_new_tokens)
    return [cut_caption(self.engine.decode_new(row)) for row in new]

  def answer(self, image, question: str, max_new_tokens: int = 10) -> str:
    """The answer after "Q: {question}\\nA:", up to the first newline or period."""
    tokens, _ = self._encode([image])
    ids, mask = self._ids([vqa_task.prompt(question)], reserve=tokens.shape[1], new_tokens=max_new_tokens)
    new = self.engine.generate(tokens, ids, mask, max_new_tokens=max_new_tokens)
    return cut_caption(self.engine.decode_new(new[0]), "first")

  # ------------------------------------------------------------------ retrieval

  def build_index(self, folder_or_paths, *, progress: bool = False, report=None) -> ImageIndex:
    """W_i embeddings of every image under a folder (recursively), or of a list of paths. An image
    that cannot be read (missing, unreadable, corrupt) is left out and listed in the index's
    `skipped`, and one line says so: report(line), or a warning. None readable is a UserError."""
    folder = isinstance(folder_or_paths, (str, os.PathLike))
    paths = list_images(folder_or_paths) if folder else [str(p) for p in folder_or_paths]
    if not paths:
      raise UserError("no images to index: pass a folder of images or a list of image paths")
    skipped: list[tuple[str, str]] = []
    _, embs = self._encode(paths, keep_tokens=False, progress=progress, skipped=skipped)
    where = f"under {str(folder_or_paths)!r}" if folder else "given"
    if embs is None:
      first, why = skipped[0]
      raise UserError(f"none of the {len(paths)} images {where} can be read (e.g. {first}: {why}); "
                      "pass a folder of readable images")
    bad = {p for p, _ in skipped}
    index = ImageIndex([p for p in paths if p not in bad], l2_normalize(embs), self.name, skipped)
    if skipped:
      listed = ", ".join(f"{p} ({why})" for p, why in skipped[:5]) + (
          f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
      line = (f"skipped {len(skipped)} of {len(paths)} images {where} that cannot be read: {listed}; "
              f"the index holds the other {len(index)}")
      if report is not None:
        report(line)
      else:
        warnings.warn(line, stacklevel=2)
    return index

  def text_query(self, text: str) -> np.ndarray:
    """The normalised W_t embedding of BOS + text + [RET]."""
    ids, mask = self._ids([text], append_ret=True)
    return l2_normalize(self.engine.text_embedding(ids, mask))[0]

  def composed_query(self, image, text: str) -> np.ndarray:
    """The normalised W_t embedding of the image + modification `text` query (the module doc):
    Pic2Word's template around the image's pseudo word, or [visual tokens] + BOS + text + [RET]."""
    row, word = self.engine.composed_ids(text)
    self.prompt_ids(text, reserve=len(row) - len(self.tokenizer.encode(text, add_bos=True)) + self._visual_token_count(),
                    append_ret=True)  # too long for the context: one line, before any work
    ids, mask = pad_rows([row], round_up(len(row), 16), self.tokenizer.pad_id)
    return l2_normalize(self.engine.composed_query(self.pixels([image]), ids, mask, [word]))[0]

  def _visual_token_count(self) -> int:
    """How many visual tokens the bridge puts before a text (0 where a composed query has none)."""
    if self.model.has_term("pic2word"):
      return 0
    pixels = jax.ShapeDtypeStruct((1, 3, self.image_size, self.image_size), jnp.float32)
    return int(jax.eval_shape(self.model.encode_images, self.params, pixels).tokens.shape[1])

  def search(self, query: np.ndarray, index: ImageIndex, k: int = 5, exclude: Sequence[str] = ()) -> list[Hit]:
    if index.model and self.name and index.model != self.name:
      warnings.warn(f"the index was built by {index.model}, this pipeline is {self.name}: rebuild it")
    scores = index.embeddings @ np.asarray(query, np.float32)
    skip = {os.path.abspath(p) for p in exclude}
    order = [i for i in np.argsort(-scores, kind="stable") if os.path.abspath(index.paths[i]) not in skip]
    return [Hit(index.paths[i], float(scores[i])) for i in order[:k]]

  def retrieve(self, text: str, index: ImageIndex, k: int = 5) -> list[Hit]:
    return self.search(self.text_query(text), index, k)

  def retrieve_composed(self, image, text: str, index: ImageIndex, k: int = 5) -> list[Hit]:
    exclude = [image] if isinstance(image, (str, os.PathLike)) else []
    return self.search(self.composed_query(image, text), index, k, exclude)

  # ------------------------------------------------------------------ interleaved output

  def _forward_fn(self, params, visual_tokens, ids, mask, positions):
    """W_t embeddings (B, P, E) of the final hidden states at text `positions` (B, P) of [visual] + text."""
    return ret_embeddings_after(self.model, params, visual_tokens, ids, mask, positions)

  def _ret_embeddings(self, visual_tokens, ids, mask, positions):
    return np.asarray(self._forward(self.params, visual_tokens, jnp.asarray(ids), jnp.asarray(mask),
                                    jnp.asarray(positions)))

  def generate(self, prompt: str, *, image=None, index: ImageIndex | None = None,
               max_new_tokens: int = 32) -> list:
    """FROMAGe's interleaved output: a list of text segments (str) and retrieved images (Hit) in
    order; without an index, [RET] positions are returned as the string "[RET]"."""
    tokens = None if image is None else self._encode([image])[0]
    ids, mask = self._ids([prompt], reserve=0 if tokens is None else tokens.shape[1], new_tokens=max_new_tokens)
    new = self.engine.generate(tokens, ids, mask, max_new_tokens=max_new_tokens, stop_at_ret=False)[0]
    generated = self.engine.until_stop(new, stop_at_ret=False)
    rets = [i for i, t in enumerate(generated) if t == self.model.ret_id]
    embs = []
    if rets and index is not None:
      length = int(mask.sum())
      full_ids, full_mask = pad_rows([ids[0, :length].tolist() + generated],
                                     round_up(length + len(generated), 16), self.tokenizer.pad_id)
      embs = l2_normalize(self._ret_embeddings(tokens, full_ids, full_mask,
                                               np.asarray([[length + r for r in rets]]))[0])
    out, start = [], 0
    for j, r in enumerate(rets + [len(generated)]):
      text = self.tokenizer.decode(generated[start:r], skip_special_tokens=True)
      if text:
        out.append(text)
      if r < len(generated):
        out.append(self.search(embs[j], index, 1)[0] if index is not None else "[RET]")
      start = r + 1
    return out


__all__ = ["Pipeline", "ImageIndex", "Hit", "load_config", "list_images", "check_new_tokens"]
