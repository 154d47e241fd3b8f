"""FLOP accounting and FLOP matching for looped (and plain) masked diffusion denoisers.

Conventions
-----------
* One multiply-add is **2 FLOPs**; only matrix multiplications are counted (the usual MFU
  convention). Norms, softmax, RoPE, activations, residual adds and biases are not counted: they are
  O(L*D) next to O(L*D^2) matmuls.
* Embedding lookup: **0 FLOPs** (a gather).
* Attention is bidirectional: QK^T and AV cost 2*2*L*L*D each sequence and layer, no causal halving.
* Per layer and sequence (D width, F MLP width, C cond dim, L length):
  QKVO 4*2*L*D*D, attention 2*2*L*L*D, MLP gelu 2*2*L*D*F / swiglu 3*2*L*D*F, adaLN modulation
  2*C*6D (computed once per sequence from the conditioning vector).
  Outside the layers: time-embedding MLP 2*256*C + 2*C*C, final adaLN 2*C*2D, output head 2*L*D*V.
* Executed layers for S loops: `cfg.executed_depth(S)` = head + block*S + tail.
* Training step = forward + backward = **3x forward** (backward: one matmul for the input
  gradient and one for the weight gradient per forward matmul). Rematerialisation re-runs (part
  of) the forward in the backward pass; that is *not* useful work and is not in the 3x used for
  MFU. `remat_overhead_flops_per_seq` reports it separately.
* Loop counts are drawn per step; every function here that takes a loop distribution computes the
  honest expectation sum_S P(S) F(S) (FLOPs are linear in S, so it equals F(E[S])).

FLOP matching (LoopMDM's rule): F_loop = F_base + (E[S] - 1) * n_m * F_layer, where n_m is the
number of looped layers. LoopMDM trains for steps_base * F_base / F_loop steps; the compute-matched deeper
MDM has n + (E[S] - 1) * n_m layers (23 for the paper setting).

The rule leaves F_base open; `matched_steps(..., convention=)` takes one of FLOP_CONVENTIONS:
  all_forward  F = every forward matmul above (layers, time MLP, final adaLN, output head)
  layers_only  F = executed layers x F_layer (the head and the rest outside the layers left out)
  6nd          F = 6 N per token, N = all parameters (`param_counts`), the looped block's layer
               parameters counted once per extra iteration: N + (E[S] - 1) n_m N_layer; no
               attention L^2 term.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from loopjax.model.config import ModelConfig
from loopjax.loops import LoopDistribution

TIME_FREQ_DIM = 256  # sinusoidal feature size of TimeEmbedding (loopjax/model/transformer.py).
TRAIN_MULTIPLIER = 3  # forward + backward.
FLOP_CONVENTIONS = ("all_forward", "layers_only", "6nd")

# ------------------------------------------------------------------------------------------------
# Analytic FLOPs.


def _check(length: int, loops: float = 1) -> None:
  if length < 1:
    raise ValueError(f"length must be >= 1, got {length}")
  if loops < 1:
    raise ValueError(f"loops must be >= 1, got {loops}")


def _depth(cfg: ModelConfig, loops: float) -> float:
  """Executed layers for `loops` iterations (float-valued so E[S] can be passed)."""
  return cfg.num_layers + cfg.block_layers * (loops - 1) if cfg.looped else float(cfg.num_layers)


def layer_flops_per_seq(cfg: ModelConfig, length: int) -> int:
  """Forward FLOPs of one transformer layer on one sequence of `length` tokens."""
  _check(length)
  d, f, c, n = cfg.width, cfg.mlp_dim, cfg.cond_dim, length
  qkvo = 4 * 2 * n * d * d
  attn = 2 * 2 * n * n * d  # QK^T and AV, bidirectional.
  mlp = (3 if cfg.mlp_type == "swiglu" else 2) * 2 * n * d * f
  adaln = 2 * c * 6 * d
  return qkvo + attn + mlp + adaln


def nonlayer_flops_per_seq(cfg: ModelConfig, length: int) -> int:
  """Forward FLOPs outside the transformer layers: time MLP, final adaLN, output head (all
  `padded_vocab` columns: the padded ones are computed too)."""
  _check(length)
  d, c, v = cfg.width, cfg.cond_dim, cfg.padded_vocab
  time_mlp = 2 * TIME_FREQ_DIM * c + 2 * c * c
  final_adaln = 2 * c * 2 * d
  head = 2 * length * d * v
  return time_mlp + final_adaln + head  # + embedding lookup: 0.


def forward_flops_per_seq(cfg: ModelConfig, length: int, loops: float = 1) -> float:
  """Forward FLOPs for one sequence with `loops` block iterations (any S >= 1, also > S_max)."""
  _check(length, loops)
  return _depth(cfg, loops) * layer_flops_per_seq(cfg, length) + nonlayer_flops_per_seq(cfg, length)


def forward_flops_per_token(cfg: ModelConfig, length: int, loops: float = 1) -> float:
  return forward_flops_per_seq(cfg, length, loops) / length


def train_flops_per_step(cfg: ModelConfig, length: int, batch_size: int, loops: float = 1) -> float:
  """Useful training FLOPs of one step (3x forward) at a fixed loop count."""
  return TRAIN_MULTIPLIER * batch_size * forward_flops_per_seq(cfg, length, loops)


def as_loop_distribution(dist: Any) -> LoopDistribution:
  """LoopDistribution from a LoopDistribution, a spec string ('uniform:1:12'), an int S or None
  (None = S = 1, the plain model)."""
  if dist is None:
    return LoopDistribution.parse("fixed:1")
  if isinstance(dist, LoopDistribution):
    return dist
  if isinstance(dist, int):
    return LoopDistribution.parse(f"fixed:{dist}")
  return LoopDistribution.parse(str(dist))


def _check_dist(cfg: ModelConfig, dist: LoopDistribution) -> None:
  if cfg.looped and any(p > 0 for p in dist.probs[cfg.max_loops:]):
    raise ValueError(f"loop distribution reaches S = {dist.max_loops} but model.max_loops is "
                     f"{cfg.max_loops}; the train step runs at most S_max iterations")


def expected_train_flops_per_step(cfg: ModelConfig, length: int, batch_size: int,
                                  loop_dist: Any = None) -> float:
  """E_S[train FLOPs per step] for S drawn from `loop_dist` (once per step, whole batch)."""
  dist = as_loop_distribution(loop_dist)
  _check_dist(cfg, dist)
  return sum(p * train_flops_per_step(cfg, length, batch_size, k + 1)
             for k, p in enumerate(dist.probs) if p > 0)


def inference_flops_per_sample(cfg: ModelConfig, length: int, loops: float,
                               denoising_steps: int) -> float:
  """FLOPs to generate one sequence: one full forward per denoising step (bidirectional, no KV
  cache). An upper bound for samplers that skip the network when no token changed."""
  if denoising_steps < 1:
    raise ValueError(f"denoising_steps must be >= 1, got {denoising_steps}")
  return denoising_steps * forward_flops_per_seq(cfg, length, loops)


def remat_overhead_flops_per_seq(cfg: ModelConfig, length: int, loops: float = 1) -> float:
  """Matmul FLOPs recomputed in the backward pass by remat, per sequence (not useful work).

  `cfg.remat` applies to the head and tail layers, `cfg.loop_remat` to the looped block's
  `loops` iterations. full / save_attn_out: the whole layer forward is recomputed; dots: no
  matmul recomputed; dots_no_batch: the batched attention einsums (QK^T, AV) are recomputed.
  """
  def per_layer(policy):
    if policy in ("full", "save_attn_out"):
      return layer_flops_per_seq(cfg, length)
    if policy == "dots_no_batch":
      return 2 * 2 * length * length * cfg.width
    return 0.0

  looped = cfg.block_layers * loops if cfg.looped else 0.0
  return (cfg.num_layers - (cfg.block_layers if cfg.looped else 0)) * per_layer(cfg.remat) + \
      looped * per_layer(cfg.loop_remat)


# ------------------------------------------------------------------------------------------------
# FLOP matching.


def train_flops_per_step_as(cfg: ModelConfig, length: int, batch_size: int, loop_dist: Any = None,
                            convention: str = "all_forward") -> float:
  """E_S[training FLOPs per step] counted by one of FLOP_CONVENTIONS (module docstring)."""
  if convention not in FLOP_CONVENTIONS:
    raise ValueError(f"FLOP convention must be one of {FLOP_CONVENTIONS}, got {convention!r}")
  if convention == "all_forward":
    return expected_train_flops_per_step(cfg, length, batch_size, loop_dist)
  dist = as_loop_distribution(loop_dist)
  _check_dist(cfg, dist)
  _check(length)
  depth = _depth(cfg, dist.expected if cfg.looped else 1.0)
  if convention == "layers_only":
    return TRAIN_MULTIPLIER * batch_size * depth * layer_flops_per_seq(cfg, length)
  counts = param_counts(cfg)
  n_eff = counts["total"] + (depth - cfg.num_layers) * counts["per_layer"]
  return 6.0 * n_eff * batch_size * length


def matched_steps(cfg_a: ModelConfig, dist_a: Any, cfg_b: ModelConfig, dist_b: Any, steps_b: float,
                  length: int, batch_a: int, batch_b: int | None = None,
                  convention: str = "all_forward") -> float:
  """Training steps model A needs so its total expected training FLOPs equal B's `steps_b` steps.

  Float (round as you like). For a looped A against its own non-looped base this is the paper's
  rule steps_b * F_base / F_loop with F_loop = F_base + (E[S] - 1) * n_m * F_layer, F counted
  by `convention` (FLOP_CONVENTIONS).
  """
  batch_b = batch_a if batch_b is None else batch_b
  fa = train_flops_per_step_as(cfg_a, length, batch_a, dist_a, convention)
  fb = train_flops_per_step_as(cfg_b, length, batch_b, dist_b, convention)
  return steps_b * fb / fa


def matched_depth(cfg: ModelConfig, dist: Any, length: int) -> tuple[float, int]:
  """Layers of a non-looped MDM of the same width (and vocab, MLP, cond dim) whose per-step
  compute equals `cfg`'s expected per-step compute. Returns (exact float, rounded int)."""
  plain = _plain(cfg, cfg.num_layers)
  target = expected_train_flops_per_step(cfg, length, 1, dist) / TRAIN_MULTIPLIER
  n = (target - nonlayer_flops_per_seq(plain, length)) / layer_flops_per_seq(plain, length)
  return n, int(round(n))


def _plain(cfg: ModelConfig, num_layers: int) -> ModelConfig:
  d = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}
  d.update(num_layers=num_layers, loop_start=0, loop_end=0, max_loops=1, loop_embedding=False,
           loop_inject=False, grad_last_k=0)
  return ModelConfig(**d)


# ------------------------------------------------------------------------------------------------
# Parameters.


def param_counts(cfg: ModelConfig) -> dict[str, int]:
  """Analytic parameter count by component (matches `count_params` of an initialised model)."""
  d, f, c, v = cfg.width, cfg.mlp_dim, cfg.cond_dim, cfg.padded_vocab
  mlp = 3 * d * f if cfg.mlp_type == "swiglu" else 2 * d * f + f + d
  layer = 4 * d * d + mlp + (c * 6 * d + 6 * d) + 2 * d  # attention, MLP, adaLN, two norms.
  out = {
      "embedding": cfg.input_vocab * d,  # vocab_size + 1 ([MASK]), padded
      "time_mlp": TIME_FREQ_DIM * c + c + c * c + c,
      "per_layer": layer,
      "layers": cfg.num_layers * layer,
      "loop_embedding": cfg.max_loops * d if cfg.looped and cfg.loop_embedding else 0,
      "output": (c * 2 * d + 2 * d) + d + (d * v + v),
  }
  out["total"] = sum(out[k] for k in ("embedding", "time_mlp", "layers", "loop_embedding", "output"))
  return out


def executed_depth_params_for(cfg: ModelConfig, loops: int) -> int:
  """Parameters a non-looped model with `cfg.executed_depth(loops)` layers would need."""
  return param_counts(_plain(cfg, cfg.executed_depth(loops)))["total"]


def param_report(cfg: ModelConfig) -> dict[str, Any]:
  """unique_params (what the checkpoint holds), the breakdown, and for every S in 1..S_max the
  parameters of a non-looped model of the same executed depth."""
  counts = param_counts(cfg)
  return {
      "unique_params": counts["total"],
      "breakdown": counts,
      "executed_depth_params": {s: executed_depth_params_for(cfg, s)
                                for s in range(1, cfg.max_loops + 1)},
  }


# ------------------------------------------------------------------------------------------------
# Peak FLOP/s.

# device_kind substring (lower case, most specific first) -> (bf16 dense peak, fp32 peak or None).
# On TPU, XLA's default matmul precision runs f32 dots as single bf16 passes, so the bf16 peak is
# the ceiling for float32 compute too.
PEAK_FLOPS = (
    ("tpu v6 lite", (918e12, 918e12)),
    ("tpu v6e", (918e12, 918e12)),
    ("tpu v5 lite", (197e12, 197e12)),
    ("tpu v5e", (197e12, 197e12)),
    ("tpu v5p", (459e12, 459e12)),
    ("tpu v5", (459e12, 459e12)),
    ("tpu v4", (275e12, 275e12)),
    ("a100", (312e12, 19.5e12)),
    ("h100 pcie", (756e12, 51e12)),
    ("h100", (989e12, 67e12)),  # SXM
    ("h200", (989e12, 67e12)),
)


def peak_flops_for_kind(device_kind: str, dtype: str = "bfloat16") -> float | None:
  """Table lookup by `device_kind`; None when the device is not in the table."""
  kind = device_kind.lower()
  for key, (bf16, fp32) in PEAK_FLOPS:
    if key in kind:
      return fp32 if dtype in ("float32", "fp32", "f32") else bf16
  return None


def peak_flops_per_device(device: Any = None, dtype: str = "bfloat16") -> float | None:
  """Peak FLOP/s of one device (`jax.devices()[0]` by default, or a Device, or a device_kind
  string). CPU: a measured float32 matmul peak (cached). Unknown accelerators: None."""
  if device is None:
    device = jax.devices()[0]
  if isinstance(device, str):
    kind, platform = device, device.lower()
  else:
    kind, platform = device.device_kind, device.platform
  if platform == "cpu" or kind.lower() == "cpu":
    return measure_cpu_matmul_peak()
  return peak_flops_for_kind(kind, dtype)


@functools.lru_cache(maxsize=None)
def measure_cpu_matmul_peak(n: int = 1024, repeats: int = 5) -> float:
  """Best-of-`repeats` FLOP/s of a jitted float32 n x n matmul (2 n^3 FLOPs) on the CPU."""
  dot = jax.jit(jnp.dot)
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  dot(a, b).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    t = time.perf_counter()
    dot(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / best


# ------------------------------------------------------------------------------------------------
# Cross-checks against what JAX/XLA actually compile.


def xla_flops(fn, *args) -> float:
  """XLA's cost-analysis FLOPs of `jax.jit(fn)` on `args` (arrays or ShapeDtypeStructs).

  Counts every op (elementwise ones too) but a while loop's body only once: build the model with
  `scan_unroll=True` and call it with a static S == max_loops (no cond) for a faithful count.
  """
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation.
    cost = cost[0] if cost else {}
  if not cost or "flops" not in cost:
    raise RuntimeError("XLA cost analysis returned no 'flops' entry on this backend")
  return float(cost["flops"])


def jaxpr_dot_flops(fn, *args) -> float:
  """Matmul FLOPs (2 * output size * contracted size of every dot_general) of `fn`'s jaxpr.

  An XLA-independent count that multiplies scan bodies by their length, takes the larger branch
  of a cond and counts a while body once; so use a static S == max_loops, as for `xla_flops`.
  """
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  # Drop dead code (flax's lifted scan leaves some) as XLA would. Private jax, so optional: jax
  # 0.10 has no public dead-code elimination of a jaxpr (jax.extend.core offers none).
  try:
    from jax._src.interpreters import partial_eval as pe
    jaxpr, _ = pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
  except Exception:  # pragma: no cover - older/newer jax without this helper.
    pass
  return _jaxpr_dots(jaxpr)


def _jaxpr_dots(jaxpr) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs_shape = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
          lhs_shape[i] for i in lhs_contract)
      continue
    subs = [_jaxpr_dots(getattr(j, "jaxpr", j)) for j in _sub_jaxprs(eqn.params)]
    if name == "cond":
      total += max(subs, default=0.0)
    elif name == "scan":
      total += eqn.params["length"] * sum(subs)
    else:
      total += sum(subs)
  return total


def _sub_jaxprs(params: Mapping[str, Any]):
  for v in params.values():
    for x in (v if isinstance(v, (tuple, list)) else (v,)):
      if hasattr(x, "eqns") or hasattr(getattr(x, "jaxpr", None), "eqns"):
        yield x
