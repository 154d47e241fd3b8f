"""Markdown / LaTeX eval tables (human headers, LaTeX-safe) and the sweep plots (vector output,
plain axes, ticks at the data's S, S_max, intervals, visible overlaps, legends as drawn)."""

import os
import re

import numpy as np
import pytest

from loopjax.evaluate import plots, tables

ROWS = [
    {"loops": 1, "steps": 8, "method": "confidence", "cell_accuracy": 0.25, "loops_mean": 1.0,
     "executed_loops_mean": 1.0, "flops_per_sample": 1.75e9, "executed_flops_per_sample": 1.75e9,
     "seconds": 1.5, "loops_max": 1, "samples": ["x"]},
    {"loops": 4, "steps": 8, "method": "confidence", "cell_accuracy": 0.3, "loops_mean": 4.0,
     "executed_loops_mean": 4.0, "flops_per_sample": 3.05e9, "executed_flops_per_sample": 3.05e9,
     "seconds": 3.0, "loops_max": 4, "samples": ["x"]},
    {"loops": "adaptive:0.1", "steps": 8, "method": "confidence", "cell_accuracy": 0.28,
     "loops_mean": 1.9, "executed_loops_mean": 2.9, "flops_per_sample": 2.1e9,
     "executed_flops_per_sample": 2.6e9, "seconds": 2.2, "loops_max": 3, "samples": ["x"]},
]


def _unescaped(text, ch):
  return len(re.findall(r"(?<!\\)" + re.escape(ch), text))


def test_write_tables_markdown_and_latex_are_well_formed(tmp_path):
  rows = ROWS + [{"loops": "time:1,2", "steps": 8, "cell_accuracy": None,
                  "note": "a_b & 50% #1"}]
  cols = ["loops", "cell_accuracy", ("executed_flops_per_sample", "exec_FLOPs"), "note"]
  md, tex = tables.write_tables(rows, cols, str(tmp_path / "sub" / "tasks_x"), "tasks_x & co")
  assert md.endswith("tasks_x.md") and tex.endswith("tasks_x.tex")
  lines = [l for l in open(md).read().splitlines() if l.startswith("|")]
  assert len(lines) == 2 + len(rows)
  assert {l.count("|") for l in lines} == {len(cols) + 1}  # every row has every cell
  assert lines[0] == "| S | cell accuracy (fraction of blank cells) | exec_FLOPs | note |"
  assert set(lines[1].replace("|", "").replace(":", "").replace("-", "")) == set()
  assert "| adaptive:0.1 | 0.2800 | 2.60e9 | - |" in lines
  assert "| time:1,2 | - | - | a_b & 50% #1 |" in lines
  text = open(tex).read()
  body = text[text.index("\\toprule"):text.index("\\bottomrule")]
  data = [l for l in body.splitlines() if l.endswith("\\\\")]
  assert len(data) == 1 + len(rows)
  assert {_unescaped(l, "&") for l in data} == {len(cols) - 1}
  for ch in "_%#":  # every special character is escaped (outside math there is no bare one)
    assert _unescaped(re.sub(r"\$[^$]*\$", "", text), ch) == 0, ch
  assert "\\caption{tasks\\_x \\& co}" in text and "exec\\_FLOPs" in text
  assert "$2.60\\times10^{9}$" in text and "a\\_b \\& 50\\% \\#1" in text
  assert text.count("\\begin{tabular}{") == 1 and "\\begin{tabular}{lrrl}" in text
  assert text.index("\\begin{table}") < text.index("\\end{tabular}") < text.index("\\end{table}")


def test_eval_tables_pick_columns_and_move_constant_settings_to_the_caption(tmp_path):
  path = tmp_path / "tasks.json"
  md, tex = tables.write_eval_tables(str(path), ROWS)
  head = open(md).read().splitlines()
  assert head[0] == "**tasks (method confidence)**"
  assert head[2].split(" | ")[:3] == ["| S", "denoising steps",
                                      "cell accuracy (fraction of blank cells)"]
  assert "executed FLOPs/sample" in head[2] and "samples" not in head[2]
  assert "loops_max" not in head[2] and "method" not in head[2]
  assert tables.write_eval_tables(str(tmp_path / "none.json"), []) == []
  with pytest.raises(ValueError, match="column"):
    tables.write_tables(ROWS, [], str(tmp_path / "x"))


def _spy(monkeypatch):
  """Captures every figure before it is saved: (offset texts, axes) per figure."""
  seen, save = [], plots.save_figure

  def spy(fig, path):
    fig.canvas.draw()
    ax = fig.axes[0]
    seen.append(dict(offsets=[ax.xaxis.get_offset_text().get_text(),
                              ax.yaxis.get_offset_text().get_text()], ax=ax))
    return save(fig, path)

  monkeypatch.setattr(plots, "save_figure", spy)
  return seen


def test_plots_write_png_svg_pdf_with_plain_axes_smax_and_error_bars(tmp_path, monkeypatch):
  seen = _spy(monkeypatch)
  # Two seeds per S, y values that matplotlib would print with an offset ("+1e3").
  rows = []
  for seed in (0, 1):
    for r in ROWS:
      rows.append({**r, "seed": seed, "bits": 1000.001 + 0.001 * seed
                   + 0.0001 * float(r["loops_mean"])})
  png = plots.plot_quality_vs_loops(rows, metric="bits", group="none",
                                    path=str(tmp_path / "p" / "loops.png"), s_max=4)
  png2 = plots.plot_quality_vs_compute(rows, metric="bits", path=str(tmp_path / "flops.png"),
                                       s_max=4)
  for path in (png, png2):
    stem = os.path.splitext(path)[0]
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert open(stem + ".pdf", "rb").read(5) == b"%PDF-"
    assert b"<svg" in open(stem + ".svg", "rb").read(2000)
  loops_ax, flops_ax = seen[0]["ax"], seen[1]["ax"]
  for s in seen:
    assert s["offsets"][1] == "", s["offsets"]  # no offset / multiplier text on y
  assert seen[0]["offsets"][0] == ""
  # S_max: a vertical line at S = 4 (loops) and at the FLOPs of S = 4 (compute).
  vlines = lambda ax: [l.get_xdata()[0] for l in ax.lines
                       if len(set(l.get_xdata())) == 1 and len(l.get_xdata()) == 2]
  # FLOPs spanning less than 20x: a linear axis in units of 10^9.
  assert 4 in vlines(loops_ax) and 3.05 in vlines(flops_ax)
  assert flops_ax.get_xscale() == "linear" and "$10^{9}$" in flops_ax.get_xlabel()
  # Repeats -> error bars; the adaptive policy appears at its executed loops / FLOPs.
  from matplotlib.container import ErrorbarContainer
  bars = [c for c in loops_ax.containers if isinstance(c, ErrorbarContainer) and c.has_yerr]
  assert bars, "two seeds per S must give error bars"
  stars = [l for l in loops_ax.lines if l.get_marker() == "*"]
  assert [l.get_xdata()[0] for l in stars] == [2.9]
  assert [l.get_xdata()[0] for l in flops_ax.lines if l.get_marker() == "*"] == [2.6]
  hollow = [l.get_xdata()[0] for l in loops_ax.lines if l.get_marker() == "o"
            and l.get_markerfacecolor() == "none"]
  assert hollow == [1.9]  # the per-sequence need beside the executed figure


def test_a_policy_without_compute_is_a_line_not_dropped(tmp_path, monkeypatch):
  seen = _spy(monkeypatch)
  rows = [{"loops": 1, "bits_per_token": 1.5}, {"loops": 2, "bits_per_token": 1.4},
          {"loops": "time:1,2", "bits_per_token": 1.45}]
  plots.plot_quality_vs_loops(rows, metric="bits_per_token", group="none",
                              path=str(tmp_path / "b.png"))
  ax = seen[0]["ax"]
  labels = ax.get_legend_handles_labels()[1]
  assert any(l.startswith("time:1,2") for l in labels)
  flat = [l for l in ax.lines if list(l.get_ydata()) == [1.45, 1.45]]
  assert flat, "a policy row with no loop figure is drawn as a horizontal line"


def test_latex_headers_are_human_names_with_units_and_need_no_escapes(tmp_path):
  rows = [{"loops": s, "nats_per_token": 1.2 - 0.1 * s, "bits_per_token": (1.2 - 0.1 * s) / 0.693,
           "exact_match": 0.5, "examples": 32, "time_points": 8} for s in (1, 2)]
  md, tex = tables.write_eval_tables(str(tmp_path / "likelihood.json"), rows)
  text = open(tex).read()
  header = text.splitlines()[text.splitlines().index("\\toprule") + 1]
  assert header == ("S & held-out NELBO (nats/token) & held-out NELBO (bits/token) & exact match "
                    "(fraction of problems) \\\\")
  assert "\\_" not in text and "nats_per_token" not in text and "exact_match" not in text
  assert "\\caption{likelihood (examples 32, time points 8)}" in text


def test_loop_ticks_sit_at_the_data_s_values_and_coinciding_policies_are_spread(
    tmp_path, monkeypatch):
  seen = _spy(monkeypatch)
  rows = [{"loops": s, "steps": k, "exact_match": 0.5, "examples": 32, "executed_loops_mean": s,
           "loops_mean": s} for s in (1, 3, 6, 12) for k in (8, 16)]
  rows += [{"loops": f"adaptive:{t}", "steps": 8, "exact_match": 0.5, "examples": 32,
            "executed_loops_mean": 6.0, "loops_mean": 6.0} for t in (0.1, 0.03, 0.01)]
  plots.plot_quality_vs_loops(rows, metric="exact_match", path=str(tmp_path / "l.png"), s_max=6)
  ax = seen[0]["ax"]
  assert list(ax.get_xticks()) == [1, 3, 6, 12] and ax.get_xscale() == "log"
  # Two series with equal values: drawn side by side, not on top of each other.
  lines = [l for l in ax.lines if l.get_marker() in plots.SERIES_MARKERS[:2]
           and l.get_linestyle() != "None"]
  assert len(lines) == 2 and not np.allclose(np.asarray(lines[0].get_xdata(), float),
                                                  np.asarray(lines[1].get_xdata(), float))
  np.testing.assert_allclose(np.asarray(lines[0].get_ydata(), float),
                             np.asarray(lines[1].get_ydata(), float))
  # Three policies at the executed S = 6, where a fixed-S point sits too: all to its right,
  # each at its own x.
  marks = {l.get_marker(): l.get_xdata()[0] for l in ax.lines
           if l.get_marker() in plots.POLICY_MARKERS[:3]}
  assert len(set(marks.values())) == 3 and min(marks.values()) > 6.0 * plots.dodge(0, 2)
  # The legend has what is drawn: two series, S_max, and one entry per policy marker.
  names = [t.get_text() for t in ax.get_legend().get_texts()]
  assert names == ["denoising steps 8", "denoising steps 16", "S_max = 6 (training)",
                   "adaptive, τ = 0.1", "adaptive, τ = 0.03", "adaptive, τ = 0.01"]
  # A 95 % Wilson interval on each point of 32 examples, and the note says so.
  from matplotlib.container import ErrorbarContainer
  bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer) and c.has_yerr]
  seg = bars[0].lines[2][0].get_segments()[0]
  np.testing.assert_allclose([seg[0][1], seg[1][1]], [0.33631, 0.66369], atol=1e-5)
  assert "95% Wilson interval over 32 examples" in "".join(t.get_text() for t in ax.texts)
