"""Loop counts S of the looped block: the training distribution and the inference policies.

Training draws one S per step from a `LoopDistribution`, parsed once from config `loops.train`:
  "S" or "fixed:S"     always S
  "uniform:LO:HI"      S ~ Uniform{LO..HI} (paper: uniform:1:12)
  "table:p1,p2,..."    P(S = k) = p_k for k = 1..len(table) (normalised)
Its largest S is the model's S_max.

At inference, loops are a knob: any S >= 1 works, S > S_max included. A `LoopPolicy` says how
many loops run at each denoising step and is parsed from one spec string (the `--loops` flag):

  "8" or "fixed:8"        fixed S = 8 at every step (the same grammar as training's
                          `loops.train`, where "8" is fixed:8 too).
  "adaptive:TAU[:MIN[:MAX]]"  per sequence, stop once the relative change of the looped block's
                          hidden state on masked positions, ||h_i - h_{i-1}|| / ||h_{i-1}||,
                          falls below TAU; at least MIN (default 1) and at most MAX (default
                          S_max of the model) iterations.
  "time:A:B"              S ramps linearly with the diffusion time t: S = round(A + (B - A) t),
                          so A loops near the clean end (t = 0), B near all-masked (t = 1).
  "mask:A:B"              the same with r = the fraction of the initially masked positions that
                          are still masked (1 at the first step, -> 0 at the last).
  "time:S1,S2,...,Sk"     a table: [0, 1] cut into k equal bins, bin j (in t or r) runs S_{j+1}.

`run_loops` is the executor every policy shares: a `lax.while_loop` over single iterations that
continues while any sequence is active, with finished sequences frozen by `jnp.where`. So the work
follows the loops actually executed, never a fixed maximum, and one compiled program serves every
S. It is a pure function of a per-iteration step callback: the diffusion package stays
independent of the model (the binding lives in loopjax.evaluate).

Per-sequence and executed compute. The loop body runs on the whole batch (static shapes), so a
model call costs the loops of its slowest sequence for every row: `batch_loops` = max over the
sequences. An adaptive policy's per-sequence loop counts are what each sequence needed (its
result is frozen there), not what was spent; the executed figure is the batch maximum. A "time"
schedule gives every sequence of a call the same S (t is shared by the batch), so its
per-sequence and executed compute are equal by construction, and "mask" schedules are equal
whenever the sequences' masked fractions fall in the same bin. `time_table` turns the loops an
adaptive run spent per denoising step into such a schedule.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

S_MAX_WORDS = ("0", "max")  # `--loops` values that mean S_max, the largest S of training


def split_specs(specs) -> list[str]:
  """`--loops` values: comma lists of S or policies ("1,2,4,adaptive:0.01"); a schedule table
  ("time:8,4,2") is taken whole."""
  out = []
  for spec in specs:
    if spec.startswith(("time:", "mask:")):
      out.append(spec)
    else:
      out.extend(s.strip() for s in spec.split(",") if s.strip())
  return out


@dataclasses.dataclass(frozen=True)
class LoopDistribution:
  probs: tuple[float, ...]  # probs[k-1] = P(S = k)

  @classmethod
  def parse(cls, spec: str | int) -> "LoopDistribution":
    """Parses a spec (see the module docstring); an int or a bare integer string is fixed."""
    text = str(spec).strip()
    kind, sep, rest = text.partition(":")
    if not sep:
      kind, rest = "fixed", text
    try:
      if kind == "fixed":
        s = int(rest)
        if s < 1:
          raise ValueError
        probs = [0.0] * (s - 1) + [1.0]
      elif kind == "uniform":
        lo, hi = (int(v) for v in rest.split(":"))
        if not 1 <= lo <= hi:
          raise ValueError
        probs = [0.0] * (lo - 1) + [1.0] * (hi - lo + 1)
      elif kind == "table":
        probs = [float(v) for v in rest.split(",")]
        if any(p < 0 for p in probs) or sum(probs) <= 0:
          raise ValueError
      else:
        raise ValueError
    except ValueError:
      raise ValueError(f"loops.train: cannot parse {spec!r}; expected 'S' or 'fixed:S' (S >= 1), "
                       "'uniform:LO:HI' (1 <= LO <= HI) or 'table:p1,p2,...' (non-negative, not "
                       "all zero)") from None
    total = sum(probs)
    return cls(tuple(p / total for p in probs))

  @property
  def max_loops(self) -> int:
    return len(self.probs)

  @property
  def expected(self) -> float:
    return float(sum((k + 1) * p for k, p in enumerate(self.probs)))

  def sample(self, rng: jax.Array) -> jax.Array:
    """One S for the whole global batch, as an int32 scalar (traced-friendly)."""
    logits = jnp.log(jnp.asarray(np.asarray(self.probs), jnp.float32))
    return (jax.random.categorical(rng, logits) + 1).astype(jnp.int32)


class LoopPolicy:
  """Base of the `--loops` policies: each is a frozen dataclass (hashable, usable as a static
  jit argument) registered under its spec prefix(es) with `register`.

  A policy gives the executor, per model call, the bounds (min_B, max_B, tau) of `run_loops`
  from `bounds(t_B, r_B, loop_arr)`. `loop_args()` are the numbers passed to the compiled
  program at run time and `compiled()` the static part the program is built (and memoised)
  for, so policies that differ only in those numbers share one program. `run` executes the
  loops; a policy whose S is the same for every sequence can override it to use the model's
  own loop.
  """

  prefixes: tuple[str, ...] = ()

  @classmethod
  def parse(cls, spec, s_max: int | None = None) -> "LoopPolicy":
    """Parses a spec (see the module docstring): the one parser of `--loops` values, dispatching
    on the prefix through the registry. `s_max` (the model's) fills the adaptive default maximum
    and gives `0` / `max` their S."""
    s = str(spec).strip()
    bad = lambda msg: ValueError(f"--loops {s!r}: {msg} (forms: N | fixed:N | 0 / max = S_max | "
                                 "adaptive:TAU[:MIN[:MAX]] | time:A:B | mask:A:B | time:S1,S2,..."
                                 f"; registered: {', '.join(REGISTRY)})")
    if s.lower() in S_MAX_WORDS:
      if not s_max:
        raise bad("S_max is not known here; pass an S")
      s = str(int(s_max))
    prefix, sep, rest = s.partition(":")
    if not sep:
      prefix, rest = "fixed", s
    if prefix not in REGISTRY:
      raise bad(f"unknown kind {prefix!r}")
    try:
      pol = REGISTRY[prefix].from_args(prefix, rest.split(":"), s_max, s)
    except ValueError as e:
      if str(e).startswith("--loops"):
        raise
      raise bad(str(e) if isinstance(e, PolicyArgError) else f"not a number ({e})") from None
    pol.validate()
    return pol

  @classmethod
  def from_args(cls, prefix: str, args: list[str], s_max, spec: str) -> "LoopPolicy":
    """The policy of `prefix:args` (args split at ':'); raise PolicyArgError on a bad form."""
    raise NotImplementedError

  def validate(self) -> None:
    """Raises ValueError on out-of-range numbers."""

  def resolve(self, s_max: int) -> "LoopPolicy":
    """This policy for a model with this S_max (fills defaults); idempotent."""
    return self

  @property
  def kind(self) -> str:
    return self.prefixes[0]

  def __str__(self) -> str:
    return self.spec or self.kind

  def __format__(self, fmt: str) -> str:
    return format(str(self), fmt)

  @property
  def label(self):
    """The `loops` field of result rows: the spec string (an int S for a fixed policy)."""
    return self.spec or self.kind

  def legend(self) -> str:
    """A legend entry for plots and tables."""
    return str(self)

  @property
  def largest(self) -> int:
    """The most iterations this policy can ask for (checked against loop-embedding tables)."""
    raise NotImplementedError

  @property
  def fixed_loops(self) -> int | None:
    """S when every model call runs the same S (for per-S FLOPs), else None."""
    return None

  @property
  def time_dependent(self) -> bool:
    """True if S depends on t: then logits at an unchanged x_t may differ between steps."""
    return False

  def compiled(self) -> "LoopPolicy":
    """The static part the compiled program depends on (numbers in `loop_args` excluded)."""
    return self

  def loop_args(self):
    """The run-time arguments of the compiled program: (min, max, tau) as arrays."""
    return jnp.int32(1), jnp.int32(1), jnp.float32(0.0)

  def bounds(self, t_B, r_B, loop_arr=None):
    """(min_B, max_B, tau) of `run_loops` for sequences at time t_B and masked fraction r_B;
    `loop_arr` (from `loop_args`, possibly traced) replaces this policy's own numbers."""
    raise NotImplementedError

  def run(self, step_fn, model_loop_fn, h_BxLxD, watch_BxL, t_B, r_B, loop_arr=None):
    """(h_BxLxD, loops_B) after this policy's loops. `step_fn(h, i)` is one iteration,
    `model_loop_fn(s)` the model's own loop of s iterations from h_BxLxD."""
    lo_B, hi_B, tau = self.bounds(t_B, r_B, loop_arr)
    b = h_BxLxD.shape[:1]
    return run_loops(step_fn, h_BxLxD, watch_BxL, jnp.broadcast_to(lo_B, b),
                     jnp.broadcast_to(hi_B, b), tau)


class PolicyArgError(ValueError):
  """A spec of a known prefix with the wrong form."""


REGISTRY: dict[str, type] = {}


def register(cls):
  """Class decorator: makes `cls` parseable under each of its `prefixes`."""
  for prefix in cls.prefixes:
    if prefix in REGISTRY and REGISTRY[prefix] is not cls:
      raise ValueError(f"loop policy prefix {prefix!r} is already registered to "
                       f"{REGISTRY[prefix].__name__}")
    REGISTRY[prefix] = cls
  return cls


def _full(t_B, v):
  return jnp.full(jnp.shape(t_B), v, jnp.int32)


@register
@dataclasses.dataclass(frozen=True)
class FixedLoops(LoopPolicy):
  """S iterations at every step, run as the model's own loop (no per-iteration change)."""

  prefixes = ("fixed",)
  loops: int = 1
  spec: str = ""

  @classmethod
  def from_args(cls, prefix, args, s_max, spec):
    if len(args) != 1:
      raise PolicyArgError("fixed takes one S")
    return cls(loops=int(args[0]), spec=spec)

  def validate(self):
    if self.loops < 1:
      raise ValueError(f"--loops {self.spec or self.loops}: S must be >= 1, or 0 / max for S_max")

  def __str__(self):
    return self.spec or str(self.loops)

  @property
  def label(self):
    return self.loops

  def legend(self):
    return f"S = {self.loops}"

  @property
  def largest(self):
    return self.loops

  @property
  def fixed_loops(self):
    return self.loops

  def compiled(self):
    return FixedLoops(loops=1, spec="runtime")

  def loop_args(self):
    return jnp.int32(self.loops), jnp.int32(self.loops), jnp.float32(0.0)

  def bounds(self, t_B, r_B, loop_arr=None):
    s = self.loops if loop_arr is None else loop_arr[1]
    s_B = _full(t_B, s)
    return s_B, s_B, 0.0

  def run(self, step_fn, model_loop_fn, h_BxLxD, watch_BxL, t_B, r_B, loop_arr=None):
    s = jnp.asarray(self.loops if loop_arr is None else loop_arr[1], jnp.int32)
    return model_loop_fn(s), jnp.full(h_BxLxD.shape[:1], s, jnp.int32)


@register
@dataclasses.dataclass(frozen=True)
class AdaptiveLoops(LoopPolicy):
  """Per sequence, stop once the relative change falls below tau, within [min, max] loops."""

  prefixes = ("adaptive",)
  tau: float = 0.0
  min_loops: int = 1
  max_loops: int = 0  # 0 = S_max of the model (`resolve`)
  spec: str = ""

  @classmethod
  def from_args(cls, prefix, args, s_max, spec):
    if not 1 <= len(args) <= 3 or not args[0]:
      raise PolicyArgError("adaptive takes TAU, optionally MIN and MAX")
    lo = int(args[1]) if len(args) > 1 else 1
    hi = int(args[2]) if len(args) > 2 else int(s_max or 0)
    return cls(tau=float(args[0]), min_loops=lo, max_loops=hi, spec=spec)

  def validate(self):
    if not self.tau >= 0:
      raise ValueError(f"--loops adaptive: TAU must be >= 0, got {self.tau}")
    if self.min_loops < 1 or (self.max_loops and self.max_loops < self.min_loops):
      raise ValueError(f"--loops adaptive: need 1 <= MIN <= MAX, got MIN {self.min_loops}, "
                       f"MAX {self.max_loops}")

  def resolve(self, s_max):
    return self if self.max_loops else dataclasses.replace(self, max_loops=int(s_max))

  def legend(self):
    parts = self.spec.split(":")
    tau = parts[1] if len(parts) > 1 else f"{self.tau:g}"
    extra = f", S ≤ {parts[3]}" if len(parts) > 3 else ""
    return f"adaptive, τ = {tau}{extra}"

  @property
  def largest(self):
    return self.max_loops

  def compiled(self):
    return AdaptiveLoops(max_loops=1, spec="runtime")

  def loop_args(self):
    return jnp.int32(self.min_loops), jnp.int32(self.max_loops), jnp.float32(self.tau)

  def bounds(self, t_B, r_B, loop_arr=None):
    if loop_arr is None:
      if self.max_loops < 1:
        raise ValueError("adaptive loop policy without a maximum: call resolve(S_max)")
      loop_arr = (self.min_loops, self.max_loops, float(self.tau))
    lo, hi, tau = loop_arr
    return _full(t_B, lo), _full(t_B, hi), tau


@register
@dataclasses.dataclass(frozen=True)
class ScheduledLoops(LoopPolicy):
  """S from the diffusion time t ("time") or the masked fraction r ("mask"): a linear ramp
  between table[0] and table[1], or a table over equal bins of [0, 1]."""

  prefixes = ("time", "mask")
  by: str = "time"
  table: tuple[int, ...] = ()
  ramp: bool = False
  spec: str = ""

  @classmethod
  def from_args(cls, prefix, args, s_max, spec):
    if len(args) == 2:
      return cls(by=prefix, table=(int(args[0]), int(args[1])), ramp=True, spec=spec)
    if len(args) == 1:
      return cls(by=prefix, table=tuple(int(v) for v in args[0].split(",")), spec=spec)
    raise PolicyArgError("a schedule is time:A:B or time:S1,S2,...")

  def validate(self):
    if not self.table or min(self.table) < 1:
      raise ValueError(f"--loops {self.by}: every S must be >= 1, got {self.table}")

  @property
  def kind(self):
    return self.by

  def legend(self):
    if self.ramp:
      return f"{self.by}-scheduled S {self.table[0]}→{self.table[1]}"
    return str(self)

  @property
  def largest(self):
    return max(self.table)

  @property
  def time_dependent(self):
    return self.by == "time"

  def bounds(self, t_B, r_B, loop_arr=None):
    key_B = jnp.clip(jnp.asarray(t_B if self.by == "time" else r_B, jnp.float32), 0.0, 1.0)
    table = jnp.asarray(self.table, jnp.float32)
    if self.ramp:
      s_B = jnp.round(table[0] + (table[1] - table[0]) * key_B)
    else:
      k = len(self.table)
      s_B = table[jnp.minimum((key_B * k).astype(jnp.int32), k - 1)]
    s_B = jnp.maximum(s_B, 1.0).astype(jnp.int32)
    return s_B, s_B, 0.0


def batch_loops(loops_TxB):
  """Loops each model call executed for the whole batch: the max over its sequences (a
  `while_loop` over the batch stops with its slowest sequence). [T, B] -> [T]; 0 for calls a
  sampler skipped (cached)."""
  return jnp.max(jnp.asarray(loops_TxB), axis=-1, initial=0)


def time_table(loops_TxB, bins: int, *, how: str = "mean") -> str:
  """A "time:S1,...,Sk" spec from the loops a sampler run spent at each of its T steps.

  Step j of a T-step sampler runs at t = (T - j) / T, which falls in bin min(floor(t k), k - 1)
  of the schedule (the binning `LoopPolicy.bounds` uses). Each bin gets the per-sequence loops of
  its steps, aggregated by `how` ("mean": mean over steps and sequences; "max": the largest),
  rounded and at least 1; a bin no step falls in takes its nearer filled neighbour's value.
  Cached steps (0 loops everywhere) are ignored. Host-side NumPy: the result is a spec string.
  """
  loops = np.asarray(loops_TxB, np.float64)
  steps, k = loops.shape[0], int(bins)
  if k < 1 or steps < 1:
    raise ValueError(f"time_table: need bins >= 1 and at least one step, got {k}, {steps}")
  if how not in ("mean", "max"):
    raise ValueError(f"time_table: how must be 'mean' or 'max', got {how!r}")
  t_T = (steps - np.arange(steps)) / steps
  bin_T = np.minimum((t_T * k).astype(np.int64), k - 1)
  called_T = loops.max(-1) > 0
  table = [None] * k
  for j in range(k):
    sel = loops[(bin_T == j) & called_T]
    if sel.size:
      v = sel.mean() if how == "mean" else sel.max()
      table[j] = max(int(np.floor(v + 0.5)), 1)
  filled = [j for j in range(k) if table[j] is not None]
  if not filled:
    raise ValueError("time_table: no step executed any loop")
  table = [table[j] if table[j] is not None else table[min(filled, key=lambda f: abs(f - j))]
           for j in range(k)]
  return "time:" + ",".join(str(v) for v in table)


def relative_change(new_BxLxD, old_BxLxD, where_BxL):
  """||new - old|| / ||old|| per sequence over the positions `where` (0 when there are none)."""
  w = where_BxL.astype(jnp.float32)[..., None]
  num_B = jnp.sum(w * jnp.square(new_BxLxD - old_BxLxD), axis=(1, 2))
  den_B = jnp.sum(w * jnp.square(old_BxLxD), axis=(1, 2))
  return jnp.where(den_B > 0, jnp.sqrt(num_B / jnp.maximum(den_B, 1e-30)), 0.0)


def run_loops(step_fn, h_BxLxD, watch_BxL, min_B, max_B, tau):
  """Applies `step_fn(h, i) -> h` iteration by iteration, per sequence between min_B and max_B.

  A sequence stays active while i < max_B and (i < min_B or the relative change of its hidden
  state on the `watch` positions (the masked ones) is still >= tau). tau = 0 therefore runs
  exactly max_B iterations; a huge tau runs exactly min_B. Inactive sequences keep their state
  (`jnp.where`) but are still computed: the loop ends when none is active, so every row costs
  max(loops_B) iterations (`batch_loops`), whatever its own count.

  Returns (h_BxLxD, loops_B): the final state and the iterations each sequence's result took
  (int32); the iterations executed for the batch are loops_B.max().
  """
  min_B = jnp.asarray(min_B, jnp.int32)
  max_B = jnp.asarray(max_B, jnp.int32)
  tau = jnp.asarray(tau, jnp.float32)

  def cond(carry):
    return jnp.any(carry[2])

  def body(carry):
    i, h, active_B, loops_B = carry
    new = step_fn(h, i)
    change_B = relative_change(new, h, watch_BxL)
    h = jnp.where(active_B[:, None, None], new, h)
    loops_B = loops_B + active_B.astype(jnp.int32)
    i = i + 1
    active_B = active_B & (i < max_B) & ((i < min_B) | (change_B >= tau))
    return i, h, active_B, loops_B

  init = (jnp.int32(0), h_BxLxD, max_B >= 1, jnp.zeros_like(max_B))
  _, h, _, loops_B = jax.lax.while_loop(cond, body, init)
  return h, loops_B
