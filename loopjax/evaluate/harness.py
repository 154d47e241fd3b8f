"""`loopjax eval --lm-eval TASKS`: lm-evaluation-harness tasks at every loop policy.

lm-eval is the optional extra `.[eval]`: it is imported when a run is asked for, and the
"loopjax" model is registered by lm-eval's own lazy registration (the "module:Class" string
placeholder its built-in models use), so importing this module needs neither lm-eval nor the
model module.

Shipped tasks (package data, loopjax/evaluate/lm_eval_tasks/): `loopjax_gsm8k_jsonl`
(GSM8K-format JSONL, lm-eval's gsm8k prompt, filters and metric) and `loopjax_mc_jsonl` (multiple
choice: question, choices, label). Their data files are named on the command line (`--lm-eval-data gsm8k=FILE`,
`mc=FILE`); `shipped_tasks` writes the task files with those paths filled in to a folder that
is then an include path.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import os
import re

MODEL_TARGET = "loopjax.evaluate.lm_eval_model:LoopjaxLM"
# `--lm-eval-args` keys that go to lm_eval.simple_evaluate; every other key is a model_arg.
EVALUATE_KEYS = ("num_fewshot", "limit", "bootstrap_iters", "random_seed", "numpy_random_seed",
                 "fewshot_random_seed", "gen_kwargs", "log_samples")


TASKS_PACKAGE = "loopjax.evaluate.lm_eval_tasks"
_PLACEHOLDER = re.compile(r"LOOPJAX_DATA_(\w+)")
# Data names a shipped task can go without, and the one it falls back to.
_DEFAULTS = {"gsm8k_train": "gsm8k"}


def shipped_task_files() -> dict:
  """{task name: YAML text} of the task files shipped in the package."""
  folder = importlib.resources.files(TASKS_PACKAGE)
  return {f.name[:-len(".yaml")]: f.read_text("utf-8") for f in folder.iterdir()
          if f.name.endswith(".yaml")}


def parse_task_data(specs) -> dict:
  """`--lm-eval-data NAME=FILE` values -> {NAME: absolute FILE}; every file must exist."""
  out = {}
  for spec in specs or ():
    name, sep, path = spec.partition("=")
    if not sep or not name.strip() or not path.strip():
      raise ValueError(f"--lm-eval-data {spec!r}: want NAME=FILE, e.g. gsm8k=test.jsonl")
    if not os.path.isfile(os.path.expanduser(path)):
      raise FileNotFoundError(f"--lm-eval-data {spec}: file {path!r} does not exist")
    out[name.strip()] = os.path.abspath(os.path.expanduser(path))
  return out


def _needs(text: str) -> list[str]:
  return list(dict.fromkeys(_PLACEHOLDER.findall(text)))


def check_shipped_tasks(tasks: str, data: dict) -> list[str]:
  """The shipped tasks among `tasks`; ValueError naming the --lm-eval-data a task lacks."""
  shipped = shipped_task_files()
  names = [t.strip() for t in tasks.split(",") if t.strip() in shipped]
  for task in names:
    for need in _needs(shipped[task]):
      if need not in data and need not in _DEFAULTS:  # those fall back to another name
        raise ValueError(f"--lm-eval {task} reads a local JSONL file: pass "
                         f"--lm-eval-data {need}=FILE")
  unused = set(data) - {n for t in names for n in _needs(shipped[t])}
  if unused:
    raise ValueError(f"--lm-eval-data {', '.join(sorted(unused))}: no task of --lm-eval {tasks} "
                     f"reads it (shipped tasks: {', '.join(sorted(shipped))})")
  return names


def shipped_tasks(folder: str, names, data: dict) -> str:
  """Writes the shipped task files `names` with their data paths filled in to `folder` (an
  lm-eval include path); returns it."""
  shipped = shipped_task_files()
  os.makedirs(folder, exist_ok=True)
  fill = lambda m: json.dumps(data.get(m.group(1)) or data[_DEFAULTS[m.group(1)]])
  for task in names:
    with open(os.path.join(folder, f"{task}.yaml"), "w", encoding="utf-8") as f:
      f.write(_PLACEHOLDER.sub(fill, shipped[task]))
  return folder


def check_lm_eval(tasks: str, include_path: str | None = None, data: dict | None = None) -> None:
  """Raises before any work when lm-eval is missing, no task is named, the path is absent or a
  shipped task lacks its data file."""
  if importlib.util.find_spec("lm_eval") is None:
    raise ValueError("--lm-eval needs lm-evaluation-harness: pip install -e '.[eval]'")
  if not [t for t in tasks.split(",") if t.strip()]:
    raise ValueError("--lm-eval: give at least one task name")
  if include_path and not os.path.isdir(include_path):
    raise FileNotFoundError(f"--include-path {include_path!r} is not a folder")
  check_shipped_tasks(tasks, data or {})


def parse_kv(text: str | None) -> dict:
  """"k=v,k2=v2" with lm-eval's value typing (ints, floats, booleans)."""
  from lm_eval.utils import simple_parse_args_string
  return simple_parse_args_string(text or "")


def run_lm_eval(workdir: str, tasks: str, *, loops, args: str | None = None,
                include_path: str | None = None, model_args: dict | None = None,
                data: dict | None = None, tasks_dir: str | None = None,
                loaded=None) -> list[dict]:
  """One lm-eval run per loop policy; rows {loops, results, higher_is_better, n-samples,
  versions, model_args} as JSON-ready dicts. data: {name: file} of the shipped tasks, whose
  filled-in task files go to `tasks_dir`. loaded: the model of `workdir` already loaded
  (loopjax.io.load.Loaded), handed to the "loopjax" model with each policy of `loops` as
  resolved, so lm-eval neither loads it again nor re-parses a policy."""
  check_lm_eval(tasks, include_path, data)
  shipped = check_shipped_tasks(tasks, data or {})
  if shipped:
    if tasks_dir is None:
      raise ValueError(f"--lm-eval {','.join(shipped)}: tasks_dir is needed for shipped tasks")
    own = shipped_tasks(tasks_dir, shipped, data)
    include_path = [own, include_path] if include_path else own
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
    given = margs if loaded is None else {**margs, "loaded": loaded, "loops": spec}
    res = lm_eval.simple_evaluate(model="loopjax", model_args=given, tasks=names,
                                  task_manager=manager, **evaluate_kw)
    keep = {k: res.get(k) for k in ("results", "groups", "higher_is_better", "n-samples",
                                    "versions", "n-shot")}
    row = {"loops": spec, "model_args": margs, **keep}
    rows.append(json.loads(json.dumps(row, default=handle_non_serializable)))
  return rows
