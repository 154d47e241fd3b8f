"""Markdown and LaTeX tables of evaluation rows, written beside the eval JSON.

A table is a list of row dicts and a list of columns (rows = loop counts S or policies, columns
= metrics). `write_tables(rows, columns, path_stem, caption)` writes PATH_STEM.md (a GitHub
pipe table under the caption) and PATH_STEM.tex (a booktabs `table` float: \\toprule /
\\midrule / \\bottomrule, needs `\\usepackage{booktabs}`); every eval of `loopjax eval` calls it
through `write_eval_tables`, which picks the columns of any row list (likelihood, tasks, GSM8K,
zero-shot, generative perplexity, lm-eval rows): identifying keys first, then metrics, then
compute; settings that are the same in every row go into the caption instead of a column.
Headers are human names with units (loopjax/evaluate/labels.py: `exact_match` -> "exact match
(fraction of problems)", `nats_per_token` -> "held-out NELBO (nats/token)"), so no header
carries an escaped underscore.

Numbers: integers as they are, floats with 4 decimals, and large or tiny magnitudes (FLOPs) in
3-significant-digit scientific notation ($1.23\\times10^{9}$ in LaTeX). A missing value is "-".
"""

from __future__ import annotations

import math
import os
import re

from loopjax.evaluate.labels import key_label, words

# Keys that name a row (what was varied), in this order, before any metric.
ID_KEYS = ("task", "corpus", "judge", "policy", "loops", "steps", "seed")
# Compute and bookkeeping keys, after the metrics, in this order.
COMPUTE_KEYS = ("loops_mean", "executed_loops_mean", "nfe", "flops_per_sample",
                "executed_flops_per_sample", "forward_flops_per_seq", "seconds")
# Settings: shown in the caption when equal in every row, else as a column.
SETTING_KEYS = ("method", "sampler", "examples", "batch_size", "time_points", "tokens", "file")
# Paths shown by their file name.
PATH_KEYS = ("corpus", "file", "judge")
# Not table material (totals that duplicate a per-call column, bulky fields).
SKIP_KEYS = ("loops_max", "executed_loops", "samples", "nelbo_sum", "num_tokens")

_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}"}


def latex_escape(text) -> str:
  """`text` with LaTeX's special characters escaped (safe inside a tabular cell)."""
  return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _scalar(v) -> bool:
  return v is None or isinstance(v, (bool, int, float, str))


def format_value(v, latex: bool = False) -> str:
  """One cell: None -> "-", ints as is, floats 4 decimals or 3 significant digits (scientific
  when |v| >= 1e5 or 0 < |v| < 1e-3)."""
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "-"
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    return latex_escape(v) if latex else str(v)
  if isinstance(v, int):
    return str(v)
  if math.isinf(v):
    return ("$\\infty$" if v > 0 else "$-\\infty$") if latex else str(v)
  if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
    mant, exp = f"{v:.2e}".split("e")
    return f"${mant}\\times10^{{{int(exp)}}}$" if latex else f"{mant}e{int(exp)}"
  return f"{v:.4f}"


def _columns(columns):
  """[(key, header)] from keys or (key, header) pairs."""
  out = []
  for c in columns:
    key, head = (c, key_label(c)) if isinstance(c, str) else (c[0], c[1])
    out.append((key, head))
  if not out:
    raise ValueError("a table needs at least one column")
  return out


def markdown_table(rows, columns, caption: str = "") -> str:
  """A GitHub pipe table (caption as a bold line above it)."""
  cols = _columns(columns)
  cell = lambda v: format_value(v).replace("|", "\\|")
  lines = [f"**{caption}**", ""] if caption else []
  lines.append("| " + " | ".join(cell(h) for _, h in cols) + " |")
  lines.append("|" + "|".join("---" if not _numeric(rows, k) else "---:" for k, _ in cols) + "|")
  for r in rows:
    lines.append("| " + " | ".join(cell(r.get(k)) for k, _ in cols) + " |")
  return "\n".join(lines) + "\n"


def _numeric(rows, key) -> bool:
  vals = [r.get(key) for r in rows if r.get(key) is not None]
  return bool(vals) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                            for v in vals)


def latex_table(rows, columns, caption: str = "", label: str = "") -> str:
  """A booktabs table float: numeric columns right-aligned, text left-aligned."""
  cols = _columns(columns)
  align = "".join("r" if _numeric(rows, k) else "l" for k, _ in cols)
  lines = ["\\begin{table}[t]", "\\centering"]
  if caption:
    lines.append(f"\\caption{{{latex_escape(caption)}}}")
  if label:
    lines.append(f"\\label{{{label}}}")
  lines += [f"\\begin{{tabular}}{{{align}}}", "\\toprule",
            " & ".join(latex_escape(h) for _, h in cols) + " \\\\", "\\midrule"]
  for r in rows:
    lines.append(" & ".join(format_value(r.get(k), latex=True) for k, _ in cols) + " \\\\")
  lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
  return "\n".join(lines) + "\n"


def write_tables(rows, columns, path_stem: str, caption: str = "") -> list[str]:
  """Writes PATH_STEM.md and PATH_STEM.tex for `rows` (dicts) and `columns` (keys, or
  (key, header) pairs); returns the two paths. A key a row lacks is shown as "-"."""
  rows = list(rows)
  os.makedirs(os.path.dirname(os.path.abspath(path_stem)), exist_ok=True)
  label = "tab:" + re.sub(r"[^A-Za-z0-9]+", "-", os.path.basename(path_stem)).strip("-")
  out = []
  for ext, text in ((".md", markdown_table(rows, columns, caption)),
                    (".tex", latex_table(rows, columns, caption, label))):
    path = path_stem + ext
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)
    out.append(path)
  return out


def default_columns(rows) -> tuple[list[str], dict]:
  """(columns, settings) for any eval rows: ID_KEYS present, then the other scalar keys in first
  appearance order (the metrics), then COMPUTE_KEYS present. Settings: SETTING_KEYS equal in
  every row, moved to the caption (a setting that varies stays a column)."""
  keys = []
  for r in rows:
    keys += [k for k, v in r.items() if k not in keys and _scalar(v) and k not in SKIP_KEYS]
  settings = {}
  for k in SETTING_KEYS:
    vals = {str(r.get(k)) for r in rows}
    if k in keys and len(vals) == 1:
      settings[k] = rows[0].get(k)
  keys = [k for k in keys if k not in settings and any(r.get(k) is not None for r in rows)]
  ids = [k for k in ID_KEYS if k in keys]
  comp = [k for k in COMPUTE_KEYS if k in keys]
  middle = [k for k in keys if k not in ids and k not in comp]
  return ids + middle + comp, settings


def write_eval_tables(json_path: str, rows, caption: str = "") -> list[str]:
  """The tables of one eval JSON (WORKDIR/eval/NAME.json -> NAME.md, NAME.tex beside it), with
  `default_columns` and PATH_KEYS shortened to file names; [] when there is no row."""
  rows = [{k: (os.path.basename(v) if k in PATH_KEYS and isinstance(v, str) else v)
           for k, v in r.items()} for r in rows if isinstance(r, dict)]
  if not rows:
    return []
  columns, settings = default_columns(rows)
  name = os.path.splitext(os.path.basename(json_path))[0]
  caption = caption or words(name)
  if settings:
    caption += " (" + ", ".join(f"{key_label(k)} {v}" for k, v in settings.items()) + ")"
  return write_tables(rows, columns, os.path.splitext(json_path)[0], caption)
