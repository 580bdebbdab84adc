"""The LLM's tokenizer with FROMAGe's [RET] token, without transformers or torch at run time.

    tok = load_tokenizer(path)   # HF dir (tokenizer.json or sentencepiece tokenizer.model) or a .gguf file
    ids = tok.encode("a red circle")                      # [bos, ...]
    ids, mask = tok.batch_encode(captions, 24, append_ret=True)   # right padded, int32 (B, 24)

[RET] is one past the frozen vocabulary (`ret_id == vocab_size`): the model looks its row up in the
trainable `extra_embeddings`, never in the frozen table. The literal text "[RET]" encodes to it.
A .gguf file carries a sentencepiece vocabulary (tokens, scores, types); it is rebuilt into a
sentencepiece model, which is what Gemma's tokenizer is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import sentencepiece
import tokenizers
from sentencepiece import sentencepiece_model_pb2

from bridgejax.errors import UserError
from bridgejax.weights.errors import CheckpointError, MissingCheckpointError
from bridgejax.weights.gemma import gguf_field, gguf_reader  # one parse per file, shared with the model loader

RET_TOKEN = "[RET]"


class _TokenizersBackend:
  """A `tokenizers.Tokenizer` (tokenizer.json)."""

  def __init__(self, tokenizer):
    self._tok = tokenizer

  def __len__(self):
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
    return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  @property
  def adds_no_bos(self) -> bool:
    """GPT-2-style byte-level BPE (GPT-Neo, Glória): a ByteLevel post-processor adds no special
    token, and transformers' GPT2Tokenizer defaults add_bos_token to False."""
    return type(self._tok.post_processor).__name__ == "ByteLevel"


class _SentencePieceBackend:
  """A `sentencepiece.SentencePieceProcessor` (tokenizer.model, or rebuilt from a GGUF vocabulary)."""

  def __init__(self, processor):
    self._sp = processor

  def __len__(self):
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
    return self._sp.decode(ids)  # control pieces (BOS, EOS, pad) decode to nothing either way

  adds_no_bos = False

  def token_to_id(self, token: str) -> int | None:
    i = self._sp.piece_to_id(token)
    return i if self._sp.id_to_piece(i) == token else None


class Tokenizer:
  """Encodes/decodes text for the frozen LLM; adds BOS as the checkpoint expects, pads on the right."""

  def __init__(self, backend, *, vocab_size: int, bos_id: int, eos_id: int, pad_id: int, uses_bos: bool = True):
    self._backend = backend
    self.vocab_size = int(vocab_size)  # rows of the frozen embedding table
    self.bos_id, self.eos_id, self.pad_id = int(bos_id), int(eos_id), int(pad_id)
    self.ret_id = self.vocab_size
    self.uses_bos = uses_bos  # whether the checkpoint's prompts start with BOS

  def __len__(self) -> int:  # ids the text tokenizer itself can produce
    return len(self._backend)

  def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
    """Token ids of `text`; "[RET]" in the text becomes ret_id; BOS first if add_bos and the model uses one."""
    ids = [self.bos_id] if add_bos and self.uses_bos else []
    for i, piece in enumerate(text.split(RET_TOKEN)):
      if i:
        ids.append(self.ret_id)
      if piece:
        ids.extend(self._backend.encode(piece))
    return ids

  def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
    """Text of `ids`; skipping drops [RET], pad, BOS and EOS (and the backend's own special tokens)."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    if skip_special_tokens:
      dropped = {self.ret_id, self.pad_id, self.bos_id, self.eos_id}
      ids = [i for i in ids if i not in dropped]
    segments, current = [], []
    for i in ids:
      if i == self.ret_id:
        segments.append(current)
        current = []
      elif 0 <= i < len(self._backend):  # ids past the text vocabulary have no text
        current.append(i)
    segments.append(current)
    return RET_TOKEN.join(self._backend.decode(s, skip_special_tokens) for s in segments)

  def batch_encode(self, texts: Sequence[str], max_length: int, *, add_bos: bool = True,
                   append_ret: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) int32 (B, max_length), right padded with pad_id. Longer texts are cut; with
    append_ret every row ends with [RET], also a cut one (FROMAGe)."""
    room = max_length - int(append_ret)
    if room < int(add_bos and self.uses_bos):
      raise UserError(f"max_length={max_length} leaves no room for the text")
    ids = np.full((len(texts), max_length), self.pad_id, np.int32)
    mask = np.zeros((len(texts), max_length), np.int32)
    for row, text in enumerate(texts):
      tokens = self.encode(text, add_bos=add_bos)[:room] + ([self.ret_id] if append_ret else [])
      ids[row, :len(tokens)] = tokens
      mask[row, :len(tokens)] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------
# Loading

def load_tokenizer(path: str) -> Tokenizer:
  """The tokenizer of a HF model directory (tokenizer.json, else tokenizer.model) or a .gguf file."""
  path = str(path)
  if path.endswith(".gguf"):
    return _from_gguf(path)
  if not os.path.isdir(path):
    raise MissingCheckpointError(f"tokenizer directory {path!r} does not exist")
  if os.path.isfile(os.path.join(path, "tokenizer.json")):
    backend = _TokenizersBackend(tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json")))
  elif os.path.isfile(os.path.join(path, "tokenizer.model")):
    backend = _SentencePieceBackend(sentencepiece.SentencePieceProcessor(
        model_file=os.path.join(path, "tokenizer.model")))
  else:
    raise MissingCheckpointError(f"{path!r} has neither tokenizer.json nor tokenizer.model; "
                                 f"found {sorted(os.listdir(path))}")
  settings = {**_json(path, "special_tokens_map.json"), **_json(path, "tokenizer_config.json")}
  model_config = _json(path, "config.json")

  def special(name: str, fallbacks: tuple[str, ...]) -> int | None:
    token = settings.get(f"{name}_token")
    token = token.get("content") if isinstance(token, dict) else token
    for candidate in ([token] if token else []) + list(fallbacks):
      i = backend.token_to_id(candidate)
      if i is not None:
        return i
    return model_config.get(f"{name}_token_id") if isinstance(model_config.get(f"{name}_token_id"), int) else None

  # "bos_token": null (Qwen2) says the tokenizer adds none, whatever config.json's bos_token_id is.
  bos = None if "bos_token" in settings and settings["bos_token"] is None else special("bos", ("<bos>", "<s>"))
  eos = special("eos", ("<eos>", "</s>", "<|endoftext|>"))
  if eos is None:
    raise CheckpointError(f"{path!r}: cannot tell the tokenizer's EOS token (no eos_token in tokenizer_config.json)")
  pad = special("pad", ("<pad>",))
  return Tokenizer(backend, vocab_size=model_config.get("vocab_size", len(backend)),
                   bos_id=eos if bos is None else bos, eos_id=eos, pad_id=eos if pad is None else pad,
                   uses_bos=bos is not None and settings.get("add_bos_token", not backend.adds_no_bos) is not False)


def _json(directory: str, name: str) -> dict:
  file = os.path.join(directory, name)
  if not os.path.isfile(file):
    return {}
  with open(file) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{file} is not valid JSON: {e}") from e


def _from_gguf(path: str) -> Tokenizer:
  reader = gguf_reader(path)
  field = lambda key, default=None: gguf_field(reader, key, default)
  kind = field("tokenizer.ggml.model")
  if kind != "llama":  # llama.cpp's name for a sentencepiece vocabulary
    raise CheckpointError(f"{path!r}: GGUF tokenizer {kind!r} is not supported (bridgejax reads sentencepiece "
                          "vocabularies, tokenizer.ggml.model = 'llama')")
  tokens, scores, types = (field(f"tokenizer.ggml.{k}") for k in ("tokens", "scores", "token_type"))
  proto = sentencepiece_model_pb2.ModelProto()
  for token, score, kind in zip(tokens, scores, types):
    piece = proto.pieces.add()
    # llama.cpp writes the whitespace-run pieces with real spaces; sentencepiece matches them after
    # turning spaces into U+2581, so spell them that way again.
    piece.piece = "\u2581" * len(token) if token and not token.strip(" ") else token
    piece.score, piece.type = score, kind  # GGUF token types are sentencepiece's piece types
  proto.trainer_spec.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
  proto.trainer_spec.vocab_size = len(tokens)
  proto.trainer_spec.byte_fallback = 6 in types  # BYTE pieces <0x00>..<0xFF>
  proto.normalizer_spec.name = "identity"
  proto.normalizer_spec.add_dummy_prefix = bool(field("tokenizer.ggml.add_space_prefix", False))
  proto.normalizer_spec.remove_extra_whitespaces = False
  proto.normalizer_spec.escape_whitespaces = True
  backend = _SentencePieceBackend(sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString()))
  embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
  eos = field("tokenizer.ggml.eos_token_id", 1)
  return Tokenizer(backend, vocab_size=len(tokens) if embedding is None else int(embedding.shape[1]),
                   bos_id=field("tokenizer.ggml.bos_token_id", eos), eos_id=eos,
                   pad_id=field("tokenizer.ggml.padding_token_id", eos),
                   uses_bos=bool(field("tokenizer.ggml.add_bos_token", True)))
