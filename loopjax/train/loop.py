"""The training loop: set up a run (or resume it), step, log, evaluate, checkpoint, stop cleanly.

Running the same command on the same workdir resumes from the newest readable checkpoint, also
with another number of processes or another mesh (io/checkpoints.py).

Stop requests: once training has started, SIGTERM and SIGINT save a checkpoint at the current step
and return normally (exit code 0); in a multi-process job every process saves the same step (the
request is agreed through JAX's preemption service, see parallel/distributed.py). Before the first
step (set-up, restore, compile) there is nothing to save: a single process stops at once with
`loopjax.errors.Interrupted` (one line, exit 128 + the signal) after releasing what it holds.

Step metrics stay on device between logged rows (train/metrics.py); a non-finite step is reported
at the next row or checkpoint, whichever comes first, and stops the run before anything after it
is saved (train.on_nonfinite=error) or is logged as skipped (skip), until
train.max_consecutive_skips steps in a row were skipped. Weights are checked to be finite before
every checkpoint and evaluation: non-finite weights are never saved or evaluated.

While the EMA has averaged fewer than 1/(1 - train.ema_decay) steps, evaluation during training
reports the raw weights' figures (`eval_raw_*`) beside the EMA's (`eval_*`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from loopjax import ema as ema_lib
from loopjax import flops, folders, storage
from loopjax.data import prepared
from loopjax.data import shards as data_shards
from loopjax.data.process_rows import make_shards_eval_batches, make_shards_iterator
from loopjax.diffusion import eval_time_grid, make_schedule, metrics_from_nelbo
from loopjax.errors import Interrupted, UserError
from loopjax.model.config import RUNTIME_FIELDS
from loopjax.parallel import distributed
from loopjax.parallel import mesh as mesh_lib
from loopjax.config import Run, from_config, read_config_json
from loopjax.io.checkpoints import BEST_METRIC, Checkpointer, param_shape_diff, process_layout
from loopjax.train.lock import WorkdirLock, WorkdirLockedError
from loopjax.train import writers
from loopjax.train.metrics import MetricsWindow, MetricsWriter
from loopjax.config.runtime import Profiler, enable_compile_cache
from loopjax.train.step import TrainProgram, all_finite, build_train_step, make_eval_step
from loopjax.io.load import load_model_dir

log = logging.getLogger("loopjax")

# Sections that must match between a run's saved config and a resuming command.
_COMPAT_SECTIONS = ("model", "loops")
# ...except these, which change how the same weights are computed, not what they are
# (max_loops is not a key of the model section: loops.train sets it).
_RUNTIME_KEYS = {("model", k) for k in RUNTIME_FIELDS if k != "max_loops"}
# Keys that runs saved before the key existed lack: they were trained with this value.
_IMPLIED = {("model", "vocab_multiple"): 1}


class NonFiniteLossError(UserError):
  """The loss or gradient became non-finite (train.on_nonfinite=error), too many steps in a
  row were skipped (skip), or the weights themselves are no longer finite."""


def check_workdir(workdir: str, config) -> None:
  """Refuses to resume a workdir whose checkpoints come from another model."""
  path = storage.join(workdir, "config.json")
  ckpts = storage.join(workdir, "checkpoints")
  if not (storage.exists(path) and storage.listdir(ckpts)):
    return
  saved = read_config_json(workdir).to_dict()  # a damaged file: an error naming it
  now = json.loads(config.to_json())
  was = lambda sec, k: saved.get(sec, {}).get(k, _IMPLIED.get((sec, k)))
  diffs = [f"{sec}.{k}: saved {was(sec, k)!r}, now {v!r}"
           for sec in _COMPAT_SECTIONS for k, v in now[sec].items()
           if was(sec, k) != v and (sec, k) not in _RUNTIME_KEYS]
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


class _StopRequests:
  """SIGTERM/SIGINT for the whole of `train`.

  Until `arm()` (before the first step) a signal raises Interrupted, once: the set-up's clean-up
  runs on the way out. From then on it only records the request; `reached(step)` says whether
  to save and stop after `step`. In a multi-process job SIGTERM stays with JAX's preemption
  service (its handler is the one installed) and SIGINT is passed on to it as a SIGTERM, so
  that `reached` is true at the same step on every process."""

  def __init__(self):
    self.signal, self.armed = None, False
    self.agreed = distributed.uses_preemption_notices()
    self._old = {}

  def __enter__(self):
    sigs = (signal.SIGINT,) if self.agreed else (signal.SIGTERM, signal.SIGINT)
    for sig in sigs:
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def arm(self) -> None:
    self.armed = True

  def _handle(self, signum, _frame):
    if self.agreed:
      self.signal = signum
      os.kill(os.getpid(), signal.SIGTERM)
      return
    first = self.signal is None
    self.signal = signum
    if not self.armed and first:
      raise Interrupted(signum, "before the first training step; nothing was saved")

  def reached(self, step: int) -> bool:
    if self.agreed:
      return distributed.reached_stop_step(step)
    return self.signal is not None

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      if old is not None:
        signal.signal(sig, old)


def init_from(state, shardings, path: str):
  """`state` with params and EMA replaced by the weights of a run or export at `path`."""
  if not storage.exists(path):
    raise FileNotFoundError(f"train.init_from: {path!r} does not exist (want a run workdir or "
                            "a `loopjax export` folder)")
  source = load_model_dir(path).params
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


@dataclasses.dataclass
class _Run:
  """What the phases of one run share: its config, workdir, train program, data and checkpoints."""
  resolved: Run  # the run description: config, model, loops, data (tokenizer, manifest)
  workdir: str
  program: TrainProgram
  # The global batch rows this process loads, as data-pipeline shards [(index, count), ...].
  shards: list[tuple[int, int]]
  lock: WorkdirLock | None = None  # held by process 0
  data_iter: Any = None
  first: dict | None = None  # drawn at set-up to check the data; trained on first
  ckpt: Checkpointer | None = None

  @property
  def config(self):
    return self.resolved.config

  def open_data(self):
    t = self.config.train
    return make_shards_iterator(self.resolved.data, global_batch_size=t.batch_size, seed=t.seed,
                                shards=self.shards)

  def to_global(self, batch: dict) -> dict:
    return mesh_lib.global_batch(batch, self.program.batch_sharding, self.shards,
                                 self.config.train.batch_size)

  def next_batch(self) -> dict:
    """The next global batch on the mesh, checked on the host before it is put there."""
    batch, self.first = (self.first if self.first is not None else next(self.data_iter)), None
    check_batch(batch, self.program.model.cfg.vocab_size, self.config.data.seq_len)
    return self.to_global(batch)

  def close(self) -> None:
    for part in (self.ckpt, self.data_iter):
      if part is not None:
        part.close()
    if self.lock is not None:
      self.lock.release()


def _setup(resolved: Run, workdir: str) -> _Run:
  """Checks the writers and mesh, builds the step, writes the workdir and opens the data."""
  config = resolved.config
  writers.parse(config.train.writers)  # names and installed packages, before any work
  folders.claim(workdir, "run")  # an export, corpus, study or eval output is left untouched
  workdir = storage.resolve(workdir)
  storage.check_client(workdir)  # a missing gs:// client is named before anything is built
  t = config.train
  enable_compile_cache(t.compile_cache)
  mesh = mesh_lib.make_mesh(config.mesh)
  program = build_train_step(resolved, mesh)  # refuses a batch the mesh cannot split
  storage.makedirs(workdir)
  # Which rows of each global batch this process loads (processes that share rows load the same).
  run = _Run(resolved, workdir, program, mesh_lib.process_row_shards(mesh, t.batch_size))
  refused = None
  if jax.process_index() == 0:  # one run per workdir: refused here, before anything is written
    try:
      run.lock = WorkdirLock(workdir).acquire()
    except WorkdirLockedError as e:
      refused = str(e)
  # Every process learns process 0's outcome, so a refused job stops everywhere at once.
  refused = distributed.from_process0("loopjax_workdir_lock", refused)
  if refused is not None:
    err = WorkdirLockedError(refused)
    err.agreed = True  # every process raises it: they may leave together
    raise err
  try:
    check_workdir(workdir, config)
    if jax.process_index() == 0:  # written whole or not at all (a stop signal may come)
      resolved.write(workdir)
      if config.data.source == "prepared":  # what the run reads, kept beside what it made
        storage.copy_file(data_shards.manifest_path(config.data.path),
                          storage.join(workdir, "data_manifest.json"))
    run.data_iter = run.open_data()
    run.first = next(run.data_iter)
    check_batch(run.first, program.model.cfg.vocab_size, config.data.seq_len)
    # Hosts reach this point at different times (data set-up); Orbax's first barrier follows.
    distributed.barrier("loopjax_setup")
    # Recorded with every checkpoint: a resume with another layout re-derives the data position.
    layout = process_layout(t.batch_size, [mesh_lib.process_row_shards(mesh, t.batch_size, p)
                                           for p in range(jax.process_count())])
    run.ckpt = Checkpointer(storage.join(workdir, "checkpoints"), keep=t.keep_checkpoints,
                            keep_best=t.keep_best, async_save=t.async_checkpoints,
                            layout=layout)
  except BaseException:
    run.close()
    raise
  return run


def _restore_or_init(run: _Run):
  """(state, step): the newest complete checkpoint's, else a fresh state (or train.init_from's)."""
  p = run.program
  if not run.ckpt.steps():
    state = p.init_state()
    if run.config.train.init_from:
      state = init_from(state, p.state_shardings, run.config.train.init_from)
    return state, 0
  # A fresh iterator: `first` was drawn from the old one; restore rewinds to the saved state.
  run.data_iter.close()
  run.data_iter, run.first = run.open_data(), None
  state, start = run.ckpt.restore_latest(p.abstract_state, run.data_iter)
  log.info("resumed %s at step %d", run.workdir, start)
  return state, start


def _compile(run: _Run, state):
  """(compiled train step, evaluate(state) -> eval row), compiled before either runs.

  Besides reporting compile time, this lets every process meet at a barrier before the first
  collective: CPU collectives allow a late peer only seconds to join (see parallel/distributed.py).
  """
  config, p, t = run.config, run.program, run.config.train
  log.info("compiling the train and eval steps")
  start = time.perf_counter()
  step_fn = p.step.lower(state, p.abstract_batch()).compile()
  eval_loops = config.loops.eval or p.model.cfg.max_loops
  batches = [run.to_global(b) for b in make_shards_eval_batches(
      run.resolved.data, batch_size=t.batch_size, num_batches=t.eval_batches, seed=t.seed,
      shards=run.shards)]
  schedule = make_schedule(config.diffusion)
  eval_fn = jax.jit(make_eval_step(p.model, schedule, eval_time_grid(t.eval_time_points,
                                                                       schedule.eps)))
  if batches:
    eval_fn = eval_fn.lower(state.params, batches[0], jnp.int32(eval_loops),
                            jax.random.PRNGKey(0)).compile()
  log.info("compiled the train and eval steps in %.1f s", time.perf_counter() - start)
  distributed.barrier("loopjax_compiled")

  def figures(params) -> dict:
    outs = jax.device_get([eval_fn(params, b, jnp.int32(eval_loops), jax.random.PRNGKey(i))
                           for i, b in enumerate(batches)])
    return metrics_from_nelbo(sum(float(o["nelbo_sum"]) for o in outs),
                              sum(float(o["num_tokens"]) for o in outs))

  def evaluate(state, step: int) -> dict:
    """eval_* of the weights train.eval_params names; with EMA weights that are still mostly
    the initial weights (`loopjax.ema.is_young`), eval_raw_* beside."""
    ema = t.eval_params == "ema"
    row = {f"eval_{k}": float(v) for k, v in figures(
        state.ema_params if ema else state.params).items()}
    row |= {"eval_loops": eval_loops, "eval_params": t.eval_params}
    if ema and ema_lib.is_young(step, t.ema_decay, bool(t.get("ema_warmup", False))):
      row |= {f"eval_raw_{k}": float(v) for k, v in figures(state.params).items()}
      row["ema_decay"] = float(t.ema_decay)
    return row

  return step_fn, evaluate


def _metrics_window(run: _Run, start: int, step_fn) -> MetricsWindow:
  """The on-device window of step metrics, with the FLOPs of each S and the devices' peak.

  MFU: analytic FLOPs of the S each step really ran, over the peak of the devices in use (on
  CPU the measured matmul peak of the whole host, so fake devices count once)."""
  p, t, seq_len = run.program, run.config.train, run.config.data.seq_len
  cfg, mesh = p.model.cfg, p.mesh
  device = mesh.devices.flat[0]
  peak = flops.peak_flops_per_device(device, dtype=cfg.dtype) if jax.process_index() == 0 \
      else None
  per_s = [0.0] + [flops.train_flops_per_step(cfg, seq_len, t.batch_size, s)
                   for s in range(1, cfg.max_loops + 1)]
  return MetricsWindow(mesh, step_fn.out_info[1], cfg.max_loops, start, flops_by_loops=per_s,
                       tokens_per_step=t.batch_size * seq_len,
                       peak_flops=peak * (1 if device.platform == "cpu" else mesh.devices.size)
                       if peak else None)


def _check_finite(bad: dict | None, train_cfg, warn: bool = True) -> None:
  """Raises NonFiniteLossError (on_nonfinite=error, or skip with train.max_consecutive_skips
  steps in a row skipped) or warns about a window's bad steps."""
  if bad is None:
    return
  more = (f"; {bad['count'] - 1} more such step(s) up to step {bad['last_step']}"
          if bad["count"] > 1 else "")
  msg = (f"non-finite loss or gradient at step {bad['step']} (loss {bad['loss']}, grad norm "
         f"{bad['grad_norm']}{more}); the update was not applied")
  if train_cfg.on_nonfinite == "error":
    raise NonFiniteLossError(msg + ". Lower train.lr, or set train.on_nonfinite=skip to skip "
                             "such steps.")
  if bad["longest_run"] >= train_cfg.max_consecutive_skips:
    raise NonFiniteLossError(
        f"{bad['longest_run']} steps in a row up to step {bad['last_step']} had a non-finite "
        f"loss or gradient and were skipped (train.max_consecutive_skips="
        f"{train_cfg.max_consecutive_skips}): the run is not recovering; stopped without "
        "saving them. Lower train.lr and resume, or start a new --workdir.")
  if warn:
    log.warning(msg)


def _check_weights(finite: bool, step: int, what: str) -> None:
  """Refuses to save or evaluate weights (params or EMA) that are not finite."""
  if not finite:
    raise NonFiniteLossError(
        f"the weights at step {step} are not finite (an update overflowed), so they were not "
        f"{what}; the checkpoints before it are kept. Lower train.lr (or set train.clip_norm) "
        "and resume, or start a new --workdir.")


def _loop(run: _Run, state, step: int, step_fn, evaluate, stop: _StopRequests):
  """Trains from `step` to train.steps or a stop signal; returns (state, step, last row).

  A row is fetched after the next step is dispatched; at an eval or checkpoint step, which wait
  for the state anyway, at once. A checkpoint is written only once its window's steps are known
  to be finite (or on_nonfinite=skip), and only with finite weights."""
  t = run.config.train
  window = _metrics_window(run, step, step_fn)
  weights_finite = jax.jit(lambda s: all_finite((s.params, s.ema_params)))
  # Only process 0 measured the peak: meet again so that the first step's collectives start
  # together on every process.
  distributed.barrier("loopjax_start")
  writer = MetricsWriter(run.workdir, total_steps=t.steps, enabled=jax.process_index() == 0,
                         start_step=step, writers=t.writers, config=run.config)

  data = run.config.data
  manifest = run.resolved.data.manifest

  def write(closed, eval_state=None) -> dict:
    row, bad = window.row(closed)
    row["tokens_seen"] = closed.step * t.batch_size * data.seq_len
    if manifest is not None:
      row["epochs"] = prepared.epochs(manifest, rows=closed.step * t.batch_size,
                                      seq_len=data.seq_len, wrap=data.wrap)
    _check_finite(bad, t)
    if eval_state is not None:
      _check_weights(bool(weights_finite(eval_state)), closed.step, "evaluated")
      row |= evaluate(eval_state, closed.step)
      window.restart_clock()
    writer.write(closed.step, row)
    writer.console(closed.step, row)
    return row

  pending, last = None, {}
  profiler = Profiler(t.profile_steps, run.workdir)
  try:
    while step < t.steps:
      profiler.before_step(step)
      state, metrics = step_fn(state, run.next_batch())
      window.add(metrics)
      step += 1
      profiler.after_step(step, state)
      if pending is not None:
        last, pending = write(pending), None
      eval_now = step % t.eval_every == 0 or step == t.steps
      stop_now = stop.reached(step)  # every step: the multi-process agreement needs each one
      save_now = step % t.checkpoint_every == 0 or step == t.steps or stop_now
      evaluated = None  # this step's held-out NELBO, saved with its checkpoint to rank it
      # A stop logs the partial window too: its steps are in the checkpoint saved below.
      if step % t.log_every == 0 or step == t.steps or stop_now:
        pending = window.cut(step)
        if eval_now or save_now:  # these wait for the state anyway: no step to overlap
          last, pending = write(pending, state if eval_now else None), None
          if eval_now and t.eval_batches:
            evaluated = {BEST_METRIC: last[BEST_METRIC]}
      if save_now:
        _check_finite(window.peek(), t, warn=False)
        _check_weights(bool(weights_finite(state)), step, "saved")
        run.ckpt.save(step, state, run.data_iter, metrics=evaluated)
        window.restart_clock()  # keep checkpoint time out of the throughput
      if stop_now:
        who = (signal.Signals(stop.signal).name if stop.signal is not None
               else "stop request (preemption notice to a process of the job)")
        log.warning("%s: saved checkpoint %d, stopping", who, step)
        break
  finally:
    profiler.stop()
    writer.close()
  return state, step, last


def train(config, workdir: str) -> dict:
  """Trains (or resumes) the run in `workdir`: {"metrics": the last logged and evaluated row,
  "state": the final train state, "model": the LoopedTransformer}. `config`: a loopjax.config
  Run, or a config resolved into one here."""
  resolved = from_config(config)  # validated
  resolved.check_data()  # tokenizer and a prepared manifest read once, before any work
  with _StopRequests() as stop:
    run = _setup(resolved, workdir)
    try:
      state, start = _restore_or_init(run)
      step_fn, evaluate = _compile(run, state)
      stop.arm()  # from here a stop request saves a checkpoint
      state, step, last = _loop(run, state, start, step_fn, evaluate, stop)
    finally:
      run.close()
  stopped = step < resolved.train.steps
  last = dict(last, step=step, stopped_by_signal=stopped)
  return {"metrics": last, "state": state, "model": run.program.model}
