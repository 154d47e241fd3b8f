"""An independent NumPy (float64) forward pass of an exported loopjax model.

Reads only OUT/config.json and OUT/model.safetensors and imports neither JAX nor the rest of
loopjax: every number it uses (norm eps, RoPE base, time-embedding frequencies, loop block,
execution order) comes from config.json, so it checks that the export is self-describing, and
it runs wherever NumPy and safetensors do. float32 files go through `safetensors.numpy`;
bfloat16 files are decoded by hand (NumPy has no bfloat16 without ml_dtypes).

    from loopjax import reference
    cfg, w = reference.load(OUT)
    logits_BxLxV = reference.forward(cfg, w, tokens_BxL, loops=None, t_B=None,
                                     segment_ids_BxL=None)
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from safetensors.numpy import load_file


def load(out_dir: str):
  """(config.json as a dict, {tensor name: float64 array})."""
  with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as f:
    cfg = json.load(f)
  path = os.path.join(out_dir, cfg["weights"]["file"])
  weights = _load_bf16(path) if cfg["weights"]["dtype"] == "bfloat16" else load_file(path)
  return cfg, {k: np.asarray(v).astype(np.float64) for k, v in weights.items()}


def _load_bf16(path):
  """bfloat16 safetensors without ml_dtypes: a bf16 value is the top half of a float32."""
  with open(path, "rb") as f:
    raw = f.read()
  n = int.from_bytes(raw[:8], "little")
  header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    assert info["dtype"] == "BF16", (name, info["dtype"])
    lo, hi = info["data_offsets"]
    bits = np.frombuffer(data[lo:hi], "<u2").astype(np.uint32) << 16
    out[name] = bits.view("<f4").reshape(info["shape"])
  return out


def _layer_norm(x, scale, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * scale


def _silu(x):
  return x / (1.0 + np.exp(-x))


def _gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _rope(x_BxLxHxK, base):
  k, length = x_BxLxHxK.shape[-1], x_BxLxHxK.shape[1]
  inv_freq = 1.0 / base ** (np.arange(0, k, 2) / k)
  ang = np.arange(length)[:, None] * inv_freq[None, :]
  cos, sin = np.cos(ang)[None, :, None, :], np.sin(ang)[None, :, None, :]
  x1, x2 = x_BxLxHxK[..., : k // 2], x_BxLxHxK[..., k // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def _layer(w, p, x, c, allowed_Bx1xLxL, arch, eps, rope_base):
  """One adaLN pre-norm block; p is the tensor name prefix ("layers.3." / "loop_block.0.")."""
  mod = c @ w[p + "adaln.kernel"] + w[p + "adaln.bias"]
  shift1, scale1, gate1, shift2, scale2, gate2 = np.split(mod[:, None, :], 6, axis=-1)
  y = _layer_norm(x, w[p + "norm_attn.scale"], eps) * (1 + scale1) + shift1
  q = _rope(np.einsum("bld,dhk->blhk", y, w[p + "attn.query.kernel"]), rope_base)
  k = _rope(np.einsum("bld,dhk->blhk", y, w[p + "attn.key.kernel"]), rope_base)
  v = np.einsum("bld,dhk->blhk", y, w[p + "attn.value.kernel"])
  logits = np.einsum("bqhk,bthk->bhqt", q, k) / math.sqrt(q.shape[-1])
  probs = _softmax(np.where(allowed_Bx1xLxL, logits, -np.inf))
  att = np.einsum("bhqt,bthk->bqhk", probs, v)
  x = x + gate1 * np.einsum("blhk,hkd->bld", att, w[p + "attn.out.kernel"])
  y = _layer_norm(x, w[p + "norm_mlp.scale"], eps) * (1 + scale2) + shift2
  if arch["mlp_type"] == "swiglu":
    hid = _silu(y @ w[p + "mlp.wi_gate.kernel"]) * (y @ w[p + "mlp.wi_up.kernel"])
    out = hid @ w[p + "mlp.wo.kernel"]
  else:
    hid = _gelu_tanh(y @ w[p + "mlp.wi.kernel"] + w[p + "mlp.wi.bias"])
    out = hid @ w[p + "mlp.wo.kernel"] + w[p + "mlp.wo.bias"]
  return x + gate2 * out


def forward(cfg, w, tokens_BxL, loops=None, t_B=None, segment_ids_BxL=None):
  """Logits B x L x V (float64) for S = `loops` (default: config's loop.default_loops)."""
  arch, loop, maths = cfg["architecture"], cfg["loop"], cfg.get("math", {})
  eps = float(maths.get("layer_norm", {}).get("eps", arch.get("norm_eps", 1e-6)))
  rope_base = float(maths.get("rope", {}).get("base", arch.get("rope_base", 10000.0)))
  time_cfg = maths.get("time_embedding", {})
  max_loops = int(loop.get("max_train_loops", arch["max_loops"]))
  tokens_BxL = np.asarray(tokens_BxL)
  b, length = tokens_BxL.shape
  # Time conditioning: sinusoidal features -> fc1 -> silu -> fc2 -> silu; t = 0 when off.
  t = np.zeros(b) if (t_B is None or not arch["time_conditioning"]) else np.asarray(t_B, float)
  half = int(time_cfg.get("freq_dim", 256)) // 2
  period = float(time_cfg.get("max_period", 10000.0))
  args = t[:, None] * np.exp(-math.log(period) * np.arange(half) / half)[None, :]
  emb = np.concatenate([np.cos(args), np.sin(args)], axis=-1)
  c = _silu(_silu(emb @ w["time_embed.fc1.kernel"] + w["time_embed.fc1.bias"])
            @ w["time_embed.fc2.kernel"] + w["time_embed.fc2.bias"])
  if segment_ids_BxL is None:
    allowed = np.ones((b, 1, length, length), bool)
  else:
    seg = np.asarray(segment_ids_BxL)
    allowed = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)) | np.eye(length,
                                                                                      dtype=bool)
    allowed = allowed[:, None]
  run = lambda prefix, x: _layer(w, prefix, x, c, allowed, arch, eps, rope_base)

  h = w["embed.embedding"][tokens_BxL]
  n, (a, e) = arch["num_layers"], loop["block"]
  if not loop["looped"]:
    a = e = n
  for i in range(a):  # head: layers 0..a-1
    h = run(f"layers.{i}.", h)
  if loop["looped"]:
    s = loop["default_loops"] if loops is None else int(loops)
    h0 = h
    for it in range(s):
      x = h + (h0 if loop["input_injection"] else 0.0)
      if loop["loop_embedding"]:
        x = x + w["loop_embedding"][min(it, max_loops - 1)][None, None, :]
      for j in range(e - a):
        x = run(f"loop_block.{j}.", x)
      h = x
  for i in range(e, n):  # tail: layers b..n-1 (absolute indices)
    h = run(f"layers.{i}.", h)
  shift, scale = np.split((c @ w["output.adaln.kernel"] + w["output.adaln.bias"])[:, None, :], 2,
                          axis=-1)
  h = _layer_norm(h, w["output.norm.scale"], eps) * (1 + scale) + shift
  # The head may hold padded columns (config "vocab_padding"): the real vocabulary comes first.
  v = int(cfg["vocab_size"])
  return h @ w["output.proj.kernel"][:, :v] + w["output.proj.bias"][:v]
