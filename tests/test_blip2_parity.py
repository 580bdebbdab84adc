"""BLIP-2's Q-Former (bridgejax/bridges/querying.py QFormer, stage 1's text branch and heads) against
transformers' Blip2QFormerModel / Blip2ForImageTextRetrieval and a transcription of LAVIS's ITG, ITC
and ITM (bridgejax/losses.py), on a tiny BLIP-2-like configuration with the weights copied from torch.

References:
  transformers 5.x, models/blip_2/modeling_blip_2.py: Blip2QFormerModel.forward, Blip2QFormerLayer.forward,
    Blip2TextEmbeddings.forward, Blip2ForImageTextRetrieval.forward (ITM and ITC branches).
  LAVIS (salesforce/LAVIS HEAD), lavis/models/blip2_models/blip2_qformer.py: Blip2Qformer.forward (ITC
    loss, hard negatives, ITM loss, the ITG decoder ids and labels); lavis/models/blip2_models/Qformer.py:
    BertModel.get_extended_attention_mask (the UniLM mask), BertLMHeadModel.forward (shifted CE with
    label_smoothing=0.1), BertLMPredictionHead / BertPredictionHeadTransform (dense, GELU, LayerNorm,
    tied decoder + bias).
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2QFormerConfig, Blip2VisionConfig

from bridge_helper import random_hidden_states
from bridgejax import bridges, losses
from bridgejax.bridges import VisionFeatures
from bridgejax.bridges.querying import qformer_attention_mask

# The vision width D (24) differs from the Q-Former width H (16): cross-attention keys/values read D.
DIMS = dict(vision_width=24, vision_layers=2, grid_size=2, llm_width=8)  # 5 tokens (CLS + 2x2)
H, HEADS, LAYERS, EVERY, K, VOCAB, MLP_RATIO, EPS = 16, 2, 3, 2, 3, 30, 4, 1e-12
QFORMER = dict(name="qformer", k=K, num_layers=LAYERS, cross_attention_every=EVERY, num_heads=HEADS, width=H,
               mlp_ratio=MLP_RATIO, layer=-2, layer_norm_eps=EPS)
B, T = 3, 6
LENGTHS = (6, 4, 2)  # right-padded rows of different lengths
DEC = VOCAB - 1  # the [DEC] id that replaces the first token for ITG (LAVIS: tokenizer.bos_token_id)
TOL = 1e-5


def _maxdiff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


class _Passthrough(nn.Module):
  """Stands in for Blip2ForImageTextRetrieval.vision_model: its image_embeds = vision_outputs[0] are then
  the pixel_values given, i.e. the already LN_v-normalised tokens (HF has no ln_vision)."""

  def forward(self, pixel_values, **kw):
    return (pixel_values,)


class _LavisLMHead(nn.Module):
  """LAVIS Qformer.py BertLMPredictionHead: transform (dense, GELU, LayerNorm), decoder tied to the word
  embeddings, plus its own bias."""

  def __init__(self, word_embeddings: nn.Embedding):
    super().__init__()
    self.dense = nn.Linear(H, H)
    self.LayerNorm = nn.LayerNorm(H, eps=EPS)
    self.word_embeddings = word_embeddings  # tied decoder weight (V, H)
    self.bias = nn.Parameter(torch.zeros(VOCAB))

  def forward(self, x):
    x = self.LayerNorm(F.gelu(self.dense(x)))  # ACT2FN["gelu"]: exact erf GELU
    return x @ self.word_embeddings.weight.T + self.bias


def _randomise(module, gen):
  """Every weight random (HF's init zeroes biases, the queries, and sets LayerNorms to 1)."""
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, nn.LayerNorm):
        m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=gen))
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
      elif isinstance(m, nn.Linear):
        m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * m.in_features**-0.5)
        if m.bias is not None:
          m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
      elif isinstance(m, nn.Embedding):
        m.weight.copy_(0.5 * torch.randn(m.weight.shape, generator=gen))


def _np(t):
  return np.asarray(t.detach().numpy(), np.float32)


def _dense(linear):  # torch Linear (out, in) -> flax Dense
  return {"kernel": jnp.asarray(_np(linear.weight).T), "bias": jnp.asarray(_np(linear.bias))}


def _heads(linear):  # torch Linear (heads·F, in) -> flax DenseGeneral (in, heads, F)
  f = H // HEADS
  return {"kernel": jnp.asarray(_np(linear.weight).T.reshape(-1, HEADS, f)),
          "bias": jnp.asarray(_np(linear.bias).reshape(HEADS, f))}


def _ln(norm):
  return {"scale": jnp.asarray(_np(norm.weight)), "bias": jnp.asarray(_np(norm.bias))}


def _attention(att):  # HF Blip2QFormerAttention -> (flax QFormerAttention params, its post-LN)
  a = att.attention
  return ({"q_proj": _heads(a.query), "k_proj": _heads(a.key), "v_proj": _heads(a.value),
           "out_proj": _dense(att.output.dense)}, _ln(att.output.LayerNorm))


def _flax_params(hf, head, init):
  """HF Blip2ForImageTextRetrieval (+ the LAVIS LM head) -> the QFormer's param tree; vision_norm and
  itc_temp (no HF counterpart) stay as in `init`."""
  p = dict(init)
  p["queries"] = jnp.asarray(_np(hf.query_tokens[0]))
  p["query_norm"] = _ln(hf.qformer.layernorm)
  p["word_embeddings"] = {"embedding": jnp.asarray(_np(hf.embeddings.word_embeddings.weight))}
  p["position_embeddings"] = {"embedding": jnp.asarray(_np(hf.embeddings.position_embeddings.weight))}
  p["itc_image_proj"], p["itc_text_proj"] = _dense(hf.vision_projection), _dense(hf.text_projection)
  p["itm_head"] = _dense(hf.itm_head)
  p["itg_transform"], p["itg_norm"] = _dense(head.dense), _ln(head.LayerNorm)
  p["itg_bias"] = jnp.asarray(_np(head.bias))
  for i, layer in enumerate(hf.qformer.encoder.layer):
    q = {}
    q["self_attn"], q["self_attn_norm"] = _attention(layer.attention)
    if layer.has_cross_attention:
      q["cross_attn"], q["cross_attn_norm"] = _attention(layer.crossattention)
    q["ffn"] = {"fc1": _dense(layer.intermediate_query.dense), "fc2": _dense(layer.output_query.dense)}
    q["ffn_norm"] = _ln(layer.output_query.LayerNorm)
    q["text_ffn"] = {"fc1": _dense(layer.intermediate.dense), "fc2": _dense(layer.output.dense)}
    q["text_ffn_norm"] = _ln(layer.output.LayerNorm)
    assert jax.tree.map(jnp.shape, q) == jax.tree.map(jnp.shape, dict(p[f"layer_{i}"])), i
    p[f"layer_{i}"] = q
  assert jax.tree.map(jnp.shape, p) == jax.tree.map(jnp.shape, dict(init))
  return p


def lavis_extended_mask(attention_mask, seq_length, has_query):
  """numpy transcription of LAVIS Qformer.py BertModel.get_extended_attention_mask, is_decoder=True, 2-D
  attention_mask (B, prefix + T) -> (B, rows, prefix + T) in {0, 1}; rows = prefix + T with has_query
  (the UniLM mask over [queries; text]), T without (the ITG pass with the queries as past_key_values)."""
  batch = attention_mask.shape[0]
  seq_ids = np.arange(seq_length)
  causal = (np.tile(seq_ids[None, None, :], (batch, seq_length, 1)) <= seq_ids[None, :, None]).astype(np.int64)
  if causal.shape[1] < attention_mask.shape[1]:
    prefix = attention_mask.shape[1] - causal.shape[1]
    if has_query:
      causal = np.concatenate([np.zeros((batch, prefix, seq_length), np.int64), causal], axis=1)
    causal = np.concatenate([np.ones((batch, causal.shape[1], prefix), np.int64), causal], axis=-1)
  return causal * attention_mask[:, None, :]


@pytest.fixture(scope="module")
def world():
  torch.manual_seed(0)
  gen = torch.Generator().manual_seed(0)
  qcfg = Blip2QFormerConfig(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                            intermediate_size=MLP_RATIO * H, hidden_act="gelu", hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, layer_norm_eps=EPS, cross_attention_frequency=EVERY,
                            encoder_hidden_size=DIMS["vision_width"], use_qformer_text_input=True)
  vcfg = Blip2VisionConfig(hidden_size=DIMS["vision_width"], intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=8, patch_size=4)
  config = Blip2Config(vision_config=vcfg, qformer_config=qcfg, num_query_tokens=K, image_text_hidden_size=256)
  assert config.image_token_index is None  # else the ITM/ITC branches would cut K ids off the text
  assert config.qformer_config.encoder_hidden_size == DIMS["vision_width"]
  config._attn_implementation = "eager"  # additive masks, as LAVIS
  hf = Blip2ForImageTextRetrieval(config)
  hf.vision_model = _Passthrough()
  head = _LavisLMHead(hf.embeddings.word_embeddings)
  _randomise(hf, gen)
  _randomise(head, gen)
  with torch.no_grad():
    hf.query_tokens.copy_(torch.randn(hf.query_tokens.shape, generator=gen))
    head.bias.copy_(0.1 * torch.randn(VOCAB, generator=gen))
  hf.eval()
  assert hf.qformer.config._attn_implementation == "eager"

  bridge = bridges.build_bridge(QFORMER, **DIMS).clone(text_vocab=VOCAB)
  features = VisionFeatures(random_hidden_states(DIMS, B))
  rng = np.random.default_rng(0)
  mask = (np.arange(T)[None] < np.array(LENGTHS)[:, None]).astype(np.int32)  # (B, T)
  ids = np.where(mask, rng.integers(1, VOCAB - 1, (B, T)), 0).astype(np.int32)  # pad id 0
  init = bridge.init(jax.random.key(0), features, jnp.asarray(ids), jnp.asarray(mask),
                     method="init_representation")["params"]
  init = dict(init)  # stage 1 leaves out LL_O ("proj"): take it from the bridge's own init
  init["proj"] = bridge.init(jax.random.key(1), features)["params"]["proj"]
  init["vision_norm"] = {"scale": jnp.asarray(1 + 0.1 * rng.standard_normal(DIMS["vision_width"]), jnp.float32),
                         "bias": jnp.asarray(0.1 * rng.standard_normal(DIMS["vision_width"]), jnp.float32)}
  params = _flax_params(hf, head, init)
  qformer = lambda method, *args: bridge.apply({"params": params}, *args, method=method)
  raw, tokens = qformer("vision_tokens", features)  # LN_v(tokens): what HF gets as encoder_hidden_states
  return types.SimpleNamespace(hf=hf, head=head, bridge=bridge, params=params, qformer=qformer, features=features,
                               raw=raw, tokens=tokens, t_tokens=torch.from_numpy(np.array(tokens)),
                               ids=ids, mask=mask, t_ids=torch.from_numpy(ids).long(),
                               t_mask=torch.from_numpy(mask).long())


def _hf_queries(w, batch=B):
  return w.hf.query_tokens.expand(batch, -1, -1)


# --- 1. the query branch: modeling_blip_2.py Blip2QFormerModel.forward (query_length = K, no text) ------

def test_query_branch_matches_hf_qformer(world):
  w = world
  with torch.no_grad():
    ref = w.hf.qformer(query_embeds=_hf_queries(w), encoder_hidden_states=w.t_tokens).last_hidden_state
  ours = w.qformer("query_states", w.tokens)
  assert ours.shape == (B, K, H)
  d = _maxdiff(ours, _np(ref))
  print(f"query branch max abs diff {d:.2e}")
  assert d < TOL
  # LN_v is BLIP-2's ln_vision over every token of hidden_states[layer] (HF takes it as given)
  x = np.asarray(w.features.hidden_states[-2], np.float64)
  v = w.params["vision_norm"]
  ln_v = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * v["scale"] + v["bias"]
  assert _maxdiff(w.tokens, ln_v) < TOL and _maxdiff(w.raw, x) == 0
  # the bridge's output: LL_O of the same query states, and their mean as the image feature
  out = w.qformer("__call__", w.features)
  proj = w.params["proj"]
  assert _maxdiff(out.tokens, _np(ref) @ np.asarray(proj["kernel"]) + np.asarray(proj["bias"])) < TOL
  assert _maxdiff(out.image_feature, _np(ref).mean(1)) < TOL


# --- 2. the text-only pass: Blip2QFormerModel(Blip2TextEmbeddings(ids), query_length=0, attention_mask) -----
# (Blip2ForImageTextRetrieval.forward's ITC text side; LAVIS blip2_qformer.py: Qformer.bert(input_ids, mask))

def test_text_branch_matches_hf_qformer(world):
  w = world
  with torch.no_grad():
    ref = w.hf.qformer(query_embeds=w.hf.embeddings(input_ids=w.t_ids), query_length=0,
                       attention_mask=w.t_mask).last_hidden_state
  ours = np.asarray(w.qformer("text_states", jnp.asarray(w.ids), jnp.asarray(w.mask)))
  assert ours.shape == (B, T, H)
  real = w.mask.astype(bool)
  d = _maxdiff(ours[real], _np(ref)[real])
  print(f"text branch max abs diff (real positions) {d:.2e}")
  assert d < TOL
  # padding changes nothing at the real positions: each row alone, unpadded
  for row, n in list(enumerate(LENGTHS))[1:]:  # the padded rows
    alone = w.qformer("text_states", jnp.asarray(w.ids[row:row + 1, :n]), jnp.ones((1, n), jnp.int32))
    assert _maxdiff(alone[0], ours[row, :n]) < TOL


# --- 3. ITM: Blip2ForImageTextRetrieval.forward(use_image_text_matching_head=True) --------------------

def test_itm_logits_match_hf_retrieval(world):
  w = world
  with torch.no_grad():
    ref = w.hf(pixel_values=w.t_tokens, input_ids=w.t_ids, attention_mask=w.t_mask,
               use_image_text_matching_head=True).logits_per_image
  assert tuple(ref.shape) == (B, 2)
  joint = w.qformer("joint_states", w.tokens, jnp.asarray(w.ids), jnp.asarray(w.mask), False)
  assert joint.shape == (B, K + T, H)
  d = _maxdiff(w.qformer("itm_logits", joint), _np(ref))
  print(f"ITM logits max abs diff {d:.2e}")
  assert d < TOL
  # the same pass on mismatched pairs (as representation_loss's negatives): image b with text b+1
  perm = np.roll(np.arange(B), -1)
  with torch.no_grad():
    ref = w.hf(pixel_values=w.t_tokens, input_ids=w.t_ids[perm], attention_mask=w.t_mask[perm],
               use_image_text_matching_head=True).logits_per_image
  joint = w.qformer("joint_states", w.tokens, jnp.asarray(w.ids[perm]), jnp.asarray(w.mask[perm]), False)
  assert _maxdiff(w.qformer("itm_logits", joint), _np(ref)) < TOL


# --- 4. ITC: Blip2ForImageTextRetrieval.forward(use_image_text_matching_head=False) -------------------

def test_itc_similarities_match_hf_retrieval(world):
  w = world
  with torch.no_grad():
    out = w.hf(pixel_values=w.t_tokens, input_ids=w.t_ids, attention_mask=w.t_mask,
               use_image_text_matching_head=False)
  # HF pairs every image with every text: (B_img, K, 256) @ (256, B_txt) -> max over the K queries
  assert tuple(out.image_embeds.shape) == (B, K, 256) and tuple(out.text_embeds.shape) == (B, 256)
  assert tuple(out.logits_per_image.shape) == (B, B)
  query_emb, text_emb = w.qformer("itc_embeddings", w.qformer("query_states", w.tokens),
                                  w.qformer("text_states", jnp.asarray(w.ids), jnp.asarray(w.mask)))
  d_emb = max(_maxdiff(query_emb, _np(out.image_embeds)), _maxdiff(text_emb, _np(out.text_embeds)))
  sim = np.max(np.einsum("IKE,TE->ITK", np.asarray(query_emb), np.asarray(text_emb)), axis=-1)  # (B, B)
  d = _maxdiff(sim, _np(out.logits_per_image))
  print(f"ITC embeddings max abs diff {d_emb:.2e}, similarity matrix {d:.2e}")
  assert d_emb < TOL and d < TOL
  np.testing.assert_allclose(np.linalg.norm(np.asarray(query_emb), axis=-1), 1, atol=1e-6)
  temp = float(w.qformer("itc_temperature"))
  _, sim_i2t, sim_t2i = losses.qformer_itc_loss(query_emb, text_emb, jnp.asarray(temp))
  assert _maxdiff(np.asarray(sim_i2t) * temp, _np(out.logits_per_image)) < TOL
  assert _maxdiff(np.asarray(sim_t2i) * temp, _np(out.logits_per_text)) < TOL


# --- 5. ITG: LAVIS blip2_qformer.py (decoder ids, labels) + Qformer.py (UniLM mask, BertLMHeadModel) -----

def test_itg_mask_matches_lavis():
  mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], np.int64)
  k, t = 3, mask.shape[1]
  full = np.concatenate([np.ones((3, k), np.int64), mask], axis=1)  # LAVIS: cat([query_atts, text_atts])
  unilm = lavis_extended_mask(full, t, has_query=True)  # (B, K + T, K + T)
  np.testing.assert_array_equal(np.asarray(qformer_attention_mask(k, jnp.asarray(mask), True)), unilm.astype(bool))
  # LAVIS's ITG pass proper: the text rows only, the queries as past_key_values (has_query False)
  past = lavis_extended_mask(full, t, has_query=False)  # (B, T, K + T)
  np.testing.assert_array_equal(np.asarray(qformer_attention_mask(k, jnp.asarray(mask), True))[:, k:],
                                past.astype(bool))
  # ITM (LAVIS's encoder mask, is_decoder False: attention_mask[:, None, None, :]): all real positions
  np.testing.assert_array_equal(np.asarray(qformer_attention_mask(k, jnp.asarray(mask), False)),
                                np.broadcast_to(full[:, None, :], (3, k + t, k + t)).astype(bool))
  # spelled out for row 1 (2 real tokens): queries see queries; text t sees queries and real text <= t
  expected = np.zeros((k + t, k + t), bool)
  expected[:, :k] = True
  expected[k, k] = expected[k + 1, k:k + 2] = expected[k + 2, k:k + 2] = expected[k + 3, k:k + 2] = True
  np.testing.assert_array_equal(np.asarray(qformer_attention_mask(k, jnp.asarray(mask), True))[1], expected)


def test_itg_loss_matches_lavis(world):
  w = world
  decoder_ids = w.t_ids.clone()
  decoder_ids[:, 0] = DEC  # LAVIS: decoder_input_ids[:, 0] = bos_token_id ([DEC])
  labels = decoder_ids.masked_fill(w.t_mask == 0, -100)  # LAVIS masks pad_token_id (the padding) to -100
  full = torch.cat([torch.ones(B, K, dtype=torch.long), w.t_mask], dim=1)
  unilm = torch.from_numpy(lavis_extended_mask(full.numpy(), T, has_query=True)).float()  # (B, K+T, K+T)
  additive = ((1.0 - unilm) * -10000.0)[:, None]  # LAVIS's (1 - mask) * -10000, a 4-D mask HF takes as given
  with torch.no_grad():
    joint = w.hf.qformer(query_embeds=w.hf.embeddings(input_ids=decoder_ids, query_embeds=_hf_queries(w)),
                         query_length=K, attention_mask=additive, encoder_hidden_states=w.t_tokens).last_hidden_state
    query_only = w.hf.qformer(query_embeds=_hf_queries(w), encoder_hidden_states=w.t_tokens).last_hidden_state
    logits = w.head(joint[:, K:])  # BertLMHeadModel: cls(sequence_output[:, query_length:])
    ref_loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), label_smoothing=0.1)
  # the queries see only the queries, so their states (and per-layer keys/values) are the query-only
  # pass's: LAVIS's past_key_values=query_output.past_key_values is the same computation
  assert _maxdiff(joint[:, :K], _np(query_only)) < TOL
  ours_joint = w.qformer("joint_states", w.tokens, jnp.asarray(decoder_ids.numpy()), jnp.asarray(w.mask), True)
  d_states = _maxdiff(ours_joint, _np(joint))
  ours_logits = w.qformer("itg_logits", ours_joint[:, K:])
  assert ours_logits.shape == (B, T, VOCAB)
  real = w.mask.astype(bool)
  d_logits = _maxdiff(np.asarray(ours_logits)[real], _np(logits)[real])
  ours_loss = losses.itg_loss(ours_logits, jnp.asarray(w.ids), jnp.asarray(w.mask))
  d_loss = abs(float(ours_loss) - float(ref_loss))
  # and on torch's logits themselves: only the loss formula
  d_formula = abs(float(losses.itg_loss(jnp.asarray(_np(logits)), jnp.asarray(w.ids), jnp.asarray(w.mask)))
                  - float(ref_loss))
  print(f"ITG states {d_states:.2e}, logits {d_logits:.2e}, loss {d_loss:.2e} (formula alone {d_formula:.2e}), "
        f"loss {float(ref_loss):.4f}")
  assert d_states < TOL and d_logits < TOL and d_loss < TOL and d_formula < 1e-6


# --- 6. ITC and ITM losses, hard negatives: LAVIS blip2_qformer.py Blip2Qformer.forward -----------------

def _lavis_itc(image_feats, text_feat, temp):
  """LAVIS's ITC (one device): sim_q2t from the images' side, sim_t2q from the texts', max over queries."""
  sim_q2t = torch.matmul(image_feats.unsqueeze(1), text_feat.unsqueeze(-1)).squeeze()  # (B, B, K)
  sim_i2t = sim_q2t.max(-1)[0] / temp
  sim_t2q = torch.matmul(text_feat.unsqueeze(1).unsqueeze(1), image_feats.permute(0, 2, 1)).squeeze()  # (B, B, K)
  sim_t2i = sim_t2q.max(-1)[0] / temp
  targets = torch.arange(image_feats.shape[0])
  loss = (F.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
          + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)) / 2
  return loss, sim_i2t, sim_t2i


def test_itc_loss_matches_lavis(world):
  w = world
  query_emb, text_emb = w.qformer("itc_embeddings", w.qformer("query_states", w.tokens),
                                  w.qformer("text_states", jnp.asarray(w.ids), jnp.asarray(w.mask)))
  rng = np.random.default_rng(3)  # and a bigger random batch
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  cases = [(np.asarray(query_emb), np.asarray(text_emb), float(w.qformer("itc_temperature"))),
           (unit(rng.standard_normal((6, 4, 256))).astype(np.float32),
            unit(rng.standard_normal((6, 256))).astype(np.float32), 0.05)]
  worst = 0.0
  for q, t, temp in cases:
    ref, ref_i2t, ref_t2i = _lavis_itc(torch.tensor(q), torch.tensor(t), temp)
    loss, sim_i2t, sim_t2i = losses.qformer_itc_loss(jnp.asarray(q), jnp.asarray(t), jnp.asarray(temp))
    worst = max(worst, abs(float(loss) - float(ref)) / max(1.0, abs(float(ref))))
    assert _maxdiff(sim_i2t, _np(ref_i2t)) < 1e-4 and _maxdiff(sim_t2i, _np(ref_t2i)) < 1e-4  # /temp: ~20x
  print(f"ITC loss max rel diff {worst:.2e}")
  assert worst < TOL
  # the clamp BLIP-2 applies to its temp before each step
  params = dict(w.params)
  for raw, clamped in ((0.07, 0.07), (1.0, 0.5), (1e-5, 0.001)):
    params["itc_temp"] = jnp.asarray(raw, jnp.float32)
    assert float(w.bridge.apply({"params": params}, method="itc_temperature")) == pytest.approx(clamped)


def test_itm_loss_matches_torch():
  logits = np.random.default_rng(4).standard_normal((3 * 4, 2)).astype(np.float32)
  labels = torch.cat([torch.ones(4, dtype=torch.long), torch.zeros(8, dtype=torch.long)])  # LAVIS's order
  ref = F.cross_entropy(torch.from_numpy(logits), labels)
  d = abs(float(losses.itm_loss(jnp.asarray(logits))) - float(ref))
  print(f"ITM loss abs diff {d:.2e}")
  assert d < TOL


def test_hard_negatives_follow_lavis_weights():
  n, draws = 4, 4000
  rng = np.random.default_rng(5)
  sim_i2t = (3 * rng.standard_normal((n, n))).astype(np.float32)  # asymmetric: the two sides differ
  sim_t2i = sim_i2t.T.copy()
  keys = jax.random.split(jax.random.key(7), draws)
  neg_image, neg_text = jax.jit(jax.vmap(lambda k: losses.hard_negatives(k, sim_i2t, sim_t2i)))(keys)
  neg_image, neg_text = np.asarray(neg_image), np.asarray(neg_text)  # (draws, n)
  assert not np.any(neg_image == np.arange(n)) and not np.any(neg_text == np.arange(n))  # never the positive

  def lavis_weights(sim):  # LAVIS HEAD: fill_diagonal_(-10000), then softmax over the row
    s = torch.from_numpy(sim.copy())
    s.fill_diagonal_(-10000)
    return F.softmax(s, dim=1).numpy()

  worst = 0.0
  for drawn, weights in ((neg_image, lavis_weights(sim_t2i)), (neg_text, lavis_weights(sim_i2t))):
    freq = np.stack([np.bincount(drawn[:, row], minlength=n) for row in range(n)]) / draws
    worst = max(worst, float(np.max(np.abs(freq - weights))))  # sampling sd <= 0.008
  print(f"hard negatives: max |frequency - LAVIS weight| over {draws} keys {worst:.3f}")
  assert worst < 0.035
  # one dominant off-diagonal similarity is drawn almost always, and from the right side
  sim_i2t = np.zeros((n, n), np.float32)
  sim_i2t[0, 2] = 20.0  # image 0 <-> text 2: so image 0's negative text is 2, text 2's negative image is 0
  neg_image, neg_text = jax.vmap(lambda k: losses.hard_negatives(k, sim_i2t, sim_i2t.T))(keys[:500])
  assert np.mean(np.asarray(neg_text)[:, 0] == 2) > 0.99 and np.mean(np.asarray(neg_image)[:, 2] == 0) > 0.99
  assert np.mean(np.asarray(neg_text)[:, 1] == 2) < 0.6  # image 1 has no favourite: uniform over 0, 2, 3
