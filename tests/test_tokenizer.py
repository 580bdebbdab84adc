"""load_tokenizer: tokenizer.json, sentencepiece tokenizer.model and GGUF vocabularies, with [RET]
one past the frozen vocabulary, BOS as the checkpoint expects, right padding, errors."""

import json
import os

import numpy as np
import pytest
import sentencepiece as spm

from bridgejax.weights import CheckpointError, MissingCheckpointError, load_tokenizer

CORPUS = ["a red circle above a small blue square", "the green star is to the left of the cross",
          "two shapes: a yellow triangle and a purple circle", "is there a red square?"] * 20


def _tokenizer_json_dir(path, *, vocab_size=None, add_bos=True):
  """A BPE tokenizer.json with Gemma's special tokens (<pad> 0, <eos> 1, <bos> 2), trained here."""
  import tokenizers

  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
  tok.decoder = tokenizers.decoders.Metaspace()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=80, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"])
  tok.train_from_iterator(CORPUS, trainer)
  os.makedirs(path)
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<bos>", "eos_token": {"content": "<eos>"}, "pad_token": "<pad>",
               "add_bos_token": add_bos, "padding_side": "left"}, f)
  if vocab_size:
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump({"vocab_size": vocab_size, "architectures": ["GemmaForCausalLM"]}, f)
  return str(path)


def _sentencepiece_dir(path):
  """A sentencepiece BPE tokenizer.model laid out like Gemma's (pad 0, eos 1, bos 2, unk 3, no
  dummy prefix, whitespace kept as is, byte fallback)."""
  os.makedirs(path)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS), model_prefix=os.path.join(path, "tokenizer"), vocab_size=300,
      model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
      bos_piece="<bos>", unk_piece="<unk>", add_dummy_prefix=False, byte_fallback=True,
      normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
      user_defined_symbols=["<start_of_turn>"], minloglevel=2)
  return str(path)


def test_tokenizer_json_with_ret(tmp_path):
  tok = load_tokenizer(_tokenizer_json_dir(tmp_path / "tok", vocab_size=100))
  assert (tok.vocab_size, tok.ret_id) == (100, 100)  # config.json's table, not the 80 tokens
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
  ids = tok.encode("a red circle")
  assert ids[0] == 2 and tok.encode("a red circle", add_bos=False) == ids[1:]
  assert tok.decode(ids) == "a red circle"
  with_ret = tok.encode("a red circle[RET]")
  assert with_ret == ids + [100]
  assert tok.decode(with_ret) == "a red circle"
  kept = tok.decode(with_ret + [1, 0, 0], skip_special_tokens=False)
  assert kept.startswith("<bos>") and kept.endswith("a red circle[RET]<eos><pad><pad>")


def test_batch_encode_pads_right_and_keeps_ret_when_cutting(tmp_path):
  tok = load_tokenizer(_tokenizer_json_dir(tmp_path / "tok", vocab_size=100))
  texts = ["a red circle", "the green star is to the left of the cross"]
  ids, mask = tok.batch_encode(texts, 8, append_ret=True)
  assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == mask.shape == (2, 8)
  short = tok.encode(texts[0]) + [tok.ret_id]
  np.testing.assert_array_equal(ids[0], short + [tok.pad_id] * (8 - len(short)))
  np.testing.assert_array_equal(mask[0], [1] * len(short) + [0] * (8 - len(short)))
  assert ids[1, -1] == tok.ret_id and mask[1].all()  # cut to 7 tokens + [RET]
  np.testing.assert_array_equal(ids[1, :7], tok.encode(texts[1])[:7])
  plain, plain_mask = tok.batch_encode(texts, 8, add_bos=False)
  np.testing.assert_array_equal(plain[1], tok.encode(texts[1], add_bos=False)[:8])
  assert tok.ret_id not in plain
  with pytest.raises(ValueError, match="no room"):
    tok.batch_encode(texts, 1, append_ret=True)


def test_sentencepiece_model_equals_sentencepiece(tmp_path):
  path = _sentencepiece_dir(tmp_path / "spm")
  tok = load_tokenizer(path)
  reference = spm.SentencePieceProcessor(model_file=os.path.join(path, "tokenizer.model"))
  assert tok.vocab_size == 300 == tok.ret_id  # no config.json: the tokenizer's own size
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
  for text in ["a red circle above a small blue square", "  two  spaces, ünïcödé ✓ and <start_of_turn>"]:
    assert tok.encode(text) == [2] + reference.encode(text)
    assert tok.decode(tok.encode(text)) == text


def test_gguf_vocabulary_equals_its_sentencepiece_model(tmp_path):
  """A GGUF stores the sentencepiece vocabulary (tokens, scores, types); rebuilt, it encodes the same."""
  import gguf
  from sentencepiece import sentencepiece_model_pb2

  path = _sentencepiece_dir(tmp_path / "spm")
  proto = sentencepiece_model_pb2.ModelProto()
  with open(os.path.join(path, "tokenizer.model"), "rb") as f:
    proto.ParseFromString(f.read())
  writer = gguf.GGUFWriter(str(tmp_path / "vocab.gguf"), "gemma")
  writer.add_tokenizer_model("llama")
  writer.add_token_list([p.piece for p in proto.pieces])
  writer.add_token_scores([p.score for p in proto.pieces])
  writer.add_token_types([int(p.type) for p in proto.pieces])
  writer.add_bos_token_id(2)
  writer.add_eos_token_id(1)
  writer.add_pad_token_id(0)
  writer.add_add_bos_token(True)
  writer.add_add_space_prefix(False)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  tok = load_tokenizer(str(tmp_path / "vocab.gguf"))
  reference = spm.SentencePieceProcessor(model_file=os.path.join(path, "tokenizer.model"))
  assert (tok.vocab_size, tok.ret_id, tok.bos_id, tok.eos_id, tok.pad_id) == (300, 300, 2, 1, 0)
  for text in CORPUS[:4] + ["  two  spaces, ünïcödé ✓ <start_of_turn>"]:
    assert tok.encode(text) == [2] + reference.encode(text)


def test_no_bos_when_the_checkpoint_does_not_use_one(tmp_path):
  tok = load_tokenizer(_tokenizer_json_dir(tmp_path / "tok", add_bos=False))
  assert tok.encode("a red circle") == tok.encode("a red circle", add_bos=False)
  assert tok.vocab_size == len(tok)


def test_errors(tmp_path):
  with pytest.raises(MissingCheckpointError, match="does not exist"):
    load_tokenizer(str(tmp_path / "nowhere"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(MissingCheckpointError, match="neither tokenizer.json nor tokenizer.model"):
    load_tokenizer(str(tmp_path / "empty"))
  with pytest.raises(MissingCheckpointError, match="does not exist"):
    load_tokenizer(str(tmp_path / "nowhere.gguf"))
  import gguf

  writer = gguf.GGUFWriter(str(tmp_path / "bpe.gguf"), "gpt2")
  writer.add_tokenizer_model("gpt2")
  writer.add_token_list(["a", "b"])
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(CheckpointError, match="GGUF tokenizer 'gpt2' is not supported"):
    load_tokenizer(str(tmp_path / "bpe.gguf"))
