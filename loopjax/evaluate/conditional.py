"""Conditional log-likelihood of a continuation given a context, for any loop policy.

loglik(context, continuation) = -NELBO(continuation | context): the masked-diffusion bound on
-log p(continuation | context) with the context never masked (the `fixed` positions of the NELBO)
and only continuation tokens scored, so loglik <= log p. The integral over t ~ U[eps, 1] is
estimated either on the fixed midpoint grid of `eval_time_grid` (`time_grid=K` points, one masking
draw each, as `heldout_nelbo`) or by Monte-Carlo (`mc_samples=N` i.i.d. times with one masking draw
each), both seeded. Every row is scored with the same key, so a request's value does not depend
on the batch it lands in, and a grid estimate equals `heldout_nelbo` of that single row.

Row layout (one compiled shape, length L = the model's row length):
  [context | continuation | padding]; context and padding fixed, continuation scored; padding has
  segment id 0 (attends to nothing real), context and continuation segment id 1.

Greedy: `is_greedy` is True when one denoiser call on the row with the whole continuation masked
(t = 1) has argmax equal to the continuation at every position. A masked diffusion model has no
left-to-right greedy decode; this is the single-step (parallel) greedy reading of it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from loopjax.data.batch import make_row, stack_rows
from loopjax.diffusion import eval_time_grid, nelbo_on_grid
from loopjax.inference.denoiser import compiled_policy, loop_args, make_denoiser, memo


def check_estimator(time_grid: int, mc_samples: int) -> None:
  """Exactly one of time_grid / mc_samples is positive."""
  if (time_grid > 0) == (mc_samples > 0) or min(time_grid, mc_samples) < 0:
    raise ValueError(f"give exactly one of time_grid > 0 (fixed grid) or mc_samples > 0 "
                     f"(Monte-Carlo), got time_grid={time_grid}, mc_samples={mc_samples}")


def make_loglik_fn(model, schedule, policy):
  """Jitted fn(params, rng, times_K, tokens_BxL, fixed_BxL, score_BxL, segment_ids_BxL,
  loop_args(policy)) -> (loglik_B nats, is_greedy_B): the NELBO at the K given times, time k
  masked with fold_in(rng, k) (as `nelbo_on_grid`). Both estimators run this one program."""
  policy = compiled_policy(policy)
  return memo(("loglik", id(model), schedule, policy), model,
              lambda: _build_loglik_fn(model, schedule, policy))


def estimator_times(schedule, rng, *, time_grid: int = 0, mc_samples: int = 0):
  """(times_K, masking key): the midpoint grid with `rng` itself (`make_nelbo_fn`'s times and
  key), or mc_samples i.i.d. U[eps, 1] draws with a key split from `rng`."""
  check_estimator(time_grid, mc_samples)
  if time_grid:
    return eval_time_grid(time_grid, schedule.eps), rng
  t_rng, mask_rng = jax.random.split(rng)
  return schedule.eps + (1.0 - schedule.eps) * jax.random.uniform(t_rng, (mc_samples,)), mask_rng


def _build_loglik_fn(model, schedule, policy):
  mask_id = model.cfg.mask_id

  @jax.jit
  def fn(params, rng, times_K, tokens_BxL, fixed_BxL, score_BxL, segment_ids_BxL, loop_arr):
    def one_row(tokens_L, fixed_L, score_L, seg_L):
      tokens, fixed, score = tokens_L[None], fixed_L[None], score_L[None]
      denoise = make_denoiser(model, params, policy, seg_L[None], loop_arr)
      maskable_B = jnp.maximum((~fixed).sum(-1), 1)

      def logits_fn(x_t, t_B):
        return denoise(x_t, t_B, (x_t == mask_id).sum(-1) / maskable_B)[0]

      out = nelbo_on_grid(logits_fn, rng, tokens, schedule, mask_id, times_K, fixed, score)
      all_masked = jnp.where(score, mask_id, tokens)
      guess = logits_fn(all_masked, jnp.ones((1,), jnp.float32)).argmax(-1)
      greedy = jnp.all((guess == tokens) | ~score)
      return -out["nelbo_sum"], greedy

    return jax.vmap(one_row)(tokens_BxL, fixed_BxL, score_BxL, segment_ids_BxL)

  return fn


def pair_row(context, continuation, *, seq_len: int, pad_id: int):
  """One row of the layout above from token lists; the context must already fit."""
  n_ctx, n_cont = len(context), len(continuation)
  if n_cont == 0 or n_ctx + n_cont > seq_len:
    raise ValueError(f"a continuation of {n_cont} tokens after {n_ctx} context tokens does not "
                     f"fit a row of {seq_len} (need 1 <= continuation, total <= {seq_len})")
  tokens = np.full(seq_len, pad_id, np.int32)
  tokens[:n_ctx + n_cont] = list(context) + list(continuation)
  pos = np.arange(seq_len)
  score = (pos >= n_ctx) & (pos < n_ctx + n_cont)
  return make_row(tokens, fixed=~score, loss_mask=score,
                  segment_ids=(pos < n_ctx + n_cont).astype(np.int32))


def conditional_loglik(model, params, schedule, policy, pairs, *, seq_len: int, pad_id: int,
                       batch_size: int = 16, time_grid: int = 0, mc_samples: int = 0,
                       seed: int = 0) -> list[tuple[float, bool]]:
  """[(loglik nats, is_greedy)] of (context_ids, continuation_ids) pairs at loop policy `policy`
  (a resolved LoopPolicy). Batches are padded to `batch_size` rows (one compiled shape)."""
  fn = make_loglik_fn(model, schedule, policy)
  times, rng = estimator_times(schedule, jax.random.PRNGKey(seed), time_grid=time_grid,
                               mc_samples=mc_samples)
  rows = [pair_row(c, x, seq_len=seq_len, pad_id=pad_id) for c, x in pairs]
  filler = make_row(np.full(seq_len, pad_id, np.int32), fixed=np.ones(seq_len, bool),
                    loss_mask=np.zeros(seq_len, bool), segment_ids=np.zeros(seq_len, np.int32))
  out = []
  for k in range(0, len(rows), batch_size):
    chunk = rows[k:k + batch_size]
    b = stack_rows(chunk + [filler] * (batch_size - len(chunk)))
    ll, greedy = fn(params, rng, times, jnp.asarray(b["tokens"]), jnp.asarray(b["fixed"]),
                    jnp.asarray(b["loss_mask"]), jnp.asarray(b["segment_ids"]),
                    loop_args(policy))
    out += [(float(v), bool(g)) for v, g in zip(np.asarray(ll)[:len(chunk)],
                                                np.asarray(greedy)[:len(chunk)])]
  return out
