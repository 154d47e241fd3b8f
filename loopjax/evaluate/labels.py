"""Human names, with units, for the keys of eval rows: axis labels, legend entries and table
headers use these instead of raw keys (`exact_match`, `nats_per_token`). A key without an
entry reads as its words (underscores to spaces), so no header ever needs a LaTeX escape for
an underscore.
"""

from __future__ import annotations

from loopjax.loops import LoopPolicy

# key -> (name, unit or "")
METRICS = {
    "exact_match": ("exact match", "fraction of problems"),
    "board_accuracy": ("valid boards", "fraction"),
    "exact_board_accuracy": ("exact boards", "fraction"),
    "cell_accuracy": ("cell accuracy", "fraction of blank cells"),
    "token_accuracy": ("token accuracy", "fraction of scored tokens"),
    "bits_per_token": ("held-out NELBO", "bits/token"),
    "nats_per_token": ("held-out NELBO", "nats/token"),
    "ppl_bound": ("perplexity bound", "exp NELBO"),
    "gen_ppl": ("generative perplexity", ""),
    "entropy": ("unigram entropy", "nats"),
    "loss": ("training loss", "nats/token"),
}
# Row identifiers, settings and compute figures (table headers and axes).
KEYS = {
    "loops": "S", "loops_mean": "loops/call", "executed_loops_mean": "executed loops/call",
    "flops_per_sample": "FLOPs/sample", "executed_flops_per_sample": "executed FLOPs/sample",
    "forward_flops_per_seq": "forward FLOPs/seq", "nfe": "model calls", "seconds": "seconds",
    "steps": "denoising steps", "time_points": "time points", "batch_size": "batch size",
    "examples": "examples", "tokens": "tokens", "seed": "seed", "policy": "loop policy",
}


def metric_name(key: str) -> str:
  """The metric's name without unit ("held-out NELBO")."""
  return METRICS[key][0] if key in METRICS else words(key)


def metric_label(key: str) -> str:
  """Name and unit, for an axis or a column: "held-out NELBO (bits/token)"."""
  name, unit = METRICS.get(key, (words(key), ""))
  return f"{name} ({unit})" if unit else name


def key_label(key: str) -> str:
  """A table header or axis label for any row key (metrics with their units)."""
  if key in KEYS:
    return KEYS[key]
  if key.endswith("_se") and key[:-3] in METRICS:
    return f"{metric_label(key[:-3])} s.e."
  return metric_label(key)


def words(key: str) -> str:
  return str(key).replace("_", " ")


def policy_label(spec) -> str:
  """A loop policy as a legend entry: "S = 4", "adaptive, τ = 0.1", "time-scheduled 2→8"
  (`LoopPolicy.legend`); a value that is no policy spec reads as itself."""
  s = str(spec)
  if s.isdigit():
    return f"S = {s}"
  try:
    return LoopPolicy.from_label(s).legend()
  except ValueError:
    return s
