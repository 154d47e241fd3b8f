"""`loopjax flops --config A [--config.a.b=VALUE ...] [--match B [--match-config.a.b=VALUE ...]
[--same-overrides]] [--json]`: parameters, FLOPs and FLOP matching of experiment configs (the
numbers come from loopjax.flops).

A is loaded exactly as `loopjax train` loads it: the overrides first, then the values its variant
derives (so the steps reported are the steps `train` would run). The `--config.` overrides apply
to A only; B, the reference run, takes its own as `--match-config.KEY=VALUE`, and
`--same-overrides` applies A's to B as well (before B's own), e.g. to match a resized LoopMDM
against the same resize of its MDM baseline.

With --match, A's steps are reported under each F_base convention of the matching rule
(loopjax.flops.FLOP_CONVENTIONS): all forward FLOPs, layers only, and 6 N D; the config's own
`variant.flop_convention` is the one its variants train with."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from loopjax.flops import (FLOP_CONVENTIONS, _depth,
                           executed_depth_params_for,
                           expected_train_flops_per_step, forward_flops_per_token,
                           layer_flops_per_seq, matched_depth, matched_steps, param_counts,
                           train_flops_per_step)
from loopjax.cli.config import CONFIG_HELP, OVERRIDES_EPILOG, parse_config_command
from loopjax.config.load import split_config_args
from loopjax.config.run import Run, resolve


def load_experiment(spec: str, overrides: Sequence[str] = ()) -> Run:
  """`path.py[:variant]` + overrides -> the resolved Run (the resolve step of `loopjax train`)."""
  return resolve(spec, overrides)


def _get(cfg, dotted: str, default: Any = None):
  node = cfg
  for key in dotted.split("."):
    try:
      node = node[key]
    except (KeyError, TypeError, AttributeError):
      return default
  return node


def experiment_summary(run: Run) -> dict[str, Any]:
  """The FLOP/parameter numbers of one resolved run (its model, loops, data and train)."""
  cfg, dist, config = run.model, run.loops, run.config
  spec = config.loops.train
  length = int(_get(config, "data.seq_len", cfg.max_length))
  batch = int(_get(config, "train.batch_size", 1))
  steps = _get(config, "train.steps")
  exp_s = dist.expected if cfg.looped else 1.0
  s_max = cfg.max_loops if cfg.looped else 1
  per_step = expected_train_flops_per_step(cfg, length, batch, dist)
  out = {
      "params": param_counts(cfg)["total"],
      "loops_spec": spec,
      "expected_loops": exp_s,
      "max_loops": s_max,
      "seq_len": length,
      "batch_size": batch,
      "steps": None if steps is None else int(steps),
      "executed_depth_expected": _depth(cfg, exp_s),
      "executed_depth_max": cfg.executed_depth(s_max),
      "executed_depth_params_max": executed_depth_params_for(cfg, s_max),
      "layer_flops_per_seq": layer_flops_per_seq(cfg, length),
      "forward_flops_per_token": forward_flops_per_token(cfg, length, exp_s),
      "train_flops_per_token": per_step / (batch * length),
      "flops_per_step": per_step,
      "flops_per_step_max_loops": train_flops_per_step(cfg, length, batch, s_max),
      "total_train_flops": None if steps is None else per_step * int(steps),
  }
  out["_cfg"], out["_dist"] = cfg, dist
  out["_convention"] = _get(config, "variant.flop_convention", "all_forward")
  return out


_MATCHED_KEYS = ("matched_steps", "matched_steps_layers_only", "matched_steps_6nd")
_LABELS = {"all_forward": "all forward FLOPs", "layers_only": "layers only", "6nd": "6ND"}


def _fmt(x: float | None) -> str:
  if x is None:
    return "-"
  if float(x).is_integer() and abs(x) < 1e10:  # counts: params, steps
    return f"{int(x):,}"
  return f"{x:.4g}"


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="loopjax flops",
      description="Parameters, FLOPs per token/step and FLOP matching of experiment configs. "
                  "--config A [--config.a.b=VALUE ...]: the experiment and its overrides, "
                  "as `loopjax train` takes them. --match B [--match-config.a.b=VALUE ...]: "
                  "the reference run and its own overrides.",
      epilog=OVERRIDES_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", metavar="FILE[:VARIANT]", help=CONFIG_HELP)
  parser.add_argument("--match", help="path.py[:variant] whose total training FLOPs A must match; "
                      "A's --config. overrides do not apply to it: give B's as "
                      "--match-config.KEY=VALUE, or pass --same-overrides")
  parser.add_argument("--same-overrides", action="store_true",
                      help="apply A's --config.KEY=VALUE overrides to --match B too (before B's "
                      "own --match-config.KEY=VALUE)")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  return parser


def flops_main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  _, match_overrides, argv = split_config_args(argv, prefix="--match-config")
  parser = build_parser()
  spec, overrides, args = parse_config_command(parser, argv)
  if (match_overrides or args.same_overrides) and not args.match:
    parser.error("--match-config.KEY=VALUE and --same-overrides need --match B")
  if args.same_overrides:
    match_overrides = [*overrides, *match_overrides]

  a = experiment_summary(load_experiment(spec, overrides))
  result = {k: v for k, v in a.items() if not k.startswith("_")}
  result["config"], result["overrides"] = spec, overrides
  md, md_int = matched_depth(a["_cfg"], a["_dist"], a["seq_len"])
  result["matched_depth"], result["matched_depth_rounded"] = md, md_int
  result["flop_convention"] = a["_convention"]
  if args.match:
    b = experiment_summary(load_experiment(args.match, match_overrides))
    if b["seq_len"] != a["seq_len"]:
      raise ValueError(f"--match: sequence lengths differ ({a['seq_len']} vs {b['seq_len']}): "
                       f"set --match-config.data.seq_len={a['seq_len']} (and model.max_length) "
                       "or pass --same-overrides")
    if b["steps"] is None:
      raise ValueError("--match: the matched config has no train.steps")
    steps_a = matched_steps(a["_cfg"], a["_dist"], b["_cfg"], b["_dist"], b["steps"],
                            a["seq_len"], a["batch_size"], b["batch_size"])
    result["match"] = {
        "config": args.match,
        "overrides": match_overrides,
        "params": b["params"],
        "flops_per_step": b["flops_per_step"],
        "steps": b["steps"],
        "total_train_flops": b["total_train_flops"],
        "per_step_ratio": a["flops_per_step"] / b["flops_per_step"],
        "steps_to_match": steps_a,
        "steps_to_match_rounded": int(round(steps_a)),
    }
    # The paper's rule under each F_base convention (A's steps for B's total).
    for convention, key in zip(FLOP_CONVENTIONS, _MATCHED_KEYS):
      result[key] = matched_steps(a["_cfg"], a["_dist"], b["_cfg"], b["_dist"], b["steps"],
                                  a["seq_len"], a["batch_size"], b["batch_size"],
                                  convention=convention)

  if args.json:
    print(json.dumps(result, sort_keys=True))
    return 0
  rows = [
      ("config", " ".join([spec, *overrides])),
      ("parameters (unique)", _fmt(result["params"])),
      ("params of a plain model at S_max depth", _fmt(result["executed_depth_params_max"])),
      ("loops (train)", f"{result['loops_spec']}  E[S]={result['expected_loops']:.3g}  "
                        f"S_max={result['max_loops']}"),
      ("executed depth at E[S] / S_max",
       f"{result['executed_depth_expected']:.3g} / {result['executed_depth_max']}"),
      ("seq_len x batch", f"{result['seq_len']} x {result['batch_size']}"),
      ("forward FLOPs / token  (E[S])", _fmt(result["forward_flops_per_token"])),
      ("train FLOPs / token    (E[S], 3x fwd)", _fmt(result["train_flops_per_token"])),
      ("train FLOPs / step     (E[S])", _fmt(result["flops_per_step"])),
      ("train FLOPs / step     (S_max)", _fmt(result["flops_per_step_max_loops"])),
      ("steps / total train FLOPs", f"{_fmt(result['steps'])} / "
                                    f"{_fmt(result['total_train_flops'])}"),
      ("compute-matched plain depth", f"{md:.2f} (~{md_int} layers)"),
  ]
  if args.match:
    m = result["match"]
    rows += [
        ("match: config", " ".join([m["config"], *m["overrides"]])),
        ("match: FLOPs / step, steps", f"{_fmt(m['flops_per_step'])}, {_fmt(m['steps'])}"),
        ("match: per-step ratio A/B", f"{m['per_step_ratio']:.4f}"),
        ("match: steps A needs", f"{m['steps_to_match']:.1f} (~{m['steps_to_match_rounded']:,})"),
    ]
    for convention, key in zip(FLOP_CONVENTIONS, _MATCHED_KEYS):
      mark = "  (this config's variant.flop_convention)" if convention == \
          result["flop_convention"] else ""
      rows.append((f"matched steps, F_base {_LABELS[convention]}",
                   f"{result[key]:,.1f} (~{int(round(result[key])):,}){mark}"))
  width = max(len(k) for k, _ in rows)
  for k, v in rows:
    print(f"{k:<{width}}  {v}")
  return 0


if __name__ == "__main__":
  sys.exit(flops_main(sys.argv[1:]))
