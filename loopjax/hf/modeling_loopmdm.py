"""A loopjax LoopMDM denoiser in PyTorch, for `AutoModelForMaskedLM` (remote code).

    h = head(embed(x_t));  h = block(h) repeated S times (one set of weights);  logits = tail(h)

Parameters keep loopjax's export names and layout (`y = x @ kernel + bias`; attention kernels
D x H x K and H x K x D), so `model.safetensors` loads as written. The loop count S is a forward
argument (`loops=`; default: the config's `default_loops`, S_max of training); any S >= 1 runs,
S > S_max included (not with a learned loop embedding, which has S_max rows). `adaptive_tau`
stops each sequence once the relative change of the block's hidden state on its [MASK]
positions, ||h_i - h_{i-1}|| / ||h_{i-1}||, falls below tau (after `min_loops`, at most `loops`
iterations). Padding (`attention_mask` 0) and packed documents (`segment_ids`, 0 = padding):
a position attends to positions of its own segment, a padding position only to itself.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_loopmdm import LoopMDMConfig


@dataclass
class LoopMDMOutput(MaskedLMOutput):
  """MaskedLMOutput with `loops`: loop iterations executed per sequence (LongTensor B)."""

  loops: Optional[torch.LongTensor] = None


class Dense(nn.Module):
  """y = x @ kernel (+ bias), the kernel stored in_features x out_features; `zero`: initialised
  to zero (the adaLN projections)."""

  def __init__(self, d_in, d_out, bias=True, zero=False):
    super().__init__()
    self.zero = zero
    self.kernel = nn.Parameter(torch.empty(d_in, d_out))
    self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None

  def forward(self, x):
    y = x.to(self.kernel.dtype) @ self.kernel
    return y + self.bias if self.bias is not None else y


class LayerNorm(nn.Module):
  """Scale only, no bias; statistics in float32."""

  def __init__(self, width, eps):
    super().__init__()
    self.scale, self.eps = nn.Parameter(torch.ones(width)), eps

  def forward(self, x):
    y = F.layer_norm(x.float(), x.shape[-1:], self.scale.float(), None, self.eps)
    return y.to(self.scale.dtype)


class Embedding(nn.Module):
  def __init__(self, n, width):
    super().__init__()
    self.embedding = nn.Parameter(torch.empty(n, width))

  def forward(self, ids):
    return self.embedding[ids]


def rope_tables(length, k, base, device):
  """cos, sin of the rotation angles, L x K/2, computed in float64 and rounded to float32."""
  inv_freq = 1.0 / base ** (torch.arange(0, k, 2, dtype=torch.float64, device=device) / k)
  ang = torch.arange(length, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
  return torch.cos(ang).float(), torch.sin(ang).float()


def rope(x_BxLxHxK, cos_LxK2, sin_LxK2):
  """Rotary position embedding, rotate-half form, in float32."""
  cos, sin = cos_LxK2[None, :, None, :], sin_LxK2[None, :, None, :]
  x1, x2 = x_BxLxHxK.float().chunk(2, dim=-1)
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x_BxLxHxK.dtype)


class Kernel(nn.Module):
  """A bias-free attention kernel whose first `n_in` axes are contracted with the input."""

  def __init__(self, *shape, n_in=1):
    super().__init__()
    self.kernel, self.fan_in = nn.Parameter(torch.empty(*shape)), math.prod(shape[:n_in])


class Attention(nn.Module):
  def __init__(self, config):
    super().__init__()
    d, h = config.width, config.num_heads
    k = d // h
    self.query, self.key, self.value = Kernel(d, h, k), Kernel(d, h, k), Kernel(d, h, k)
    self.out = Kernel(h, k, d, n_in=2)

  def forward(self, x_BxLxD, allowed_Bx1xLxL, rope_cs):
    proj = lambda m: torch.einsum("bld,dhk->blhk", x_BxLxD, m.kernel)
    q, k, v = rope(proj(self.query), *rope_cs), rope(proj(self.key), *rope_cs), proj(self.value)
    # softmax(q k^T / sqrt(K)) over the allowed keys (every row allows at least its own key).
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=allowed_Bx1xLxL)
    return torch.einsum("bhlk,hkd->bld", out, self.out.kernel)


class Mlp(nn.Module):
  def __init__(self, config):
    super().__init__()
    d, f = config.width, config.mlp_dim
    self.swiglu = config.mlp_type == "swiglu"
    if self.swiglu:
      self.wi_gate, self.wi_up, self.wo = Dense(d, f, False), Dense(d, f, False), Dense(f, d, False)
    else:
      self.wi, self.wo = Dense(d, f), Dense(f, d)

  def forward(self, x):
    if self.swiglu:
      return self.wo(F.silu(self.wi_gate(x)) * self.wi_up(x))
    return self.wo(F.gelu(self.wi(x), approximate="tanh"))


class Block(nn.Module):
  """Pre-norm transformer layer with adaLN (shift, scale, gate) modulation from c."""

  def __init__(self, config):
    super().__init__()
    self.adaln = Dense(config.cond_dim, 6 * config.width, zero=True)
    self.norm_attn = LayerNorm(config.width, config.norm_eps)
    self.norm_mlp = LayerNorm(config.width, config.norm_eps)
    self.attn, self.mlp = Attention(config), Mlp(config)

  def forward(self, x, c_BxC, allowed, rope_cs):
    shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(c_BxC)[:, None, :].chunk(6, -1)
    y = self.norm_attn(x) * (1 + scale1) + shift1
    x = x + gate1 * self.attn(y, allowed, rope_cs)
    y = self.norm_mlp(x) * (1 + scale2) + shift2
    return x + gate2 * self.mlp(y)


class TimeEmbedding(nn.Module):
  """Sinusoidal features [cos, sin] of t -> fc1 -> silu -> fc2 -> silu."""

  def __init__(self, config):
    super().__init__()
    self.freq_dim, self.max_period = config.freq_dim, config.max_period
    self.fc1, self.fc2 = Dense(config.freq_dim, config.cond_dim), Dense(config.cond_dim,
                                                                        config.cond_dim)

  def forward(self, t_B):
    half = self.freq_dim // 2
    freqs = torch.exp(-math.log(self.max_period) *
                      torch.arange(half, dtype=torch.float32, device=t_B.device) / half)
    args = t_B.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.silu(self.fc2(F.silu(self.fc1(emb))))


class OutputLayer(nn.Module):
  def __init__(self, config):
    super().__init__()
    self.adaln = Dense(config.cond_dim, 2 * config.width, zero=True)
    self.norm = LayerNorm(config.width, config.norm_eps)
    self.proj = Dense(config.width, config.padded_vocab)
    self.vocab_size = config.vocab_size

  def forward(self, h, c_BxC):
    shift, scale = self.adaln(c_BxC)[:, None, :].chunk(2, -1)
    # Columns past the vocabulary are padding of the table (no token): sliced off.
    return self.proj(self.norm(h) * (1 + scale) + shift).float()[..., :self.vocab_size]


class LoopMDMPreTrainedModel(PreTrainedModel):
  config_class = LoopMDMConfig
  base_model_prefix = "loopmdm"
  supports_gradient_checkpointing = False
  _no_split_modules = ["Block"]

  @torch.no_grad()
  def _init_weights(self, module):
    """loopjax's init: fan-in normal kernels, zero adaLN and biases, unit norm scales."""
    if isinstance(module, Dense) and module.zero:
      module.kernel.zero_()
    elif isinstance(module, (Dense, Kernel)):
      module.kernel.normal_(0.0, getattr(module, "fan_in", module.kernel.shape[0]) ** -0.5)
    if isinstance(module, Dense) and module.bias is not None:
      module.bias.zero_()
    elif isinstance(module, LayerNorm):
      module.scale.fill_(1.0)
    elif isinstance(module, Embedding):
      module.embedding.normal_(0.0, 1.0)
    elif isinstance(module, LoopMDMForMaskedLM) and module.loop_embedding is not None:
      module.loop_embedding.normal_(0.0, 0.02)


class LoopMDMForMaskedLM(LoopMDMPreTrainedModel):
  """The denoiser: `model(input_ids, loops=S).logits` is B x L x vocab_size (float32)."""

  def __init__(self, config):
    super().__init__(config)
    a, b, n = config.loop_start, config.loop_end, config.num_layers
    if not config.looped:
      a = b = n
    self.embed = Embedding(config.embedding_rows,
                           config.width)
    self.time_embed = TimeEmbedding(config)
    # Absolute layer indices: head [0, a) and tail [b, n); the looped block's layers a..b-1
    # are loop_block.0 .. loop_block.(b-a-1), stored once.
    self.layers = nn.ModuleDict({str(i): Block(config) for i in [*range(a), *range(b, n)]})
    self.loop_block = nn.ModuleList([Block(config) for _ in range(b - a)])
    self.loop_embedding = (nn.Parameter(torch.zeros(config.max_train_loops, config.width))
                           if config.looped and config.loop_embedding else None)
    self.output = OutputLayer(config)
    self._span = (a, b, n)
    self.post_init()

  def _allowed(self, input_ids, attention_mask, segment_ids):
    """B x 1 x L x L: i sees j iff same segment id > 0, or i == j (no ids: everyone)."""
    b, length = input_ids.shape
    seg = None if segment_ids is None else segment_ids.long()
    if attention_mask is not None:
      keep = (attention_mask > 0).long()
      seg = keep if seg is None else seg * keep
    if seg is None:
      return torch.ones(b, 1, length, length, dtype=torch.bool, device=input_ids.device)
    eye = torch.eye(length, dtype=torch.bool, device=input_ids.device)[None]
    allowed = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] > 0)) | eye
    return allowed[:, None]

  def forward(self, input_ids, attention_mask=None, segment_ids=None, loops=None, timesteps=None,
              adaptive_tau=None, min_loops=1, labels=None, output_hidden_states=None,
              return_dict=True, **kwargs):
    """Logits over the real vocabulary for S = `loops` iterations of the looped block.

    input_ids: B x L in [0, vocab_size], [MASK] = vocab_size. attention_mask: B x L, 0 =
    padding. segment_ids: B x L document ids of packed rows (0 = padding). timesteps: B
    diffusion times (used only by time-conditioned models). adaptive_tau: None runs exactly
    `loops` iterations; a float stops each sequence early (see the module docstring).
    output_hidden_states: `.hidden_states` = (the looped block's input, its hidden state after
    every executed iteration); without a looped block, (the last layer's output,).
    labels: B x L target ids (-100 ignored): `.loss` is their mean cross-entropy.
    """
    cfg = self.config
    a, b, n = self._span
    batch, length = input_ids.shape
    if length > cfg.max_position_embeddings:
      raise ValueError(f"sequence length {length} exceeds the model's max_length "
                       f"{cfg.max_position_embeddings}")
    s = int(cfg.default_loops if loops is None else loops)
    if s < 1:
      raise ValueError(f"loops must be >= 1, got {s}")
    if self.loop_embedding is not None and s > cfg.max_train_loops:
      raise ValueError(f"loops={s}: this model has a learned loop embedding with "
                       f"{cfg.max_train_loops} rows (S_max), so it cannot run more iterations")
    dev = input_ids.device
    t = (torch.zeros(batch, device=dev) if timesteps is None or not cfg.time_conditioning
         else torch.as_tensor(timesteps, dtype=torch.float32, device=dev).expand(batch))
    c = self.time_embed(t)
    allowed = self._allowed(input_ids, attention_mask, segment_ids)
    rope_cs = rope_tables(length, cfg.width // cfg.num_heads, cfg.rope_base, dev)
    h = self.embed(input_ids).to(self.output.proj.kernel.dtype)
    for i in range(a):
      h = self.layers[str(i)](h, c, allowed, rope_cs)
    loops_B = torch.ones(batch, dtype=torch.long, device=dev)
    hiddens = [h]
    if cfg.looped:
      h, loops_B, hiddens = self._loop(h, c, allowed, rope_cs, s, input_ids == cfg.mask_id,
                                       adaptive_tau, min_loops)
    for i in range(b, n):
      h = self.layers[str(i)](h, c, allowed, rope_cs)
    if not cfg.looped:
      hiddens = [h]
    logits = self.output(h, c)
    loss = None
    if labels is not None:
      loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                             ignore_index=-100)
    out = LoopMDMOutput(loss=loss, logits=logits, loops=loops_B,
                        hidden_states=tuple(hiddens) if output_hidden_states else None)
    return out if return_dict else out.to_tuple()

  def _loop(self, h, c, allowed, rope_cs, s, watch_BxL, tau, min_loops):
    """At most s iterations of the block; per sequence, stop once the relative change of h on
    the watched positions is below tau (after min_loops). Returns (h, loops_B, hiddens)."""
    h0, hiddens = h, [h]
    active = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
    loops_B = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
    w = watch_BxL.to(torch.float32)[..., None]
    for i in range(s):
      x = h + h0 if self.config.loop_inject else h
      if self.loop_embedding is not None:
        x = x + self.loop_embedding[min(i, self.config.max_train_loops - 1)][None, None, :]
      for layer in self.loop_block:
        x = layer(x, c, allowed, rope_cs)
      new = x
      loops_B = loops_B + active.long()
      if tau is None:
        h = new
      else:
        num = (w * (new.float() - h.float()) ** 2).sum((1, 2))
        den = (w * h.float() ** 2).sum((1, 2))
        change = torch.where(den > 0, torch.sqrt(num / den.clamp_min(1e-30)), 0.0)
        h = torch.where(active[:, None, None], new, h)
        active = active & ((i + 1 < min_loops) | (change >= tau))
      hiddens.append(h)
      if not bool(active.any()):
        break
    return h, loops_B, hiddens

  @torch.no_grad()
  def sample(self, input_ids, steps, *, method="ancestral", loops=None, adaptive_tau=None,
             min_loops=1, temperature=None, top_k=0, top_p=1.0, final_step=None, eps=None,
             schedule=None, block_len=0, attention_mask=None, segment_ids=None, cache=None,
             noise=None, generator=None):
    """Fills every [MASK] of `input_ids` (B x L); other tokens are given and kept (prompts,
    infilling). Returns `(tokens B x L, nfe)`: nfe counts model calls (cached steps excluded).

    method "ancestral" (MDLM): time runs 1 -> 0 over `steps`; from t to s each masked position
    is unmasked with probability (m(t) - m(s)) / m(t), m the noise schedule's mask probability,
    its token drawn from the model. final_step "sample" ends at t = 0 (the last step unmasks
    everything left); "argmax" ends at t = eps and fills what is still masked with the argmax
    token in one more call (steps + 1 calls). Defaults: the run's endpoint (config `sampling`).
    method "confidence": every masked position gets a candidate (greedy at temperature 0, the
    default) and the most confident are committed, as many as leave floor(n0 m(t_next))
    masked (`schedule="even"`: ceil(remaining / steps left)); the last step commits all.
    loops / adaptive_tau / min_loops: the looped block's iterations per call (`forward`).
    temperature, then top_k / top_p (nucleus) filter the distribution tokens are drawn from.
    block_len > 0: semi-autoregressive decoding, blocks of block_len positions left to right,
    each with max(1, steps // blocks) steps of `method`; `noise` then gets (block, step).
    schedule: "linear", "cosine" or "poly" (default: the config's `noise_schedule`).
    cache: reuse the last logits while no token changed (exact only when the logits depend on
    the tokens alone; default: on for models without time conditioning).
    noise: `noise(step, shape_BxLxV) -> (e_BxLxV, u_BxL)`, the random numbers of that step:
    Exp(1) draws e for the token race argmax(log_softmax(logits / T) - log e) and U[0, 1)
    draws u for the unmasking (ancestral only; the confidence sampler's u may be None). loopjax's
    `samplers.step_noise` gives the numbers loopjax's sampler uses, so both draw the same
    tokens. Default: drawn with torch (`generator`).
    """
    cfg = self.config
    if method not in ("ancestral", "confidence"):
      raise ValueError(f"method must be 'ancestral' or 'confidence', got {method!r}")
    if steps < 1:
      raise ValueError(f"steps must be >= 1, got {steps}")
    sampling = dict(getattr(cfg, "sampling", None) or {})
    noise_cfg = dict(getattr(cfg, "noise_schedule", None) or {})
    final_step = final_step or sampling.get("final_step", "sample")
    if final_step not in ("sample", "argmax"):
      raise ValueError(f"final_step must be 'sample' or 'argmax', got {final_step!r}")
    eps = float(eps if eps is not None else sampling.get("eps", noise_cfg.get("eps", 1e-3)))
    schedule = schedule or noise_cfg.get("schedule") or "linear"
    exponent = float(noise_cfg.get("exponent", 1.0))
    if schedule not in ("linear", "cosine", "poly", "even"):
      raise ValueError(f"schedule must be linear, cosine, poly or even, got {schedule!r}")
    temp = float((1.0 if method == "ancestral" else 0.0) if temperature is None else temperature)
    cache = (not cfg.time_conditioning) if cache is None else bool(cache)
    noise = noise or _torch_noise(generator)
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)
    m = lambda t: _mask_prob(schedule if schedule != "even" else "linear", t, exponent)
    argmax_end = method == "ancestral" and final_step == "argmax"

    def fill(x, steps, eligible, noise):
      """One sampler run over the masked positions of `eligible` (None: all)."""
      b, dev = x.shape[0], x.device
      masked0 = (x == cfg.mask_id) if eligible is None else (x == cfg.mask_id) & eligible
      n0_B = masked0.sum(-1)
      if argmax_end:  # float32 arithmetic in loopjax's order: the thresholds agree bit for bit
        time_fn = lambda s: f32(1.0) - f32(s) * f32(1.0 - eps) / f32(steps)
      else:
        time_fn = lambda s: f32(steps - s) / f32(steps)
      logits, last, nfe = None, None, 0
      for s in range(steps + 1 if argmax_end else steps):
        masked = (x == cfg.mask_id) & masked0
        if not (cache and last is not None and torch.equal(x, last)):
          t_B = time_fn(s).expand(b).to(dev)
          logits = self(x, attention_mask=attention_mask, segment_ids=segment_ids, loops=loops,
                        timesteps=t_B, adaptive_tau=adaptive_tau, min_loops=min_loops).logits
          logits, nfe = logits.float(), nfe + 1
        last = x
        e, u = noise(s, tuple(logits.shape))
        e = torch.as_tensor(e, dtype=torch.float32, device=dev)[..., :logits.shape[-1]]
        ids, conf = _categorical(logits, temp, e, top_k, top_p)
        if method == "ancestral":
          m_t, m_s = m(time_fn(s)), m(time_fn(s + 1))
          p = (m_t - m_s) / torch.clamp(m_t, min=1e-30) if m_t > 0 else f32(1.0)
          if argmax_end and s == steps:
            p, ids = f32(1.0), logits.argmax(-1)
          elif not argmax_end and s == steps - 1:
            p = f32(1.0)
          go = masked & (torch.as_tensor(u, dtype=torch.float32, device=dev) < p.to(dev))
        else:
          remaining = masked.sum(-1)
          if schedule == "even":
            k_B = -(-remaining // (steps - s))
          else:
            keep = torch.floor(n0_B.float() * m(f32(steps - s - 1) / f32(steps)).to(dev)).long()
            k_B = remaining if s == steps - 1 else torch.clamp(remaining - keep, min=0)
          conf = torch.where(masked, conf, torch.full_like(conf, -math.inf))
          rank = torch.argsort(torch.argsort(-conf, dim=-1, stable=True), dim=-1, stable=True)
          go = masked & (rank < k_B[:, None])
        x = torch.where(go, ids.to(x.dtype), x)
      return x, nfe

    x, length = input_ids.clone(), input_ids.shape[1]
    if not block_len or block_len >= length:
      return fill(x, steps, None, noise)
    # Semi-autoregressive: blocks left to right, max(1, steps // blocks) steps each; later
    # blocks stay masked (and visible as masks) until their turn.
    num_blocks = -(-length // block_len)
    pos = torch.arange(length, device=x.device)
    nfe = 0
    for k in range(num_blocks):
      eligible = ((pos >= k * block_len) & (pos < (k + 1) * block_len))[None, :]
      x, n = fill(x, max(1, steps // num_blocks), eligible,
                  lambda s, shape, k=k: noise((k, s), shape))
      nfe += n
    return x, nfe


def _mask_prob(name, t, exponent):
  """m(t) = 1 - alpha(t) of the noise schedule, float32, clipped to [0, 1]."""
  if name == "linear":
    m = t
  elif name == "cosine":
    m = 2.0 * torch.sin(0.25 * math.pi * t) ** 2
  else:
    m = t ** exponent
  return torch.clamp(m, 0.0, 1.0)


def _filter(x, top_k, top_p):
  """Logits outside the top-k / the top-p nucleus set to -inf (the argmax always survives)."""
  if top_k and top_k < x.shape[-1]:
    kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
    x = torch.where(x < kth, torch.full_like(x, -math.inf), x)
  if top_p < 1.0:
    srt = torch.sort(x, dim=-1, descending=True).values
    p = torch.softmax(srt, dim=-1)
    keep = (torch.cumsum(p, dim=-1) - p) < top_p  # tokens before the nucleus is full
    thresh = torch.where(keep, srt, torch.full_like(srt, math.inf)).min(-1, keepdim=True).values
    x = torch.where(x < thresh, torch.full_like(x, -math.inf), x)
  return x


def _categorical(logits_BxLxV, temperature, e_BxLxV, top_k=0, top_p=1.0):
  """(ids, probability of each id): greedy at temperature 0, else the exponential race
  argmax(log p - log e) with e ~ Exp(1) (a categorical draw from p = softmax(logits / T)),
  p filtered to the top-k / top-p tokens."""
  if temperature == 0:
    logp = torch.log_softmax(_filter(logits_BxLxV, top_k, top_p), dim=-1)
    ids = logp.argmax(-1)
  else:
    logp = torch.log_softmax(_filter(logits_BxLxV / temperature, top_k, top_p), dim=-1)
    ids = (logp - torch.log(e_BxLxV)).argmax(-1)
  return ids, torch.exp(torch.gather(logp, -1, ids[..., None])[..., 0])


def _torch_noise(generator):
  def noise(step, shape):
    del step
    v = torch.rand(shape, generator=generator, dtype=torch.float32)
    e = torch.clamp(-torch.log1p(-v), min=2.0**-33)
    return e, torch.rand(shape[:-1], generator=generator, dtype=torch.float32)
  return noise
