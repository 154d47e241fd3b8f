"""The inference loop policies (`--loops`): one registered class per spec prefix (grammar:
loopjax.loops). A new policy is a subclass of `LoopPolicy` decorated with `register`."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from loopjax.loops.executor import run_loops

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
    return cls._from_text(str(spec).strip(), s_max)

  @classmethod
  def from_label(cls, label) -> "LoopPolicy":
    """The policy a result row's `loops` label names (for legends): the same grammar, read
    after a run rather than parsed for one."""
    return cls._from_text(str(label).strip(), None)

  @classmethod
  def _from_text(cls, s: str, s_max) -> "LoopPolicy":
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


def resolve_policy(cfg, loops) -> LoopPolicy:
  """A LoopPolicy for the model of ModelConfig `cfg` from an int, a spec string or a policy:
  parsed (`LoopPolicy.parse`, with cfg's S_max), defaults filled (`resolve`), and checked
  against a learned loop-embedding table (no row beyond S_max). Idempotent: a resolved policy
  comes back equal. A loaded model's `Loaded.policy` is the library's entry to it."""
  policy = loops if isinstance(loops, LoopPolicy) else LoopPolicy.parse(str(loops), cfg.max_loops)
  policy = policy.resolve(cfg.max_loops)
  if cfg.looped and cfg.loop_embedding and policy.largest > cfg.max_loops:
    raise ValueError(f"loops {policy.spec or policy.largest}: this model has a learned loop "
                     f"embedding with {cfg.max_loops} rows (S_max), so it cannot run S > "
                     f"{cfg.max_loops} iterations")
  return policy


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
