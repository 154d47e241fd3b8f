"""Adaptive loops: per-sequence vs executed loops and FLOPs, time schedules, calibrated tables."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopjax.loops import LoopPolicy, batch_loops, run_loops, time_table
from loopjax.diffusion.samplers import sample
from loopjax.inference.denoiser import generation_stats
from loopjax.flops import forward_flops_per_seq
from loopjax.model import ModelConfig

# Relative change of sequence b at iteration i is G[b] * 0.5**i: with tau 0.1 the sequences
# stop after 1, 3 and 5 iterations (0.05 < 0.1; 0.3, 0.15, 0.075; 1, ..., 0.0625).
G = np.array([0.05, 0.3, 1.0], np.float32)
WANT_LOOPS = [1, 3, 5]
TAU = 0.1
LO, HI = jnp.full((3,), 1, jnp.int32), jnp.full((3,), 8, jnp.int32)  # MIN, MAX per row


def _toy_step(counter=None):
  g_B = jnp.asarray(G)

  def step(h, i):
    if counter is not None:  # counts the loop bodies the program really executes
      jax.debug.callback(lambda: counter.append(1))
    return h * (1.0 + g_B[:, None, None] * 0.5 ** i.astype(jnp.float32))

  return step


def test_run_loops_stops_each_sequence_at_its_own_loop_and_runs_the_slowest():
  h0 = jnp.ones((3, 4, 2), jnp.float32)
  watch = jnp.ones((3, 4), bool)
  calls = []
  h, loops_B = jax.jit(lambda h: run_loops(_toy_step(calls), h, watch, LO, HI, TAU))(h0)
  assert np.asarray(loops_B).tolist() == WANT_LOOPS
  assert len(calls) == max(WANT_LOOPS)  # the batch ran its slowest sequence's loops
  want = [np.prod([1 + g * 0.5 ** i for i in range(n)]) for g, n in zip(G, WANT_LOOPS)]
  np.testing.assert_allclose(np.asarray(h)[:, 0, 0], want, rtol=1e-6)  # frozen at its own loop


def test_executed_loops_and_flops_of_a_sampler_run_match_a_hand_count():
  cfg = ModelConfig(kernels="reference",
                    vocab_size=9, max_length=6, width=16, num_layers=3, num_heads=2,
                    cond_dim=8, loop_start=1, loop_end=2, max_loops=8)
  b, length, steps = 3, 6, 4
  calls = []

  def denoise(x_BxL, t_B, r_B):
    h0 = jnp.ones((b, length, 2), jnp.float32)
    _, loops_B = run_loops(_toy_step(calls), h0, x_BxL == cfg.mask_id, LO, HI, TAU)
    logits = jnp.zeros((b, length, cfg.vocab_size + 1)).at[..., 0].set(1.0)
    return logits, loops_B

  x = jnp.full((b, length), cfg.mask_id, jnp.int32)
  out = jax.jit(lambda x: sample(denoise, jax.random.PRNGKey(0), x, cfg.mask_id, steps,
                                 method="confidence", cache=False))(x)
  stats = generation_stats(cfg, length, jax.device_get(out))
  # Per model call the batch runs max(1, 3, 5) = 5 loops; the sequences need 1, 3, 5.
  assert len(calls) == steps * 5
  assert stats["nfe"] == steps and stats["executed_loops"] == steps * 5
  assert stats["executed_loops_mean"] == 5.0 and stats["loops_mean"] == 3.0
  f = lambda s: forward_flops_per_seq(cfg, length, s)  # linear in S
  assert stats["executed_flops_per_sample"] == pytest.approx(steps * f(5), rel=1e-12)
  assert stats["flops_per_sample"] == pytest.approx(steps * (f(1) + f(3) + f(5)) / 3,
                                                    rel=1e-12)
  assert stats["executed_flops_per_sample"] > stats["flops_per_sample"]


def test_generation_stats_skips_cached_calls_and_takes_the_max_per_call():
  cfg = ModelConfig(kernels="reference",
                    vocab_size=9, max_length=5, width=16, num_layers=3, num_heads=2,
                    cond_dim=8, loop_start=1, loop_end=2, max_loops=6)
  loops_TxB = np.array([[1, 3, 5], [2, 2, 2], [0, 0, 0]])  # the last call was cached
  stats = generation_stats(cfg, 5, {"loops_TxB": loops_TxB, "nfe": 2})
  assert np.asarray(batch_loops(loops_TxB)).tolist() == [5, 2, 0]
  assert stats["executed_loops"] == 7 and stats["executed_loops_mean"] == 3.5
  f = lambda s: forward_flops_per_seq(cfg, 5, s)
  assert stats["executed_flops_per_sample"] == pytest.approx(f(5) + f(2), rel=1e-12)
  per_seq = [(1 + 2) / 2, (3 + 2) / 2, (5 + 2) / 2]
  assert stats["flops_per_sample"] == pytest.approx(np.mean([2 * f(s) for s in per_seq]))


def test_a_time_schedule_executes_what_it_reports():
  pol = LoopPolicy.parse("time:1,2,4")
  t_B = jnp.full((3,), 0.5)  # one t for the whole batch: bin 1 of 3
  lo_B, hi_B, tau = pol.bounds(t_B, jnp.array([0.1, 0.5, 0.9]))
  calls = []
  _, loops_B = run_loops(_toy_step(calls), jnp.ones((3, 4, 2)), jnp.ones((3, 4), bool),
                         lo_B, hi_B, tau)
  assert np.asarray(loops_B).tolist() == [2, 2, 2] and len(calls) == 2


def test_time_table_bins_the_steps_like_the_policy():
  # 4 steps at t = 1, 0.75, 0.5, 0.25; with 2 bins the first three fall in bin 1, the last in 0.
  loops_TxB = np.array([[4, 6], [3, 3], [2, 4], [1, 2]])
  assert time_table(loops_TxB, 2) == "time:2,4"  # bin 0: mean(1, 2) = 1.5 -> 2; bin 1: 22/6
  assert time_table(loops_TxB, 2, how="max") == "time:2,6"
  # An empty bin takes its neighbour's value; cached steps (all 0) are ignored.
  assert time_table(np.array([[0, 0], [5, 5]]), 4) == "time:5,5,5,5"
  pol = LoopPolicy.parse(time_table(loops_TxB, 2))
  steps = loops_TxB.shape[0]
  t_T = (steps - np.arange(steps)) / steps  # the samplers' t at each step
  assert np.asarray(pol.bounds(jnp.asarray(t_T), jnp.ones(steps))[1]).tolist() == [4, 4, 4, 2]
  with pytest.raises(ValueError, match="no step"):
    time_table(np.zeros((3, 2)), 2)
