"""The Python API: a trained model from a run's workdir or an export folder, as one object.

    import loopjax
    m = loopjax.load("runs/sudoku")            # or an export folder; step=..., params="raw"
    m.logits(tokens_BxL, loops=8)              # any S >= 1 (S > S_max too), traced or not
    m.nelbo(tokens_BxL, loops=8)               # nats and bits per token (per_sequence=True: rows)
    print(m.sample(2, loops=4, steps=16, prompt="..."))  # decoded texts; .tokens, .stats
    m.tokenizer, m.config, m.model_config
    m.loaded                                   # loopjax.io.load.Loaded (data, policy(spec))

Every loop count runs through the inference driver (`loopjax.inference.denoiser`): the looped
block is applied by a loop whose length is a run-time number, so a Python int and a traced S
follow the same rule and run exactly S iterations. A Python int or a `loops=` spec becomes the
model's LoopPolicy in one place, `Loaded.policy` (loopjax.io.load), once per call; the tokenizer
is the load's, read once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from loopjax.diffusion import eval_time_grid, make_schedule, metrics_from_nelbo, nelbo_on_grid
from loopjax.inference.denoiser import make_denoiser, memo
from loopjax.inference.generate import Generation, default_steps, generate, prompt_rows
from loopjax.io.load import Loaded, load_model_dir
from loopjax.loops import FixedLoops


def load(path: str, *, step: int | str | None = None, params: str | None = None) -> "Model":
  """The model of a training run (its newest readable checkpoint, or `step`: an int or "best")
  or of an export folder. params: "ema" (a run's default) or "raw"; an export holds one kind."""
  return Model(load_model_dir(path, params=params, step=step))


@dataclasses.dataclass(eq=False)
class Model:
  """A loaded model over its `Loaded` (loopjax.io.load): `config` (the run's config, or the
  export's), `module` (the Flax LoopedTransformer; `model_config` = its ModelConfig), `params`
  (its weights), `tokenizer` (the load's, read once)."""

  loaded: Loaded
  config = property(lambda self: self.loaded.config)
  module = property(lambda self: self.loaded.model)
  params = property(lambda self: self.loaded.params)
  tokenizer = property(lambda self: self.loaded.tokenizer)
  model_config = property(lambda self: self.module.cfg)

  def _loops(self, loops):
    """(min, max, tau) loop arguments of a fixed S: a Python int is checked here, a traced one
    is used as given. None = S_max of training."""
    if loops is None:
      loops = self.model_config.max_loops
    if isinstance(loops, (int, np.integer)):
      if loops < 1:  # an int is S itself here, not the `--loops` word 0 = S_max
        raise ValueError(f"loops={loops}: S must be >= 1 (None for S_max of training)")
      self.loaded.policy(int(loops))  # the loop-embedding limit, as every `loops=` value
    s = jnp.asarray(loops, jnp.int32)
    return s, s, jnp.float32(0.0)

  def logits(self, tokens_BxL, *, loops=None, t=None, segment_ids=None):
    """float32 B x L x V logits over the real vocabulary ([MASK] = V is never predicted).

    loops: S (int or traced array; None: S_max of training). t: the diffusion time, a scalar or
    B values (default: each row's masked fraction, the time a log-linear schedule would give).
    """
    x = jnp.asarray(tokens_BxL, jnp.int32)
    fn = memo(("api_logits", id(self.module)), self.module, lambda: jax.jit(self._logits_fn))
    t_B = None if t is None else jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
    seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    return fn(self.params, x, t_B, seg, self._loops(loops))

  def _logits_fn(self, params, x_BxL, t_B, segment_ids_BxL, loop_arr):
    cfg = self.model_config
    masked_B = (x_BxL == cfg.mask_id).mean(-1)
    policy = FixedLoops().compiled()  # S comes in `loop_arr`: one program for every S
    denoise = make_denoiser(self.module, params, policy, segment_ids_BxL, loop_arr)
    logits, _ = denoise(x_BxL, masked_B if t_B is None else t_B, masked_B)
    return logits[..., :cfg.vocab_size].astype(jnp.float32)

  def nelbo(self, tokens_BxL, *, loops=None, time_points=8, seed: int = 0,
            per_sequence: bool = False) -> dict:
    """The NELBO of clean `tokens_BxL` at S loops (see `logits`), estimated on `time_points`
    midpoints of [eps, 1] with one masking draw each (a fixed seed: comparable across S).

    Returns nats_per_token, bits_per_token and ppl_bound over all tokens, or with
    `per_sequence` arrays of B values (each row's own tokens). `time_points` may be a tuple of
    times, e.g. (1.0,): every token masked.
    """
    x = jnp.asarray(tokens_BxL, jnp.int32)
    schedule = make_schedule(self.config.diffusion)
    grid = (jnp.asarray(time_points, jnp.float32) if isinstance(time_points, tuple)
            else eval_time_grid(int(time_points), schedule.eps))
    fn = memo(("api_nelbo", id(self.module), schedule), self.module,
              lambda: jax.jit(lambda *a: self._nelbo_fn(schedule, *a)))
    sums_B, counts_B = fn(self.params, jax.random.PRNGKey(seed), x, grid, self._loops(loops))
    if per_sequence:
      return {k: np.asarray(v) for k, v in metrics_from_nelbo(sums_B, counts_B).items()}
    return {k: float(v) for k, v in metrics_from_nelbo(sums_B.sum(), counts_B.sum()).items()}

  def _nelbo_fn(self, schedule, params, rng, x_BxL, grid, loop_arr):
    """(NELBO sum, tokens) per row: each row is its own batch of one, with its own masks."""
    mask_id = self.model_config.mask_id

    def one_row(row_L, key):
      logits_fn = lambda x_t, t_B: self._logits_fn(params, x_t, t_B, None, loop_arr)
      out = nelbo_on_grid(logits_fn, key, row_L[None], schedule, mask_id, grid)
      return out["nelbo_sum"], out["num_tokens"]

    keys = jax.random.split(rng, x_BxL.shape[0])
    return jax.vmap(one_row)(x_BxL, keys)

  def sample(self, n: int = 1, *, loops=None, steps: int = 0, prompt: str | None = None,
             template: str | None = None, mask_char: str = "?", length: int = 0,
             sampler: str = "ancestral", temperature=None, top_k: int = 0, top_p: float = 1.0,
             block_len: int = 0, seed: int = 0) -> Generation:
    """`n` samples: a Generation whose str() is the decoded texts (`.texts`, `.tokens` n x L,
    `.stats`: loops executed, model calls, FLOPs, seconds).

    loops: S or a policy spec ("adaptive:0.01", "time:2:8"; None: S_max). steps: denoising
    steps (0: one per position to fill). prompt: a fixed prefix; template: infilling, each
    `mask_char` one position to fill. length: row length (0: the run's data.seq_len).
    """
    cfg = self.model_config
    if n < 1:
      raise ValueError(f"sample: n={n}; ask for at least one sample")
    length = length or int(self.config.data.seq_len)
    x = prompt_rows(self.tokenizer, cfg.mask_id, n, length, prompt=prompt, template=template,
                    mask_char=mask_char)
    policy = self.loaded.policy(cfg.max_loops if loops is None else loops)
    return generate(self.module, self.params, self.config, self.tokenizer, x, loops=policy,
                    steps=steps or default_steps(x, cfg.mask_id), sampler=sampler,
                    block_len=block_len, temperature=temperature, top_k=top_k, top_p=top_p,
                    seed=seed)
