"""bench/train_step.py --peer's side: the same recipe in transformers eager PyTorch (its module
docstring says what runs), specified here from the config and run by `peer_worker` in the
`--peer-worker` subprocess, which JAX never enters. A helper of bench/train_step.py, not a script.
"""

from __future__ import annotations

import math
import statistics
import time

from train_step_model import random_batch


def hf_configs(vision, llm) -> tuple[dict, dict]:
  """transformers CLIPVisionConfig / GemmaConfig keyword arguments for the same shapes."""
  if llm.family != "gemma":
    raise SystemExit(f"--peer supports Gemma 1 shapes only, got family {llm.family!r}")
  clip = dict(hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
              num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_heads,
              image_size=vision.image_size, patch_size=vision.patch_size, num_channels=vision.num_channels,
              layer_norm_eps=vision.layer_norm_eps, hidden_act=vision.hidden_act)
  gemma = dict(vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
               num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads,
               num_key_value_heads=llm.num_kv_heads, head_dim=llm.head_dim, rms_norm_eps=llm.rms_norm_eps,
               hidden_act=llm.hidden_act, hidden_activation=llm.hidden_act, rope_theta=llm.rope_theta,
               max_position_embeddings=llm.max_position_embeddings, bos_token_id=llm.bos_token_id,
               pad_token_id=llm.pad_token_id, eos_token_id=llm.eos_token_ids[0], tie_word_embeddings=True)
  return clip, gemma


def peer_spec(config, vision, llm, k: int, *, batch_size: int, text_len: int, warmup: int, steps: int) -> dict:
  clip, gemma = hf_configs(vision, llm)
  bridge = config.bridge
  linear = bridge.name == "cls_linear"
  return {
      "clip": clip, "gemma": gemma, "batch_size": batch_size, "text_len": text_len, "k": k,
      "layer": int(bridge.get("layer", -1)), "post_norm": bool(bridge.get("post_norm", False)),
      "embed_dim": config.ret.embed_dim, "dtype": config.compute_dtype, "warmup": warmup, "steps": steps,
      "optim": {key: config.optim[key] for key in ("lr", "b1", "b2", "eps", "weight_decay", "grad_clip")},
      "loss": {key: float(config.loss[key]) for key in ("caption", "text", "contrastive")},
      "batch": {key: value.tolist() for key, value in
                random_batch(0, batch_size, text_len, vision, llm).items() if key != "image"},
      "peer_bridge": "linear" if linear else f"linear (stands in for {bridge.name}), k={k}",
  }


def peer_worker(spec: dict) -> dict:
  """FROMAGe's step in transformers eager torch: frozen CLIP + Gemma, linear bridge, [RET], InfoNCE."""
  import numpy as np
  import torch
  import torch.nn.functional as F
  import transformers

  cuda = torch.cuda.is_available()
  device = torch.device("cuda" if cuda else "cpu")
  dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[spec["dtype"]]
  torch.manual_seed(0)
  # built in float32 on the device, then cast: `dtype=` / `torch_dtype=` differ across transformers versions
  build = lambda cls, cfg: cls._from_config(cfg, attn_implementation="sdpa").to(device=device, dtype=dtype).eval()
  with torch.device(device):
    clip = build(transformers.CLIPVisionModel, transformers.CLIPVisionConfig(**spec["clip"]))
    lm = build(transformers.GemmaForCausalLM, transformers.GemmaConfig(**spec["gemma"]))
  for p in list(clip.parameters()) + list(lm.parameters()):
    p.requires_grad_(False)
  B, K = spec["batch_size"], spec["k"]
  W, D, E = spec["clip"]["hidden_size"], spec["gemma"]["hidden_size"], spec["embed_dim"]
  V = spec["gemma"]["vocab_size"]
  with torch.device(device):  # trainable, float32 as in bridgejax
    bridge, text_proj, image_proj = torch.nn.Linear(W, D * K), torch.nn.Linear(D, E), torch.nn.Linear(W, E)
    ret_row = torch.nn.Parameter(torch.randn(1, D))
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
  trainable = [*bridge.parameters(), *text_proj.parameters(), *image_proj.parameters(), ret_row, logit_scale]
  o = spec["optim"]
  optimizer = torch.optim.AdamW(trainable, lr=o["lr"], betas=(o["b1"], o["b2"]), eps=o["eps"],
                                weight_decay=o["weight_decay"])
  ids = torch.tensor(spec["batch"]["text_ids"], device=device)
  mask = torch.tensor(spec["batch"]["text_mask"], device=device)
  image = torch.randn(B, spec["clip"]["num_channels"], spec["clip"]["image_size"], spec["clip"]["image_size"],
                      device=device, dtype=dtype)
  table = lm.get_input_embeddings()
  weights = spec["loss"]

  def run_lm(embeds, attention_mask):
    hidden = lm.model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
    logits = torch.cat([lm.lm_head(hidden), hidden @ ret_row.to(dtype).T], dim=-1)
    return logits, hidden

  def ce(logits, labels, target_mask):  # next-token CE over target positions
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, V + 1), labels[:, 1:].reshape(-1), reduction="none")
    m = target_mask[:, 1:].reshape(-1).float()
    return (nll * m).sum() / m.sum().clamp(min=1)

  def step():
    with torch.no_grad():
      out = clip(pixel_values=image, output_hidden_states=True)
      layer = spec["layer"]
      feature = out.hidden_states[layer][:, 0]
      if spec["post_norm"]:
        feature = getattr(clip, "vision_model", clip).post_layernorm(feature)  # moved in transformers 5
    feature = feature.float()
    tokens = bridge(feature).view(B, K, D).to(dtype)
    is_ret = ids == V
    text = table(ids.clamp(max=V - 1))
    text = torch.where(is_ret[..., None], ret_row.to(dtype).expand_as(text), text)
    cap_mask = mask * (~is_ret)
    ones = torch.ones(B, K, dtype=mask.dtype, device=device)
    logits, _ = run_lm(torch.cat([tokens, text], 1), torch.cat([ones, cap_mask], 1))
    labels = torch.cat([torch.zeros_like(ones), ids], 1)
    caption = ce(logits, labels, torch.cat([torch.zeros_like(ones), cap_mask], 1))
    logits, hidden = run_lm(text, mask)
    text_loss = ce(logits, ids, mask)
    last = mask.sum(1) - 1
    text_emb = F.normalize(text_proj(hidden[torch.arange(B, device=device), last].float()), dim=-1)
    image_emb = F.normalize(image_proj(feature), dim=-1)
    sims = logit_scale.exp() * image_emb @ text_emb.T
    target = torch.arange(B, device=device)
    contrastive = (F.cross_entropy(sims, target) + F.cross_entropy(sims.T, target)) / 2
    loss = weights["caption"] * caption + weights["text"] * text_loss + weights["contrastive"] * contrastive
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if o["grad_clip"]:
      torch.nn.utils.clip_grad_norm_(trainable, o["grad_clip"])
    optimizer.step()
    with torch.no_grad():  # FROMAGe keeps the [RET] row at the frozen rows' mean norm
      ret_row.mul_(row_norm / ret_row.norm())
    return loss

  row_norm = table.weight.float().norm(dim=-1).mean()
  times = []
  for i in range(spec["warmup"] + spec["steps"]):
    start = time.perf_counter()
    loss = step()
    loss = float(loss)  # syncs
    if cuda:
      torch.cuda.synchronize()
    if i >= spec["warmup"]:
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  return {"peer_step_s": step_s, "peer_step_s_all": times, "peer_samples_per_s": B / step_s,
          "peer_loss": loss, "peer_peak_bytes": int(torch.cuda.max_memory_allocated()) if cuda else None,
          "peer_device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
          "peer_dtype": spec["dtype"], "peer_attention": "sdpa", "peer_concat": False,
          "peer_bridge": spec["peer_bridge"], "torch": torch.__version__, "transformers": transformers.__version__,
          "numpy": np.__version__}
