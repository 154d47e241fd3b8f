"""Binds a trained LoopedTransformer to the samplers: loops per policy, timing, FLOPs.

The model's own `__call__` scans exactly S_max iterations; inference instead drives the looped
block itself (encode -> `run_loops` over `loop_chunk(..., length=1)` -> decode), so any S works
(S > S_max included: the block's weights have no loop axis), adaptive stopping is per sequence,
and compute follows the loops executed. The only refusal: a model with a learned loop-embedding
table (`loop_embedding`) has no row for iterations beyond S_max.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from loopjax.loops import LoopPolicy, batch_loops
from loopjax.diffusion.samplers import sample
from loopjax.flops import inference_flops_per_sample


def require_policy(loops) -> LoopPolicy:
  """`loops` itself when it is a LoopPolicy: the inference driver and the evaluations take a
  policy already resolved for the model, never a spec to parse."""
  if not isinstance(loops, LoopPolicy):
    raise TypeError(f"loops={loops!r}: pass a LoopPolicy resolved for the model, "
                    "`loaded.policy(spec)` of a loaded model (loopjax.io.load.Loaded), or "
                    "`loopjax.loops.resolve_policy(model.cfg, spec)` for a bare model")
  return loops


def cache_valid(cfg, policy: LoopPolicy) -> bool:
  """The MDLM cache is exact iff logits depend on x_t alone (see samplers.py)."""
  return not cfg.time_conditioning and not policy.time_dependent


def loop_args(policy: LoopPolicy):
  """The run-time numbers of a policy (`LoopPolicy.loop_args`): passed as arguments, so one
  compiled program serves every fixed S and every adaptive rule."""
  return policy.loop_args()


def compiled_policy(policy: LoopPolicy) -> LoopPolicy:
  """The static part of a policy (`LoopPolicy.compiled`): every fixed S compiles to the model's
  own loop, every adaptive rule to one while loop."""
  return policy.compiled()


def make_denoiser(model, params, policy: LoopPolicy, segment_ids_BxL=None, loop_arr=None):
  """denoise(x, t_B, r_B) -> (logits, loops_B) for the samplers and the NELBO.

  `loop_arr` = `loop_args(...)` (possibly traced) gives the policy's numbers at run time;
  without it they come from `policy`. A model without a looped block reports 1 loop per call.
  """
  cfg = model.cfg
  variables = {"params": params}

  def denoise(x_BxL, t_B, r_B):
    h0, c, mask, _ = model.apply(variables, x_BxL, t_B, segment_ids_BxL, method="encode")
    if not cfg.looped:
      h, loops_B = h0, jnp.ones((x_BxL.shape[0],), jnp.int32)
    else:
      step = lambda h, i: model.apply(variables, h, h0, c, mask, i, 1, method="loop_chunk")
      model_loop = lambda s: model.apply(variables, h0, c, mask, s, method="run_loop")
      h, loops_B = policy.run(step, model_loop, h0, x_BxL == cfg.mask_id, t_B, r_B, loop_arr)
    logits, _ = model.apply(variables, h, c, mask, method="decode")
    return logits, loops_B

  return denoise


def make_sampler(model, policy: LoopPolicy, *, steps: int, method: str = "ancestral",
                 schedule=None, block_len: int = 0, temperature=None, top_k: int = 0,
                 top_p: float = 1.0, cache: bool | None = None, final_step: str = "sample",
                 eps: float = 1e-3):
  """Jitted fn(params, rng, x_BxL, segment_ids_BxL, loop_args(policy)) -> sampler output.

  final_step / eps: the ancestral sampler's endpoint (`samplers.sampler_endpoint(config.diffusion)`
  gives a run's).

  Fixed and adaptive policies share one program (their numbers are arguments). cache None: on
  whenever it is exact (`cache_valid`); True where it is not exact is an error.
  """
  exact = cache_valid(model.cfg, policy)
  if cache and not exact:
    raise ValueError("the sampling cache is exact only with time conditioning off and a loop "
                     "policy that does not depend on t")
  use_cache = exact if cache is None else bool(cache)
  policy = compiled_policy(policy)
  key = ("sampler", id(model), policy, steps, method, schedule, block_len, temperature, top_k,
         top_p, use_cache, final_step, eps)
  return memo(key, model, lambda: _build_sampler(model, policy, steps, method, schedule,
                                                 block_len, temperature, top_k, top_p,
                                                 use_cache, final_step, eps))


_MEMO: dict = {}


def memo(key, owner, build):
  """Reuses jitted programs across calls (one compilation per model and static setting).
  `owner` is kept alive with the entry so that its id in the key stays unique."""
  if key not in _MEMO:
    _MEMO[key] = (owner, build())
  return _MEMO[key][1]


def _build_sampler(model, policy, steps, method, schedule, block_len, temperature, top_k, top_p,
                   use_cache, final_step="sample", eps=1e-3):
  @jax.jit
  def fn(params, rng, x_BxL, segment_ids_BxL, loop_arr):
    denoise = make_denoiser(model, params, policy, segment_ids_BxL, loop_arr)
    return sample(denoise, rng, x_BxL, model.cfg.mask_id, steps, method=method,
                  schedule=schedule, block_len=block_len, temperature=temperature,
                  top_k=top_k, top_p=top_p, cache=use_cache, final_step=final_step, eps=eps)

  return fn


_COMPILED: dict = {}


def timed(fn, *args):
  """(output, run seconds, compile seconds) of a jitted fn. Compiles ahead (once per fn and
  argument shapes) so the run time is the sampler's alone."""
  leaves, tree = jax.tree_util.tree_flatten(args)
  key = (id(fn), tree, tuple((np.shape(a), str(getattr(a, "dtype", type(a)))) for a in leaves))
  t0 = time.perf_counter()
  if key not in _COMPILED:
    _COMPILED[key] = (fn, fn.lower(*args).compile())  # fn kept alive: its id stays unique
  compiled = _COMPILED[key][1]
  t1 = time.perf_counter()
  out = jax.block_until_ready(compiled(*args))
  return out, time.perf_counter() - t1, t1 - t0


def generation_stats(cfg, length: int, out: dict) -> dict:
  """Loops and compute of one sampler output, per sequence and as executed.

  Per sequence: the loops each sequence's result took per model call (`loops_mean`, mean over
  sequences; `loops_max`), and `flops_per_sample` following them (FLOPs are linear in S, so
  calls x F(mean loops per call) is exact per sequence). That is what a sequence needed, not
  what was spent: a model call runs the whole batch for its slowest sequence's loops.
  Executed: `executed_loops` = sum over the model calls of the batch's loops (max over its
  sequences), `executed_loops_mean` = that per call, and `executed_flops_per_sample` = the FLOPs
  the batch executed divided by its size (every row runs every executed iteration). Fixed S and
  "time" schedules give equal figures; adaptive ones give executed >= per sequence.
  """
  loops_TxB = np.asarray(out["loops_TxB"], np.int64)
  nfe = int(out["nfe"])
  per_call_B = loops_TxB.sum(0) / max(nfe, 1)
  executed = int(np.asarray(batch_loops(loops_TxB)).sum())
  flops = executed_flops = None
  if nfe > 0:
    flops = float(np.mean([inference_flops_per_sample(cfg, length, max(float(s), 1.0), nfe)
                           for s in per_call_B]))
    executed_flops = float(inference_flops_per_sample(cfg, length, max(executed / nfe, 1.0),
                                                      nfe))
  return {"loops_mean": float(per_call_B.mean()), "loops_max": int(loops_TxB.max(initial=0)),
          "nfe": nfe, "flops_per_sample": flops, "executed_loops": executed,
          "executed_loops_mean": executed / max(nfe, 1),
          "executed_flops_per_sample": executed_flops, "batch_size": int(loops_TxB.shape[1])}
