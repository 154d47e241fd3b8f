"""Evaluation: GSM8K answer extraction, the NELBO at S against the model's own forward, and
`loopjax eval` / `loopjax sample` end to end on a short-trained default (Sudoku) run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopjax.data.tokenizers import ByteTokenizer
from loopjax.evaluate.gsm8k import (build_rows, decode_answer, extract_answer, gsm8k_accuracy,
                                    normalize_number, read_gsm8k)
from loopjax.loops import resolve_policy


def random_params(model, length, scale=0.2, seed=0):
  """Random weights of the model's shapes without compiling `init` (as in test_samplers.py)."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, length), jnp.int32),
                          1)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype), shapes)


def _main(capsys, *args):
  """`loopjax ARGS` in this process (through the CLI's command table); returns stdout."""
  from loopjax.cli import main
  capsys.readouterr()
  rc = main(list(args))
  out = capsys.readouterr()
  assert rc == 0, out.err[-3000:]
  return out.out


# ------------------------------------------------------------------ GSM8K format


@pytest.mark.parametrize("text,want", [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7"), ("... #### 1,234", "1234"),
    ("#### -5", "-5"), ("#### $18.50", "18.5"), ("#### 72.0", "72"),
    ("no marker, the answer is 42.", "42"), ("12 then 13 and finally 14", "14"),
    ("#### none", None), ("nothing here", None)])
def test_extract_answer(text, want):
  assert extract_answer(text) == want


def test_normalize_and_read(tmp_path):
  assert normalize_number("1,000.50") == "1000.5" and normalize_number("abc") is None
  good = tmp_path / "g.jsonl"
  good.write_text('{"question": "1+1?", "answer": "1+1=2\\n#### 2"}\n\n'
                  '{"question": "2*3?", "answer": "#### 6"}\n')
  exs = read_gsm8k(str(good))
  assert [e["gold"] for e in exs] == ["2", "6"] and len(read_gsm8k(str(good), 1)) == 1
  bad = tmp_path / "b.jsonl"
  bad.write_text('{"question": "q", "answer": "no number"}\n')
  with pytest.raises(ValueError, match="####"):
    read_gsm8k(str(bad))


def test_build_rows_masks_only_the_answer_field():
  tok = ByteTokenizer()
  x, seg, start = build_rows(tok, ["hi", "a much longer question " * 3], seq_len=32,
                             answer_len=8, mask_id=257, template="Q: {question}\nA:")
  assert start[0] == len("Q: hi\nA:") and np.all(x[0, start[0]:start[0] + 8] == 257)
  assert np.all(seg[0, :start[0] + 8] == 1) and np.all(seg[0, start[0] + 8:] == 0)
  assert start[1] == 24 and tok.decode(x[1, :24].tolist()).endswith("question \nA:")
  assert (x == 257).sum() == 16
  assert decode_answer(tok, tok.encode("12") + [256] + tok.encode("99")) == "12"


def test_gsm8k_accuracy_runs_on_a_byte_model(tmp_path):
  from loopjax.model import LoopedTransformer, ModelConfig
  cfg = ModelConfig(kernels="reference",
                    vocab_size=257, max_length=24, width=32, num_layers=3, num_heads=2,
                    cond_dim=16, loop_start=1, loop_end=2, max_loops=2)
  model = LoopedTransformer(cfg)
  params = random_params(model, 24)
  exs = [{"question": "1+1", "gold": "2"}, {"question": "2+2", "gold": "4"},
         {"question": "3+3", "gold": "6"}]
  out = gsm8k_accuracy(model, params, ByteTokenizer(), exs, seq_len=24,
                       loops=resolve_policy(cfg, "adaptive:0.5"),
                       answer_len=4, steps=4, batch_size=2, template="{question}=")
  assert out["examples"] == 3 and len(out["samples"]) == 3
  # The score is the one of the generations it shows (all 3 are shown).
  assert out["exact_match"] == np.mean([s["pred"] == s["gold"] for s in out["samples"]])
  assert 1.0 <= out["loops_mean"] <= 2.0 and out["nfe"] >= 1


def _filling_sampler(fill_fn):
  """A stand-in for `make_sampler`: fills every [MASK] of x_BxL with fill_fn(params, x_BxL)."""
  @jax.jit
  def fn(params, rng, x_BxL, segment_ids, loop_arr):
    del rng, segment_ids, loop_arr
    return {"tokens": fill_fn(params, x_BxL), "nfe": jnp.int32(1),
            "loops_TxB": jnp.ones((1, x_BxL.shape[0]), jnp.int32)}
  return fn


def test_gsm8k_accuracy_of_a_constant_answer(monkeypatch):
  """A sampler that always answers "4" (then EOS) scores the fraction of golds equal to 4; the
  row that pads 5 questions to batches of 2 is not counted."""
  import loopjax.evaluate.gsm8k as gsm8k_lib
  from loopjax.model import LoopedTransformer, ModelConfig
  tok = ByteTokenizer()
  cfg = ModelConfig(kernels="reference",
                    vocab_size=257, max_length=16, width=32, num_layers=1, num_heads=2,
                    cond_dim=16)
  answer = np.full(4, tok.eos_id, np.int32)
  answer[:2] = tok.encode("4 ")

  def fill(params, x):  # the answer field is the run of masks after the prompt
    pos = jnp.cumsum(x == cfg.mask_id, axis=1) - 1
    return jnp.where(x == cfg.mask_id, jnp.asarray(answer)[jnp.clip(pos, 0, 3)], x)

  monkeypatch.setattr(gsm8k_lib, "make_sampler", lambda *a, **k: _filling_sampler(fill))
  golds = ["4", "7", "4", "44", "40"]
  exs = [{"question": f"q{i}", "gold": g} for i, g in enumerate(golds)]
  out = gsm8k_lib.gsm8k_accuracy(LoopedTransformer(cfg), {}, tok, exs, seq_len=16,
                                 loops=resolve_policy(cfg, 1),
                                 answer_len=4, steps=4, batch_size=2, template="{question}=")
  assert out["examples"] == 5
  assert out["exact_match"] == pytest.approx(2 / 5)
  assert [s["pred"] for s in out["samples"]] == ["4"] * 5


def test_sudoku_task_accuracy_of_an_oracle_and_a_constant_predictor(monkeypatch):
  """Every blank filled from the solution scores 1.0; every blank filled with one digit d
  scores the share of blanks whose solution is d, and no board (d then fills more than the 9
  cells a valid board gives each digit)."""
  from loopjax.data import make_eval_batches
  from loopjax.data.pipeline import default_data_config
  from loopjax.evaluate.tasks import task_accuracy
  from loopjax.model import LoopedTransformer, ModelConfig
  cfg = ModelConfig(kernels="reference",
                    vocab_size=9, max_length=81, width=32, num_layers=1, num_heads=2,
                    cond_dim=16)
  model = LoopedTransformer(cfg)
  (batch,) = make_eval_batches(default_data_config(), batch_size=6, num_batches=1, seed=0)
  solution = jnp.asarray(batch["tokens"])
  oracle = _filling_sampler(lambda sol, x: jnp.where(x == cfg.mask_id, sol, x))
  from loopjax.evaluate import tasks
  use = lambda sampler: monkeypatch.setattr(tasks, "make_sampler", lambda *a, **k: sampler)
  use(oracle)
  acc = task_accuracy(model, solution, [batch], source="sudoku", loops=resolve_policy(cfg, 1))
  assert (acc["cell_accuracy"], acc["board_accuracy"], acc["exact_board_accuracy"]) == (1, 1, 1)
  assert acc["examples"] == 6 and acc["nfe"] == 1
  blanks = np.asarray(batch["loss_mask"], bool)
  assert blanks.sum(1).min() > 9
  for d in (0, 4):
    const = _filling_sampler(lambda _, x, d=d: jnp.where(x == cfg.mask_id, d, x))
    use(const)
    acc = task_accuracy(model, {}, [batch], source="sudoku", loops=resolve_policy(cfg, 1))
    assert acc["cell_accuracy"] == pytest.approx(np.mean(batch["tokens"][blanks] == d))
    assert acc["board_accuracy"] == 0.0 and acc["exact_board_accuracy"] == 0.0


def test_evaluations_take_a_resolved_policy_not_a_spec():
  """A `--loops` value becomes a LoopPolicy once, where it is received (`Loaded.policy`); an
  evaluation or the sampling driver given the raw value says where to resolve it."""
  from loopjax.diffusion import Schedule
  from loopjax.evaluate.likelihood import heldout_nelbo
  from loopjax.evaluate.tasks import task_accuracy
  from loopjax.inference.generate import generate
  from loopjax.model import LoopedTransformer, ModelConfig
  model = LoopedTransformer(ModelConfig(kernels="reference", vocab_size=9, max_length=81,
                                        width=32, num_layers=1, num_heads=2, cond_dim=16))
  x = np.zeros((1, 81), np.int32)
  for call in (lambda: heldout_nelbo(model, {}, [], schedule=Schedule("linear"), loops=2),
               lambda: task_accuracy(model, {}, [], source="sudoku", loops="max"),
               lambda: gsm8k_accuracy(model, {}, ByteTokenizer(), [], seq_len=81, loops=1),
               lambda: generate(model, {}, None, None, x, loops="adaptive:0.1", steps=1)):
    with pytest.raises(TypeError, match=r"loaded\.policy\(spec\)"):
      call()


# ------------------------------------------------------------------ likelihood


def test_heldout_nelbo_matches_the_model_forward():
  """The inference loop driver gives the NELBO of the model's own __call__ at S <= S_max."""
  from loopjax.data import make_eval_batches
  from loopjax.data.pipeline import default_data_config
  from loopjax.diffusion import Schedule, eval_time_grid, nelbo_on_grid
  from loopjax.evaluate.likelihood import heldout_nelbo
  from loopjax.model import LoopedTransformer, ModelConfig
  cfg = ModelConfig(kernels="reference",
                    vocab_size=9, max_length=81, width=32, num_layers=3, num_heads=2,
                    cond_dim=16, loop_start=1, loop_end=2, max_loops=3)
  model = LoopedTransformer(cfg)
  params = random_params(model, 81)
  batch = make_eval_batches(default_data_config(), batch_size=2, num_batches=1, seed=0)
  sched = Schedule("linear")
  got = heldout_nelbo(model, params, batch, schedule=sched, loops=resolve_policy(cfg, 2),
                      time_points=2)
  b = batch[0]
  ref = jax.jit(lambda p: nelbo_on_grid(
      lambda x, t: model.apply({"params": p}, x, 2, t), jax.random.PRNGKey(0),
      jnp.asarray(b["tokens"]), sched, 9, eval_time_grid(2, sched.eps),
      jnp.asarray(b["fixed"]), jnp.asarray(b["loss_mask"])))(params)
  want = float(ref["nelbo_sum"]) / float(ref["num_tokens"])
  assert got["nats_per_token"] == pytest.approx(want, rel=1e-4)
  assert got["tokens"] == int(b["loss_mask"].sum()) and got["loops"] == 2


# ------------------------------------------------------------------ the CLI end to end


@pytest.fixture(scope="module")
def trained(tiny_sudoku_copy):
  """A copy of the session's tiny Sudoku run (S ~ U{1..3}), which these tests write into."""
  return tiny_sudoku_copy


def test_eval_writes_json_and_plots(trained, tmp_path, capsys):
  corpus = tmp_path / "digits.txt"
  corpus.write_text("123456789987654321\n\n" + "314159265358979" * 4 + "\n")
  stdout = _main(capsys, "eval", "--workdir", str(trained), "--loops", "1,3,5", "--loops",
              "adaptive:0.05:1:4", "--examples", "2", "--batch-size", "2", "--nelbo-batches",
              "1", "--time-points", "2", "--steps", "0,4", "--corpus", str(corpus))
  ev = trained / "eval"
  for name in ("likelihood.json", "tasks.json", "zero_shot.json", "summary.json"):
    assert (ev / name).exists(), (name, stdout)
  like = json.loads((ev / "likelihood.json").read_text())["rows"]
  assert [r["loops"] for r in like] == [1, 3, 5, "adaptive:0.05:1:4"]
  assert all(np.isfinite(r["bits_per_token"]) and r["ppl_bound"] > 1 for r in like)
  tasks = json.loads((ev / "tasks.json").read_text())["rows"]
  assert len(tasks) == 8 and {r["steps"] for r in tasks} >= {4}
  fixed = [r for r in tasks if r["steps"] == 4 and isinstance(r["loops"], int)]
  assert [r["loops_mean"] for r in fixed] == [1.0, 3.0, 5.0]  # S > S_max = 3 really runs
  flops = [r["flops_per_sample"] for r in fixed]
  assert flops[0] < flops[1] < flops[2], "inference FLOPs must follow the executed loops"
  for r in tasks:
    # An exactly recovered board is a valid one.
    assert r["exact_board_accuracy"] <= r["board_accuracy"]
    assert r["nfe"] <= r["steps"] and r["seconds"] > 0
  adaptive = [r for r in tasks if r["loops"] == "adaptive:0.05:1:4"]
  assert all(1 <= r["loops_mean"] <= 4 for r in adaptive)
  zs = json.loads((ev / "zero_shot.json").read_text())["rows"]
  assert len(zs) == 4 and all(r["tokens"] > 0 for r in zs)
  plots = json.loads((ev / "summary.json").read_text())["plots"]
  assert len(plots) >= 4
  for path in plots:
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", path


def test_sample_keeps_givens_and_fills_every_mask(trained, capsys):
  stdout = _main(capsys, "sample", "--workdir", str(trained), "--heldout", "--num", "2", "--loops",
              "adaptive:0.1", "--steps", "6", "--sampler", "confidence")
  report = json.loads(stdout.strip().splitlines()[-1])
  assert report["steps"] == 6 and 1 <= report["loops_mean"] <= 3
  assert report["given_kept"] and report["masks_left"] == 0
  saved = json.loads(open(report["file"]).read())
  assert all(len(s) == 81 and set(s) <= set("123456789") for s in saved["samples"])
  tmpl = "5" + "?" * 79 + "7"
  stdout = _main(capsys, "sample", "--workdir", str(trained), "--template", tmpl, "--num", "2",
              "--loops", "4", "--steps", "8")
  report = json.loads(stdout.strip().splitlines()[-1])
  for s in json.loads(open(report["file"]).read())["samples"]:
    assert len(s) == 81 and s[0] == "5" and s[-1] == "7" and set(s) <= set("123456789")
  assert report["loops_mean"] == 4.0 and report["given_kept"] and report["masks_left"] == 0


def test_sample_and_eval_accept_an_exported_folder(trained, tmp_path, capsys):
  out = tmp_path / "exported"
  _main(capsys, "export", "--workdir", str(trained), "--out", str(out))
  files = sorted(p.name for p in out.rglob("*"))
  stdout = _main(capsys, "sample", "--workdir", str(out), "--heldout", "--num", "2",
                 "--loops", "2", "--steps", "4", "--sampler", "confidence")
  report = json.loads(stdout.strip().splitlines()[-1])
  assert report["given_kept"] and report["masks_left"] == 0 and report["loops_mean"] == 2.0
  _main(capsys, "eval", "--workdir", str(out), "--loops", "max", "--examples", "2",
        "--batch-size", "2", "--nelbo-batches", "1", "--time-points", "2", "--steps", "4")
  # Outputs go beside the export folder (EXPORT.outputs), never into it.
  summary = json.loads((tmp_path / "exported.outputs" / "eval" / "summary.json").read_text())
  assert summary["params"] == "ema" and summary["tasks"][0]["loops"] == 3  # max = S_max
  assert report["file"].startswith(str(tmp_path / "exported.outputs" / "samples"))
  assert sorted(p.name for p in out.rglob("*")) == files


def test_eval_and_sample_parse_each_loops_value_once(trained, monkeypatch, capsys):
  # Counting spies on the one `--loops` parser, on the resolve step (`resolve_policy`, behind
  # `Loaded.policy`) and on the Sudoku tokenizer's constructor (what `DataSpec.tokenizer`
  # reads): every value is parsed and resolved once, when the command receives it, and the
  # resolved policy travels down to the model calls; each command reads its tokenizer once.
  from loopjax import loops
  from loopjax.data import sudoku
  from loopjax.loops import LoopPolicy
  from test_resolve import _spy
  parses, parse = [], LoopPolicy.parse.__func__
  monkeypatch.setattr(LoopPolicy, "parse", classmethod(
      lambda cls, spec, s_max=None: parses.append(str(spec)) or parse(cls, spec, s_max)))
  resolves = _spy(monkeypatch, loops, "resolve_policy")
  tokenizer_reads = _spy(monkeypatch, sudoku, "sudoku_tokenizer")
  _main(capsys, "eval", "--workdir", str(trained), "--loops", "1,max", "--loops",
        "adaptive:0.05:1:4", "--examples", "2", "--batch-size", "2", "--nelbo-batches", "1",
        "--time-points", "2", "--steps", "4", "--out", str(trained / "spy"))
  assert parses == ["1", "max", "adaptive:0.05:1:4"]
  assert [str(a[1]) for a in resolves] == ["1", "max", "adaptive:0.05:1:4"]
  assert len(tokenizer_reads) == 1, tokenizer_reads
  like = json.loads((trained / "spy" / "eval" / "likelihood.json").read_text())["rows"]
  assert [r["loops"] for r in like] == [1, 3, "adaptive:0.05:1:4"]
  parses.clear(), resolves.clear(), tokenizer_reads.clear()
  stdout = _main(capsys, "sample", "--workdir", str(trained), "--num", "2", "--loops", "5",
                 "--steps", "4", "--out", str(trained / "spy"))
  assert parses == ["5"] and [str(a[1]) for a in resolves] == ["5"]
  assert len(tokenizer_reads) == 1, tokenizer_reads
  assert json.loads(stdout.strip().splitlines()[-1])["loops_mean"] == 5.0  # S > S_max runs
