"""`loopjax eval --lm-eval TASKS`: lm-evaluation-harness tasks at every loop policy.

lm-eval is the optional extra `.[eval]`: it is imported when a run is asked for, and the
"loopjax" model is registered by lm-eval's own lazy registration (the "module:Class" string
placeholder its built-in models use), so importing this module needs neither lm-eval nor the
model module.
"""

from __future__ import annotations

import importlib.util
import json
import os

MODEL_TARGET = "loopjax.evaluate.lm_eval_model:LoopjaxLM"
# `--lm-eval-args` keys that go to lm_eval.simple_evaluate; every other key is a model_arg.
EVALUATE_KEYS = ("num_fewshot", "limit", "bootstrap_iters", "random_seed", "numpy_random_seed",
                 "fewshot_random_seed", "gen_kwargs", "log_samples")


def check_lm_eval(tasks: str, include_path: str | None = None) -> None:
  """Raises before any work when lm-eval is missing, no task is named or the path is absent."""
  if importlib.util.find_spec("lm_eval") is None:
    raise ValueError("--lm-eval needs lm-evaluation-harness: pip install -e '.[eval]'")
  if not [t for t in tasks.split(",") if t.strip()]:
    raise ValueError("--lm-eval: give at least one task name")
  if include_path and not os.path.isdir(include_path):
    raise FileNotFoundError(f"--include-path {include_path!r} is not a folder")


def parse_kv(text: str | None) -> dict:
  """"k=v,k2=v2" with lm-eval's value typing (ints, floats, booleans)."""
  from lm_eval.utils import simple_parse_args_string
  return simple_parse_args_string(text or "")


def run_lm_eval(workdir: str, tasks: str, *, loops, args: str | None = None,
                include_path: str | None = None, model_args: dict | None = None) -> list[dict]:
  """One lm-eval run per loop policy; rows {loops, results, higher_is_better, n-samples,
  versions, model_args} as JSON-ready dicts."""
  check_lm_eval(tasks, include_path)
  import lm_eval
  import lm_eval.models  # noqa: F401  lm-eval's own models first (its registry fills lazily)
  from lm_eval.api.registry import model_registry
  from lm_eval.tasks import TaskManager
  from lm_eval.utils import handle_non_serializable
  if "loopjax" not in model_registry:
    model_registry.register("loopjax", target=MODEL_TARGET)
  extra = parse_kv(args)
  evaluate_kw = {k: extra.pop(k) for k in EVALUATE_KEYS if k in extra}
  evaluate_kw.setdefault("log_samples", False)
  names = [t.strip() for t in tasks.split(",") if t.strip()]
  manager = None
  if include_path:  # tasks all found there: lm-eval's ~15k built-in task files are not indexed
    manager = TaskManager(include_path=include_path, include_defaults=False)
    if not all(manager.match_tasks([n]) for n in names):
      manager = None
  manager = manager or TaskManager(include_path=include_path)
  rows = []
  for spec in loops:
    margs = {**(model_args or {}), **extra, "workdir": workdir, "loops": str(spec)}
    res = lm_eval.simple_evaluate(model="loopjax", model_args=margs, tasks=names,
                                  task_manager=manager, **evaluate_kw)
    keep = {k: res.get(k) for k in ("results", "groups", "higher_is_better", "n-samples",
                                    "versions", "n-shot")}
    row = {"loops": spec, "model_args": margs, **keep}
    rows.append(json.loads(json.dumps(row, default=handle_non_serializable)))
  return rows
