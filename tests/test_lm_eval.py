"""lm-evaluation-harness integration: the "loopjax" model's log-likelihood against the NELBO API,
its greedy flag, GSM8K answer extraction against lm-eval's own filters, and lm-eval runs (its CLI
and `loopjax eval --lm-eval`) on a local multiple-choice task and a local GSM8K-format task."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the optional extra "
                              "'.[eval]' (pip install -e '.[eval]')")
yaml = pytest.importorskip("yaml", reason="lm-eval's task files are YAML")

from lm_eval.api.instance import Instance  # noqa: E402

from loopjax.data.batch import make_row, stack_rows  # noqa: E402
from loopjax.data.tokenizers import ByteTokenizer  # noqa: E402
from loopjax.diffusion import make_schedule  # noqa: E402
from loopjax.evaluate.gsm8k import decode_answer, extract_answer, normalize_number  # noqa: E402
from loopjax.evaluate.likelihood import heldout_nelbo  # noqa: E402
from loopjax.evaluate.lm_eval_model import LoopjaxLM  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN = 64
GSM8K_YAML = os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "gsm8k", "gsm8k.yaml")


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
  """HF datasets / hub offline, their caches in a temporary folder."""
  home = tmp_path_factory.mktemp("hf")
  env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(home),
         "HF_DATASETS_CACHE": str(home / "datasets")}
  mp = pytest.MonkeyPatch()
  for k, v in env.items():
    mp.setenv(k, v)
  yield env
  mp.undo()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
  """A byte-level looped model (random weights, S_max 2) as a `loopjax export` folder."""
  import dataclasses
  from loopjax.io.export import export_params
  from loopjax.model import LoopedTransformer, ModelConfig
  from loopjax.config.base import base_config
  cfg = ModelConfig(kernels="reference",
                    vocab_size=257, max_length=SEQ_LEN, width=32, num_layers=3, num_heads=2,
                    cond_dim=16, loop_start=1, loop_end=2, max_loops=2)
  model = LoopedTransformer(cfg)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, SEQ_LEN), jnp.int32), 1)["params"]
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape), a.dtype), shapes)
  c = base_config()
  c.model.update({k: v for k, v in dataclasses.asdict(cfg).items() if k in c.model})
  c.loops.train = "uniform:1:2"
  c.data.update(source="text", tokenizer="byte", seq_len=SEQ_LEN)
  out = str(tmp_path_factory.mktemp("export") / "tiny")
  export_params(out, cfg, params, run_config=c)
  return out


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
  """A local multiple-choice task and a GSM8K-format task that is lm-eval's own gsm8k config
  (prompt, stop strings, filters, metric) with the data files swapped for local JSONL and
  1-shot instead of 5 (rows of 64 bytes)."""
  d = tmp_path_factory.mktemp("tasks")
  mc = [{"question": f"{a} plus {b} is", "choices": [str(a + b), str(a + b + 1), "many"],
         "label": 0} for a, b in ((1, 2), (3, 4), (2, 2), (5, 1))]
  (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
  (d / "mc.yaml").write_text(yaml.safe_dump({
      "task": "loopjax_mc", "dataset_path": "json",
      "dataset_kwargs": {"data_files": {"test": str(d / "mc.jsonl")}}, "test_split": "test",
      "output_type": "multiple_choice", "doc_to_text": "{{question}}",
      "doc_to_target": "{{label}}", "doc_to_choice": "{{choices}}",
      "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}))
  gsm = [{"question": f"What is {i} + 2?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}
         for i in range(6)]
  (d / "gsm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gsm))
  with open(GSM8K_YAML, encoding="utf-8") as f:
    task = yaml.safe_load(f)
  task.pop("tag", None)
  task.pop("dataset_name", None)
  task.update(task="loopjax_gsm8k", dataset_path="json", num_fewshot=1, dataset_kwargs={
      "data_files": {"train": str(d / "gsm.jsonl"), "test": str(d / "gsm.jsonl")}})
  (d / "gsm8k_local.yaml").write_text(yaml.safe_dump(task))
  return d


def _ids(text):
  return ByteTokenizer().encode(text)


def test_loglikelihood_is_the_conditional_nelbo(export_dir):
  """loglik = -NELBO of the continuation with the context fixed, as `heldout_nelbo` scores the
  same row (same seed and time grid); batch-invariant; bounded by 0."""
  lm = LoopjaxLM(workdir=export_dir, loops=2, time_grid=3, batch_size=2, seed=5)
  pairs = [("Question: 1+1\nAnswer:", " 2"), ("The sky is", " blue today"), ("", "hello")]
  reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
  got = lm.loglikelihood(reqs)
  assert len(got) == 3 and all(ll < 0 for ll, _ in got)
  schedule = make_schedule(lm.config.diffusion)
  pad = ByteTokenizer().eos_id
  for (ctx, cont), (ll, _) in zip(pairs, got):
    c = _ids(ctx) if ctx else [pad]  # lm-eval's empty context is the prefix token (EOS)
    x = _ids(cont)
    tokens = np.full(SEQ_LEN, pad, np.int32)
    tokens[:len(c) + len(x)] = c + x
    pos = np.arange(SEQ_LEN)
    scored = (pos >= len(c)) & (pos < len(c) + len(x))
    batch = stack_rows([make_row(tokens, fixed=~scored, loss_mask=scored,
                                 segment_ids=(pos < len(c) + len(x)).astype(np.int32))])
    ref = heldout_nelbo(lm.model, lm.params, [batch], schedule=schedule, loops=lm.policy,
                        time_points=3, seed=5)
    assert ref["tokens"] == len(x)
    np.testing.assert_allclose(ll, -ref["nats_per_token"] * ref["tokens"], rtol=2e-5)
  # Alone or in a batch with others: the same value.
  alone = lm.loglikelihood(reqs[1:2])[0][0]
  np.testing.assert_allclose(alone, got[1][0], rtol=1e-6)
  # Monte-Carlo: seeded (same value twice), another estimate of the same bound.
  mc = LoopjaxLM(workdir=export_dir, loops=2, mc_samples=3, batch_size=2, seed=5)
  a, b = mc.loglikelihood(reqs), mc.loglikelihood(reqs)
  assert a == b and all(np.isfinite(v) and v < 0 for v, _ in a)
  assert [v for v, _ in a] != [v for v, _ in got]
  with pytest.raises(ValueError, match="exactly one of"):
    LoopjaxLM(workdir=export_dir, time_grid=2, mc_samples=2)


def test_is_greedy_is_the_single_step_argmax(export_dir):
  lm = LoopjaxLM(workdir=export_dir, loops=1, time_grid=3, batch_size=2)  # compiled above
  ctx = _ids("abc = ")
  n = 4
  x = np.full((1, SEQ_LEN), ByteTokenizer().eos_id, np.int32)
  x[0, :len(ctx)] = ctx
  x[0, len(ctx):len(ctx) + n] = lm.model.cfg.mask_id
  seg = (np.arange(SEQ_LEN) < len(ctx) + n).astype(np.int32)[None]
  # The model's own forward at S = 1, t = 1 (not the inference driver).
  forward = jax.jit(lambda p, x, s: lm.model.apply({"params": p}, x, 1, jnp.ones((1,)), s))
  logits = forward(lm.params, jnp.asarray(x), jnp.asarray(seg))
  best = [int(v) for v in np.asarray(logits[0, len(ctx):len(ctx) + n].argmax(-1))]
  other = best[:-1] + [(best[-1] + 1) % 256]
  (_, g1), (_, g2) = lm._loglikelihood_tokens([(None, ctx, best), (None, ctx, other)])
  assert g1 and not g2


def test_rolling_loglikelihood_sums_disjoint_full_row_windows(export_dir):
  """A text of 150 bytes in rows of 64: windows (EOS | t[0:63]), (t[62] | t[63:126]) and
  (t[86:126] | t[126:150]); every token scored once, the total their sum."""
  lm = LoopjaxLM(workdir=export_dir, loops=2, time_grid=3, batch_size=2)  # compiled above
  text = "".join(chr(97 + (7 * i) % 26) for i in range(150))
  t = _ids(text)
  (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
  windows = [([ByteTokenizer().eos_id], t[0:63]), (t[62:63], t[63:126]), (t[86:126], t[126:150])]
  assert sum(len(c) for _, c in windows) == len(t)
  want = sum(ll for ll, _ in lm._loglikelihood_tokens([(None, c, x) for c, x in windows]))
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_core_modules_never_import_lm_eval():
  """lm-eval is an optional extra: only the registered model's module imports it at load time
  (ast; the harness runner imports it inside the call)."""
  import ast
  for folder, _, files in os.walk(os.path.join(ROOT, "loopjax")):
    for f in files:
      path = os.path.join(folder, f)
      if not f.endswith(".py") or path.endswith(os.path.join("evaluate", "lm_eval_model.py")):
        continue
      with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
      for node in tree.body:
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [f"{node.module}.{a.name}" for a in node.names]
                 if isinstance(node, ast.ImportFrom) else [])
        assert not any(n.split(".")[0] == "lm_eval" or n.endswith("lm_eval_model")
                       for n in names), path


@pytest.mark.parametrize("text", [
    "3 + 4 = 7\n#### 7", "so #### 1,234 and later #### 5", "#### -5", "#### 18.50",
    "The answer is 42.", "12 then 13 and finally 14", "nothing here",
    # The documented difference: lm-eval's strict-match takes no "$" after "####".
    pytest.param("#### $7", marks=pytest.mark.xfail(strict=True, reason="documented"))])
def test_gsm8k_extraction_agrees_with_lm_eval_filters(text):
  """`extract_answer` is lm-eval gsm8k's strict-match when the text has '#### N', else its
  flexible-extract (the filters are read from the installed task file)."""
  from lm_eval.filters import get_filter
  with open(GSM8K_YAML, encoding="utf-8") as f:
    filters = {fl["name"]: fl["filter"] for fl in yaml.safe_load(f)["filter_list"]}

  def run(name):  # the task's filter pipeline (regex, then take_first) on one response
    resps = [[text]]
    for step in filters[name]:
      kw = {k: v for k, v in step.items() if k != "function"}
      resps = list(get_filter(step["function"])(**kw).apply(resps, [{}]))
    return resps[0]

  strict, flexible = run("strict-match"), run("flexible-extract")
  mine = extract_answer(text)
  want = strict if "####" in text else flexible
  if want == "[invalid]":
    assert mine is None
  else:
    assert mine == normalize_number(want)


def test_gsm8k_path_cuts_at_lm_eval_stop_strings():
  with open(GSM8K_YAML, encoding="utf-8") as f:
    until = yaml.safe_load(f)["generation_kwargs"]["until"]
  tok = ByteTokenizer()
  text = " 2 + 2 = 4\n#### 4\n\nQuestion: what is 9 + 1?\nAnswer: #### 10"
  for stop in until:
    got = decode_answer(tok, tok.encode(text.replace("Question:", stop)))
    assert got == " 2 + 2 = 4\n#### 4\n\n" and extract_answer(got) == "4"


def _accuracies(results: dict) -> dict:
  return {f"{task}/{k}": v for task, r in results.items() for k, v in r.items()
          if k.split(",")[0] in ("acc", "acc_norm", "exact_match") and "stderr" not in k}


def test_lm_eval_cli_runs_local_gsm8k(export_dir, tasks_dir, offline, tmp_path):
  """lm-eval's own CLI with the registered model on lm-eval's gsm8k config (generate_until and
  its two answer filters); the multiple-choice task runs through `loopjax eval` below."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", **offline)
  env.pop("XLA_FLAGS", None)
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, "-m", "loopjax.cli.lm_eval", "--model", "loopjax",
       "--model_args", f"workdir={export_dir},loops=adaptive:0.5,time_grid=2,max_gen_toks=8",
       "--tasks", "loopjax_gsm8k", "--include_path", str(tasks_dir),
       "--batch_size", "4", "--output_path", str(out)],
      capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-4000:]
  (path,) = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs
             if f.startswith("results") and f.endswith(".json")]
  with open(path, encoding="utf-8") as f:
    res = json.load(f)["results"]
  accs = _accuracies(res)
  assert {"loopjax_gsm8k/exact_match,strict-match",
          "loopjax_gsm8k/exact_match,flexible-extract"} <= set(accs), accs
  assert all(0.0 <= v <= 1.0 for v in accs.values()), accs
  assert "keeps its last tokens" in proc.stderr  # the 1-shot prompt does not fit 56 positions


def test_loopjax_eval_writes_lm_eval_json(export_dir, tasks_dir, offline, capsys):
  from loopjax.cli import main
  assert main(["eval", "--workdir", export_dir, "--lm-eval", "loopjax_mc", "--include-path",
               str(tasks_dir / "absent")]) != 0
  assert "--include-path" in capsys.readouterr().err  # refused before any evaluation
  rc = main(["eval", "--workdir", export_dir, "--loops", "1,2", "--no-nelbo", "--no-tasks",
             "--lm-eval", "loopjax_mc", "--include-path", str(tasks_dir), "--batch-size", "2",
             "--time-points", "3", "--lm-eval-args", "limit=3"])
  assert rc == 0, capsys.readouterr().err[-3000:]
  with open(os.path.join(export_dir + ".outputs", "eval", "lm_eval.json"), encoding="utf-8") as f:
    got = json.load(f)
  assert got["tasks"] == "loopjax_mc" and [r["loops"] for r in got["rows"]] == ["1", "2"]
  for row in got["rows"]:
    accs = _accuracies(row["results"])
    assert accs and all(0.0 <= v <= 1.0 for v in accs.values())
    assert row["n-samples"]["loopjax_mc"]["effective"] == 3


def test_shipped_tasks_are_package_data_and_need_their_files(tmp_path):
  """The task files come from the installed package; a shipped task without its data file, or
  a data file no task reads, is refused before any evaluation."""
  from loopjax.evaluate import harness
  shipped = harness.shipped_task_files()
  assert {"loopjax_gsm8k_jsonl", "loopjax_mc_jsonl"} <= set(shipped)
  for name, text in shipped.items():
    assert yaml.safe_load(text)["task"] == name
  with pytest.raises(ValueError, match="--lm-eval-data gsm8k=FILE"):
    harness.check_lm_eval("loopjax_gsm8k_jsonl")
  with pytest.raises(ValueError, match="no task of --lm-eval"):
    harness.check_lm_eval("loopjax_gsm8k_jsonl", data={"gsm8k": "a", "mc": "b"})
  with pytest.raises(FileNotFoundError, match="absent.jsonl"):
    harness.parse_task_data([f"mc={tmp_path / 'absent.jsonl'}"])
  (tmp_path / "t.jsonl").write_text("{}\n")
  folder = harness.shipped_tasks(str(tmp_path / "tasks"), ["loopjax_gsm8k_jsonl"],
                                 harness.parse_task_data([f"gsm8k={tmp_path / 't.jsonl'}"]))
  task = yaml.safe_load((tmp_path / "tasks" / "loopjax_gsm8k_jsonl.yaml").read_text())
  assert os.listdir(folder) == ["loopjax_gsm8k_jsonl.yaml"]
  # Few-shot examples default to the scored file itself.
  assert task["dataset_kwargs"]["data_files"] == {"train": str(tmp_path / "t.jsonl"),
                                                  "test": str(tmp_path / "t.jsonl")}
  # Scored as lm-eval's own gsm8k task: prompt, stop strings, filters, metric.
  with open(GSM8K_YAML, encoding="utf-8") as f:
    theirs = yaml.safe_load(f)
  for key in ("doc_to_text", "doc_to_target", "generation_kwargs", "filter_list", "metric_list",
              "output_type", "num_fewshot"):
    assert task[key] == theirs[key], key


def test_shipped_gsm8k_task_runs_through_loopjax_eval(export_dir, tasks_dir, offline, tmp_path,
                                                      capsys):
  from loopjax.cli import main
  out = tmp_path / "out"
  rc = main(["eval", "--workdir", export_dir, "--loops", "1", "--no-nelbo", "--no-tasks",
             "--lm-eval", "loopjax_gsm8k_jsonl",
             "--lm-eval-data", f"gsm8k={tasks_dir / 'gsm.jsonl'}",
             "--lm-eval-args", "limit=2,num_fewshot=1,max_gen_toks=8", "--batch-size", "2",
             "--time-points", "2", "--out", str(out)])
  assert rc == 0, capsys.readouterr().err[-3000:]
  with open(out / "eval" / "lm_eval.json", encoding="utf-8") as f:
    (row,) = json.load(f)["rows"]
  accs = _accuracies(row["results"])
  assert {"loopjax_gsm8k_jsonl/exact_match,strict-match",
          "loopjax_gsm8k_jsonl/exact_match,flexible-extract"} <= set(accs), accs
  assert all(0.0 <= v <= 1.0 for v in accs.values())
  assert row["n-samples"]["loopjax_gsm8k_jsonl"]["effective"] == 2
  # The task file that ran, with the data path filled in, is kept beside the results.
  ran = yaml.safe_load((out / "eval" / "lm_eval_tasks" / "loopjax_gsm8k_jsonl.yaml").read_text())
  assert ran["dataset_kwargs"]["data_files"]["test"] == str(tasks_dir / "gsm.jsonl")
