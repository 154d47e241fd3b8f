"""Samplers over a trained denoiser: MDLM ancestral, confidence remasking, semi-AR blocks.

Every sampler is a pure function of a denoiser callback

    denoise(x_BxL, t_B, r_B) -> (logits_BxLxV, loops_B)

(t_B: diffusion time fed to the model; r_B: fraction of the initially masked positions still
masked, used by mask-ratio loop schedules; loops_B: loop iterations the call executed per
sequence). `from_logits_fn` adapts a plain `(x, t) -> logits` function. The whole sampler is one
`fori_loop` over denoising steps, so it jits into one program; `steps` is free of training.

Prompts and infilling: every position of the input that is not [MASK] is given and is never
written (samplers only ever write masked positions); after the last step no [MASK] remains.

Cache (MDLM): when no token changed since the last model call, the logits are the same and the
call is skipped. That holds only when the logits depend on x alone: time conditioning off and a
loop policy that does not depend on t. The caller decides (`cache=`); skipped calls are not
counted in `nfe` and execute no loops.

Endpoint of the ancestral sampler (`final_step`): "sample" runs the grid t_j = 1 - j / steps to
t = 0 and draws every position still masked at the last step; "argmax" (MDLM's `_sample` with
`noise_removal`) runs t_j = 1 - j (1 - eps) / steps to t = eps, then one more denoiser call at
t = eps fills the positions still masked with the argmax token (steps + 1 calls, and steps + 1
rows in `loops_TxB` / `unmasked_TxB`). `sampler_endpoint` reads both from the diffusion config.

Categorical sampling precision: Gumbel-max in float32 with u ~ U[0, 1) quantises -log(-log u)
near its maximum, truncating the tail and lowering the effective temperature (Zheng et al. 2024,
arXiv:2409.02908; MDLM/LLaDA switch to float64). We stay in float32 (float64 needs global x64)
and use the equivalent exponential race argmax_i(log p_i - log E_i), E_i ~ Exp(1), drawing
E = -log1p(-v) from v = bits32 * 2^-32: the *small* E that decide the winner keep full float32
relative precision down to 2^-32, where Gumbel-from-uniform loses it (checked against a float64
NumPy reference in tests/test_samplers.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from loopjax.diffusion.schedules import make_schedule

METHODS = ("ancestral", "confidence")
FINAL_STEPS = ("sample", "argmax")


def sampler_endpoint(diffusion_cfg) -> dict:
  """{"final_step", "eps"} of the ancestral sampler from the `diffusion` config section
  (`final_step`, `sample_eps`; sample_eps 0 = the schedule's eps). Raises ValueError."""
  final = diffusion_cfg.get("final_step", "sample")
  if final not in FINAL_STEPS:
    raise ValueError(f"diffusion.final_step must be one of {FINAL_STEPS}, got {final!r}")
  eps = float(diffusion_cfg.get("sample_eps", 0.0) or make_schedule(diffusion_cfg).eps)
  if not 0.0 < eps < 1.0:
    raise ValueError(f"diffusion.sample_eps must be in [0, 1) (0: diffusion.eps), got {eps}")
  return {"final_step": final, "eps": eps}


def from_logits_fn(logits_fn):
  """Denoiser from a plain `logits_fn(x_BxL, t_B) -> logits` (reports 1 loop per call)."""
  def denoise(x_BxL, t_B, r_B):
    del r_B
    return logits_fn(x_BxL, t_B), jnp.ones(x_BxL.shape[:1], jnp.int32)
  return denoise


def filter_logits(logits_BxLxV, top_k: int = 0, top_p: float = 1.0):
  """Sets logits outside the top-k / the top-p nucleus to -inf (the argmax always survives)."""
  x = logits_BxLxV.astype(jnp.float32)
  if top_k and top_k < x.shape[-1]:
    kth = jax.lax.top_k(x, top_k)[0][..., -1:]
    x = jnp.where(x < kth, -jnp.inf, x)
  if top_p < 1.0:
    srt = jnp.sort(x, axis=-1)[..., ::-1]
    p = jax.nn.softmax(srt, axis=-1)
    keep = (jnp.cumsum(p, axis=-1) - p) < top_p  # tokens before the nucleus is full
    thresh = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where(x < thresh, -jnp.inf, x)
  return x


def exponential32(rng, shape):
  """Exp(1) draws in float32 with full relative precision for small values (see module doc)."""
  v = jax.random.bits(rng, shape, jnp.uint32).astype(jnp.float32) * (2.0**-32)
  v = jnp.minimum(v, 1.0 - 2.0**-24)  # the uint32 -> float32 rounding may reach 1.0
  return jnp.maximum(-jnp.log1p(-v), 2.0**-33)  # v = 0 (p = 2^-32): smallest positive instead


def step_noise(rng, s, shape_BxLxV, method: str = "ancestral"):
  """The random numbers a sampler draws at its iteration s from `rng` (the sampler's key; for
  semi-AR block k, fold_in(rng, 10_000 + k)): (e_BxLxV, u_BxL), Exp(1) draws for the token race
  (`sample_categorical`) and, for the ancestral sampler, U[0, 1) draws that decide which masked
  positions are unmasked (None for the confidence sampler). Another implementation fed these
  numbers (the PyTorch export's `sample(noise=...)`) draws the same tokens."""
  key = jax.random.fold_in(rng, s)
  if method == "confidence":
    return exponential32(key, shape_BxLxV), None
  r_tok, r_mask = jax.random.split(key)
  return exponential32(r_tok, shape_BxLxV), jax.random.uniform(r_mask, shape_BxLxV[:-1])


def sample_categorical(rng, logits_BxLxV, temperature: float = 1.0, top_k: int = 0,
                       top_p: float = 1.0, e_BxLxV=None):
  """Draws one token per position. Returns (ids_BxL int32, prob_BxL of the chosen id).

  temperature 0 is greedy (argmax). prob is under the filtered, tempered distribution (the
  softmax at temperature 1 when greedy): the confidence of the choice. e_BxLxV: the Exp(1)
  draws of the race (default: drawn from rng).
  """
  if temperature == 0:
    logp = jax.nn.log_softmax(filter_logits(logits_BxLxV, top_k, top_p), axis=-1)
    ids = jnp.argmax(logp, axis=-1)
  else:  # temperature first, then the top-k / nucleus filter (as HF generate)
    scaled = logits_BxLxV.astype(jnp.float32) / temperature
    logp = jax.nn.log_softmax(filter_logits(scaled, top_k, top_p), axis=-1)
    e = exponential32(rng, logp.shape) if e_BxLxV is None else e_BxLxV
    ids = jnp.argmax(logp - jnp.log(e), axis=-1)
  prob = jnp.exp(jnp.take_along_axis(logp, ids[..., None], axis=-1)[..., 0])
  return ids.astype(jnp.int32), prob


def _mask_prob(schedule, t):
  return jnp.asarray(t, jnp.float32) if schedule is None else schedule.mask_prob(t)


def _drive(denoise, rng, x_BxL, mask_id, steps, eligible_BxL, cache, update, time_fn=None,
           calls=None):
  """The shared step loop: calls the denoiser (or reuses its cached logits) and `update`s x.

  update(rng, x, logits, masked_BxL, n0_B, s) -> x (rng: the sampler's key, `step_noise`
  derives iteration s's draws from it); time_fn(s): the time fed to the denoiser
  at iteration s (default (steps - s) / steps); calls: iterations (default steps). Returns the
  sampler's result dict.
  """
  time_fn = time_fn or (lambda s: (steps - s) / steps)
  calls = steps if calls is None else calls
  if steps < 1:
    raise ValueError(f"denoising steps must be >= 1, got {steps}")
  b = x_BxL.shape[0]
  masked0 = x_BxL == mask_id
  if eligible_BxL is not None:
    masked0 = masked0 & eligible_BxL
  n0_B = masked0.sum(-1)

  def call(x, s):
    masked = (x == mask_id) & masked0
    r_B = masked.sum(-1).astype(jnp.float32) / jnp.maximum(n0_B, 1).astype(jnp.float32)
    t_B = jnp.full((b,), time_fn(s), jnp.float32)
    logits, loops_B = denoise(x, t_B, r_B)
    return logits.astype(jnp.float32), loops_B.astype(jnp.int32)

  logits0, _ = jax.eval_shape(call, x_BxL, jnp.int32(0))

  def body(s, carry):
    x, logits_c, key_x, nfe, loops_TxB, unmasked_TxB = carry
    masked = (x == mask_id) & masked0
    if cache:
      fresh = (s == 0) | jnp.any(x != key_x)
      logits, loops_B = jax.lax.cond(
          fresh, lambda: call(x, s), lambda: (logits_c, jnp.zeros((b,), jnp.int32)))
    else:
      fresh = jnp.bool_(True)
      logits, loops_B = call(x, s)
    x_new = update(rng, x, logits, masked, n0_B, s)
    x_new = jnp.where(masked, x_new, x)  # only masked, eligible positions are ever written
    unmasked_B = (masked & (x_new != mask_id)).sum(-1).astype(jnp.int32)
    return (x_new, logits, x, nfe + fresh.astype(jnp.int32), loops_TxB.at[s].set(loops_B),
            unmasked_TxB.at[s].set(unmasked_B))

  init = (x_BxL, jnp.zeros(logits0.shape, jnp.float32), x_BxL, jnp.int32(0),
          jnp.zeros((calls, b), jnp.int32), jnp.zeros((calls, b), jnp.int32))
  x, _, _, nfe, loops_TxB, unmasked_TxB = jax.lax.fori_loop(0, calls, body, init)
  return {"tokens": x, "nfe": nfe, "loops_TxB": loops_TxB, "unmasked_TxB": unmasked_TxB}


def ancestral_sample(denoise, rng, x_BxL, mask_id: int, steps: int, schedule=None, *,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     cache: bool = True, eligible_BxL=None, final_step: str = "sample",
                     eps: float = 1e-3):
  """MDLM ancestral sampling on the grid t_j = 1 - j / steps (final_step "sample") or
  t_j = 1 - j (1 - eps) / steps followed by an argmax fill at t = eps ("argmax").

  Step t -> s: each masked position is unmasked with probability (m(t) - m(s)) / m(t),
  m = schedule.mask_prob (linear when schedule is None), its token drawn from the model;
  unmasked tokens are carried over. "sample": m(0) = 0, so the last step unmasks everything
  left; each position is unmasked at step j with probability m(t_j) - m(t_{j+1}). "argmax":
  a position is still masked at t = eps with probability m(eps) and then takes the argmax.
  """
  if final_step not in FINAL_STEPS:
    raise ValueError(f"final_step must be one of {FINAL_STEPS}, got {final_step!r}")
  if not 0.0 < eps < 1.0:
    raise ValueError(f"eps must be in (0, 1), got {eps}")
  argmax_end = final_step == "argmax"
  if argmax_end:
    time_fn = lambda s: 1.0 - s * (1.0 - eps) / steps
  else:
    time_fn = lambda s: (steps - s) / steps

  def update(rng, x, logits, masked, n0_B, s):
    del n0_B
    m_t, m_s = _mask_prob(schedule, time_fn(s)), _mask_prob(schedule, time_fn(s + 1))
    p_unmask = jnp.where(m_t > 0, (m_t - m_s) / jnp.maximum(m_t, 1e-30), 1.0)
    e, u = step_noise(rng, s, logits.shape, "ancestral")
    ids, _ = sample_categorical(None, logits, temperature, top_k, top_p, e)
    if argmax_end:  # iteration `steps` is the noise removal: every remaining mask, argmax
      p_unmask = jnp.where(s == steps, 1.0, p_unmask)
      ids = jnp.where(s == steps, jnp.argmax(logits, axis=-1).astype(ids.dtype), ids)
    else:
      p_unmask = jnp.where(s == steps - 1, 1.0, p_unmask)
    go = masked & (u < p_unmask)
    return jnp.where(go, ids.astype(x.dtype), x)

  return _drive(denoise, rng, x_BxL, mask_id, steps, eligible_BxL, cache, update, time_fn,
                steps + 1 if argmax_end else steps)


def confidence_sample(denoise, rng, x_BxL, mask_id: int, steps: int, schedule=None, *,
                      temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                      cache: bool = True, eligible_BxL=None):
  """Confidence remasking (MaskGIT-style): commit the most confident predictions, per sequence.

  Every masked position gets a candidate (greedy at temperature 0, else sampled with top-k /
  top-p); its confidence is the candidate's probability. The k most confident are committed and
  the lowest-confidence ones stay masked. k: schedule None -> ceil(remaining / steps_left)
  (even spread); else enough that floor(n0 * m(t_next)) stay masked. The last step commits all.
  """
  def update(rng, x, logits, masked, n0_B, s):
    remaining = masked.sum(-1)
    if schedule is None:
      k_B = -(-remaining // (steps - s))
    else:
      keep = jnp.floor(n0_B * _mask_prob(schedule, (steps - s - 1) / steps)).astype(jnp.int32)
      k_B = jnp.where(s == steps - 1, remaining, jnp.maximum(remaining - keep, 0))
    e, _ = step_noise(rng, s, logits.shape, "confidence")
    ids, conf = sample_categorical(None, logits, temperature, top_k, top_p, e)
    conf = jnp.where(masked, conf, -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-conf, axis=-1), axis=-1)
    commit = masked & (rank < k_B[:, None])
    return jnp.where(commit, ids.astype(x.dtype), x)

  return _drive(denoise, rng, x_BxL, mask_id, steps, eligible_BxL, cache, update)


def sample(denoise, rng, x_BxL, mask_id: int, steps: int, *, method: str = "ancestral",
           schedule=None, block_len: int = 0, temperature: float | None = None,
           top_k: int = 0, top_p: float = 1.0, cache: bool = True, final_step: str = "sample",
           eps: float = 1e-3):
  """Fills every [MASK] of x_BxL. block_len > 0: semi-autoregressive block decoding.

  Semi-AR: positions are cut into blocks of `block_len`, decoded left to right, each with
  max(1, steps // num_blocks) steps of `method`; later blocks stay masked (and visible to the
  bidirectional denoiser as masks) until their turn. temperature None: the method's default
  (1 for ancestral, 0 = greedy for confidence). final_step / eps: the ancestral sampler's
  endpoint (module docstring; `sampler_endpoint` reads them from a config); the confidence
  sampler commits every remaining position at its last step either way.

  Returns {"tokens", "nfe" (model calls), "loops_TxB" (loops executed per step and sequence, 0
  for cached steps), "unmasked_TxB" (tokens unmasked per step and sequence)}.
  """
  if method not in METHODS:
    raise ValueError(f"sampler must be one of {METHODS}, got {method!r}")
  fn = ancestral_sample if method == "ancestral" else confidence_sample
  temp = (1.0 if method == "ancestral" else 0.0) if temperature is None else float(temperature)
  kw = dict(temperature=temp, top_k=top_k, top_p=top_p, cache=cache)
  if method == "ancestral":
    kw.update(final_step=final_step, eps=eps)
  elif final_step not in FINAL_STEPS:
    raise ValueError(f"final_step must be one of {FINAL_STEPS}, got {final_step!r}")
  length = x_BxL.shape[1]
  if not block_len or block_len >= length:
    return fn(denoise, rng, x_BxL, mask_id, steps, schedule, **kw)
  num_blocks = -(-length // block_len)
  per_block = max(1, steps // num_blocks)
  pos_L = jnp.arange(length)
  outs, x = [], x_BxL
  for k in range(num_blocks):
    eligible = ((pos_L >= k * block_len) & (pos_L < (k + 1) * block_len))[None, :]
    out = fn(denoise, jax.random.fold_in(rng, 10_000 + k), x, mask_id, per_block, schedule,
             eligible_BxL=jnp.broadcast_to(eligible, x.shape), **kw)
    outs.append(out)
    x = out["tokens"]
  return {"tokens": x, "nfe": sum(o["nfe"] for o in outs),
          "loops_TxB": jnp.concatenate([o["loops_TxB"] for o in outs]),
          "unmasked_TxB": jnp.concatenate([o["unmasked_TxB"] for o in outs])}
