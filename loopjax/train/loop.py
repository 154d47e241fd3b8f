"""The training loop: set up a run (or resume it), step, log, evaluate, checkpoint, stop cleanly.

Running the same command on the same workdir resumes from the newest complete checkpoint. SIGTERM
and SIGINT save a checkpoint at the current step and return normally (exit code 0).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np

from loopjax import flops
from loopjax.data import make_eval_batches, make_train_iterator
from loopjax.diffusion import eval_time_grid, make_schedule, metrics_from_nelbo
from loopjax.model import LoopDistribution, LoopedTransformer
from loopjax.parallel import distributed
from loopjax.parallel import mesh as mesh_lib
from loopjax.train import config as config_lib
from loopjax.train.checkpoint import Checkpointer
from loopjax.train.metrics import MetricsWriter
from loopjax.train.state import (create_abstract_state, create_state, learning_rate,
                                 make_optimizer, param_shape_diff)
from loopjax.train.step import make_eval_step, make_train_step

log = logging.getLogger("loopjax")

# Sections that must match between a run's saved config and a resuming command.
_COMPAT_SECTIONS = ("model", "loops")
# ...except these, which change how the same weights are computed, not what they are.
_RUNTIME_KEYS = {("model", k) for k in ("attention_impl", "remat", "loop_remat", "dtype",
                                        "scan_unroll", "unroll_layers")}


class NonFiniteLossError(RuntimeError):
  pass


def check_workdir(workdir: str, config) -> None:
  """Refuses to resume a workdir whose checkpoints come from another model."""
  path = os.path.join(workdir, "config.json")
  ckpts = os.path.join(workdir, "checkpoints")
  if not (os.path.exists(path) and os.path.isdir(ckpts) and os.listdir(ckpts)):
    return
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  now = json.loads(config.to_json())
  diffs = [f"{sec}.{k}: saved {saved.get(sec, {}).get(k)!r}, now {v!r}"
           for sec in _COMPAT_SECTIONS for k, v in now[sec].items()
           if saved.get(sec, {}).get(k) != v and (sec, k) not in _RUNTIME_KEYS]
  if diffs:
    raise ValueError(f"{workdir} holds checkpoints of an incompatible run ("
                     + "; ".join(diffs) + "). Use a new --workdir or the original config.")


def check_batch(batch: dict, vocab_size: int, seq_len: int) -> None:
  tokens = batch["tokens"]
  if tokens.shape[1] != seq_len:
    raise ValueError(f"data gives rows of length {tokens.shape[1]}, config data.seq_len is "
                     f"{seq_len}")
  hi = int(tokens.max()) if tokens.size else 0
  if hi >= vocab_size or int(tokens.min()) < 0:
    raise ValueError(f"token id {hi} is out of range for model.vocab_size {vocab_size} "
                     "(ids must be in [0, vocab_size); the mask id is vocab_size)")


class _StopFlag:
  """SIGTERM/SIGINT set a flag; the loop checkpoints and returns at the next step boundary."""

  def __init__(self):
    self.signal = None
    self._old = {}

  def __enter__(self):
    if hasattr(signal, "SIGTERM"):
      for sig in (signal.SIGTERM, signal.SIGINT):
        try:
          self._old[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread
          pass
    return self

  def _handle(self, signum, _frame):
    self.signal = signum

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _global(batch: dict, sharding) -> dict:
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def init_from(state, shardings, path: str):
  """`state` with params and EMA replaced by the weights of a run or export at `path`."""
  from loopjax.export import load_model_dir
  if not os.path.exists(path):
    raise FileNotFoundError(f"train.init_from: {path!r} does not exist (want a run workdir or "
                            "a `loopjax export` folder)")
  _, _, source = load_model_dir(path)
  diff = param_shape_diff(source, state.params)
  if diff:
    raise ValueError(f"train.init_from: the weights in {path} do not fit this model (e.g. "
                     f"{diff}); use the source run's model config, vocabulary and loops.train")
  # Every process holds the whole tree; each device takes its shard of it. Two copies: the
  # step donates the state, and one buffer cannot be donated twice.
  put = lambda: jax.tree_util.tree_map(
      lambda v, sh: jax.make_array_from_callback(v.shape, sh, lambda idx: np.asarray(v)[idx]),
      source, shardings.params)
  log.info("initialised params and EMA from %s", path)
  return state.replace(params=put(), ema_params=put())


def _compile(step_fn, eval_fn, state, batch, eval_batches, eval_loops):
  """Compiles the train and eval programs before any of them runs.

  Besides reporting compile time, this lets every process meet at a barrier before the first
  collective: CPU collectives allow a late peer only seconds to join (see parallel/distributed.py).
  """
  start = time.perf_counter()
  step_fn = step_fn.lower(state, batch).compile()
  if eval_batches:
    eval_fn = eval_fn.lower(state.params, eval_batches[0], jnp.int32(eval_loops),
                            jax.random.PRNGKey(0)).compile()
  log.info("compiled the train and eval steps in %.1f s", time.perf_counter() - start)
  distributed.barrier("loopjax_compiled")
  return step_fn, eval_fn


def train(config, workdir: str) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the last logged and evaluated metrics."""
  config_lib.validate(config)
  cfg = config_lib.model_config(config)
  t = config.train
  is_main = jax.process_index() == 0
  mesh = mesh_lib.make_mesh(config.mesh)
  dp = mesh_lib.data_parallel_size(mesh)
  if t.batch_size % (dp * t.grad_accum):
    raise ValueError(f"train.batch_size {t.batch_size} must be divisible by the data-parallel "
                     f"size {dp} (mesh data x fsdp) times train.grad_accum {t.grad_accum}")
  # Which rows of each global batch this process loads (processes that share rows load the same).
  shard, num_shards = mesh_lib.process_batch_slice(mesh, t.batch_size)
  os.makedirs(workdir, exist_ok=True)
  check_workdir(workdir, config)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json(indent=2))

  data_iter = make_train_iterator(config.data, global_batch_size=t.batch_size, seed=t.seed,
                                  process_index=shard, process_count=num_shards)
  first = next(data_iter)
  check_batch(first, cfg.vocab_size, config.data.seq_len)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  # The global batch, abstract, for compiling the step before it first runs.
  batch_spec = {k: jax.ShapeDtypeStruct((t.batch_size, *np.shape(v)[1:]), np.asarray(v).dtype,
                                        sharding=batch_sharding) for k, v in first.items()}

  model = LoopedTransformer(cfg)
  tx = make_optimizer(t)
  schedule = make_schedule(config.diffusion)
  loop_dist = LoopDistribution.parse(config.loops.train)
  example = jnp.zeros((1, config.data.seq_len), jnp.int32)
  # Hosts reach this point at different times (data set-up); Orbax's first barrier follows.
  distributed.barrier("loopjax_setup")
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints,
                      async_save=t.async_checkpoints)
  start = 0
  if ckpt.steps():
    abstract, shardings = create_abstract_state(model, tx, example, t.seed, mesh)
    # A fresh iterator: `first` was drawn from the old one; restore rewinds to the saved state.
    data_iter.close()
    data_iter = make_train_iterator(config.data, global_batch_size=t.batch_size, seed=t.seed,
                                    process_index=shard, process_count=num_shards)
    state, start = ckpt.restore_latest(abstract, data_iter)
    first = None
    log.info("resumed %s at step %d", workdir, start)
  else:
    state, shardings = create_state(model, tx, example, t.seed, mesh)
    if t.init_from:
      state = init_from(state, shardings, t.init_from)

  lr_fn = learning_rate(t)
  step_fn = jax.jit(
      make_train_step(model, tx, schedule, loop_dist, antithetic=config.diffusion.antithetic,
                      ema_decay=t.ema_decay, grad_accum=t.grad_accum, lr_fn=lr_fn),
      in_shardings=(shardings, batch_sharding),
      out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0)
  eval_loops = config.loops.eval or cfg.max_loops
  eval_batches = [_global(b, batch_sharding) for b in make_eval_batches(
      config.data, batch_size=t.batch_size, num_batches=t.eval_batches, seed=t.seed,
      process_index=shard, process_count=num_shards)]
  eval_fn = jax.jit(make_eval_step(model, schedule, eval_time_grid(t.eval_time_points,
                                                                     schedule.eps)))
  step_fn, eval_fn = _compile(step_fn, eval_fn, state, batch_spec, eval_batches, eval_loops)

  def evaluate(state):
    params = state.ema_params if t.eval_params == "ema" else state.params
    total, count = 0.0, 0.0
    for i, b in enumerate(eval_batches):
      out = eval_fn(params, b, jnp.int32(eval_loops), jax.random.PRNGKey(i))
      total, count = total + float(out["nelbo_sum"]), count + float(out["num_tokens"])
    m = metrics_from_nelbo(total, count)
    return {f"eval_{k}": float(v) for k, v in m.items()} | {"eval_loops": eval_loops}

  writer = MetricsWriter(workdir, total_steps=t.steps, enabled=is_main)
  tokens_per_step = t.batch_size * config.data.seq_len
  # MFU: analytic FLOPs of the S each step really ran, over the peak of the devices in use (on
  # CPU the measured matmul peak of the whole host, so fake devices count once).
  step_flops = lambda s: flops.train_flops_per_step(cfg, config.data.seq_len, t.batch_size, s)
  on_cpu = jax.devices()[0].platform == "cpu"
  peak = flops.peak_flops_per_device(dtype=cfg.dtype) if is_main else None
  peak_total = peak * (1 if on_cpu else jax.device_count()) if peak else None
  # Only process 0 measured the peak: meet again so that the first step's collectives start
  # together on every process.
  distributed.barrier("loopjax_start")
  window_flops = 0.0
  last = {}
  step = start
  saved_step = start if start else -1
  window_start, window_steps = time.perf_counter(), 0
  with _StopFlag() as stop:
    try:
      while step < t.steps:
        batch = first if first is not None else next(data_iter)
        first = None
        check_batch(batch, cfg.vocab_size, config.data.seq_len)
        state, metrics = step_fn(state, _global(batch, batch_sharding))
        step += 1
        window_steps += 1
        finite, loops = jax.device_get((metrics["finite"], metrics["loops"]))
        window_flops += step_flops(int(loops))
        if not bool(finite):
          msg = (f"non-finite loss or gradient at step {step} (loss {float(metrics['loss'])}, "
                 f"grad norm {float(metrics['grad_norm'])}); the update was not applied")
          if t.on_nonfinite == "error":
            raise NonFiniteLossError(msg + ". Lower train.lr, or set "
                                     "train.on_nonfinite=skip to skip such steps.")
          log.warning(msg)
        if step % t.log_every == 0 or step == t.steps:
          elapsed = time.perf_counter() - window_start
          row = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
          row["loops"] = int(row["loops"])
          row["tokens_per_sec"] = tokens_per_step * window_steps / max(elapsed, 1e-9)
          row["step_time"] = elapsed / max(window_steps, 1)
          row["tflops_per_sec"] = window_flops / max(elapsed, 1e-9) / 1e12
          if peak_total:
            row["mfu"] = window_flops / max(elapsed, 1e-9) / peak_total
          if step % t.eval_every == 0 or step == t.steps:
            row |= evaluate(state)
          writer.write(step, row)
          writer.console(step, row)
          last = row
          window_start, window_steps, window_flops = time.perf_counter(), 0, 0.0
        if step % t.checkpoint_every == 0 or step == t.steps or stop.signal is not None:
          ckpt.save(step, state, data_iter)
          saved_step = step
          # Keep checkpoint time out of the throughput.
          window_start, window_steps, window_flops = time.perf_counter(), 0, 0.0
        if stop.signal is not None:
          log.warning("signal %d: saved checkpoint %d, stopping", stop.signal, step)
          break
      if saved_step != step:
        ckpt.save(step, state, data_iter)
    finally:
      ckpt.close()
      writer.close()
      data_iter.close()
  last = dict(last, step=step, stopped_by_signal=stop.signal is not None)
  return {"metrics": last, "state": state, "model": model}
