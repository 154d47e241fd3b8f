"""The text study: its FLOP multiplier, MDLM's EMA warm-up, a held-out set no training seed
touches, and the tiny preset end to end with its cache."""

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.study import measure, run
from experiments.study import corpus as study_corpus
from experiments.study import runner, scoring
from loopjax.cli import main
from loopjax.data.tokenizers import make_tokenizer
from loopjax.diffusion import make_schedule
from loopjax.loops import LoopDistribution
from loopjax.model import LoopedTransformer, ModelConfig
from loopjax.config.base import base_config
from loopjax.train.state import TrainState, make_optimizer
from loopjax.train.step import make_train_step

# An MDM curve exactly linear in ln(FLOPs): interpolation in ln(FLOPs) reads it exactly.
_F = [1e9 * 2 ** k for k in range(7)]
_MDM = [(f, 6.0 - 0.3 * math.log(f / 1e9)) for f in _F]


def _mdm_at(f):
  return 6.0 - 0.3 * math.log(f / 1e9)


def test_model_against_itself_gives_one():
  for f, y in _MDM:
    m = measure.flop_multiplier(_MDM, f, y)
    assert m["bound"] == "=" and m["value"] == pytest.approx(1.0, rel=1e-12)
  assert measure.interpolate(_MDM, _F[3]) == pytest.approx(_MDM[3][1])


@pytest.mark.parametrize("factor", [0.5, 0.8, 1.7, 3.0])
def test_shifted_curve_gives_its_factor_both_ways(factor):
  # A model whose NELBO at budget b is the MDM's at factor * b: M = factor (< 1 when worse).
  for b in (2.5e9, 5e9, 1e10, 1.6e10):
    m = measure.flop_multiplier(_MDM, b, _mdm_at(factor * b))
    assert m["bound"] == "=" and m["value"] == pytest.approx(factor, rel=1e-9)


def test_censored_multipliers_are_bounds_not_clipped():
  # Better than the MDM's best point: M is at least F_last / b, reported as a lower bound.
  b = 4e9
  above = measure.flop_multiplier(_MDM, b, _MDM[-1][1] - 0.5)
  assert above == dict(value=pytest.approx(_F[-1] / b), bound=">")
  # Worse than the MDM's first point: M is at most F_first / b.
  below = measure.flop_multiplier(_MDM, b, _MDM[0][1] + 0.5)
  assert below == dict(value=pytest.approx(_F[0] / b), bound="<")
  stats = measure.multiplier_stats([above, below, dict(value=1.0, bound="=")])
  assert stats["censored"] == 2 and stats["bounds"] == [">", "<", "="]


def test_reference_curve_is_read_as_its_running_minimum_and_end_slope():
  bumpy = [(1e9, 6.0), (2e9, 5.0), (4e9, 5.2), (8e9, 4.0)]
  # 5.0 is first reached at 2e9; the bump after it reads as 5.0 (the best so far).
  f, rel = measure.flops_to_reach(bumpy, 5.0)
  assert rel == "=" and f == pytest.approx(2e9)
  f, _ = measure.flops_to_reach(bumpy, 4.5)  # between 4e9 (5.0 kept) and 8e9 (4.0), ln-linear
  assert f == pytest.approx(math.exp(math.log(4e9) + 0.5 * math.log(2.0)))
  assert measure.end_slope(_MDM) == pytest.approx(-0.3)


def test_ema_warmup_matches_mdlm_formula():
  cfg = ModelConfig(kernels="reference",
                    vocab_size=9, max_length=8, width=16, num_layers=2, num_heads=2, cond_dim=8)
  model = LoopedTransformer(cfg)
  t = base_config().train
  t.update(lr=1e-2, warmup_steps=0, steps=10)
  tx = make_optimizer(t)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 8), 0, 9)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), tokens, 1)["params"])
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                     opt_state=tx.init(params),
                     rng=jax.random.key_data(jax.random.PRNGKey(2)))
  batch = dict(tokens=tokens, fixed=jnp.zeros((4, 8), bool), loss_mask=jnp.ones((4, 8), bool),
               segment_ids=jnp.ones((4, 8), jnp.int32))
  decay = 0.9
  step = jax.jit(make_train_step(model, tx, make_schedule({"schedule": "linear"}),
                                 LoopDistribution.parse("fixed:1"), antithetic=True,
                                 ema_decay=decay, grad_accum=1, lr_fn=lambda s: 0.0,
                                 ema_warmup=True))
  flat = lambda tree: np.concatenate([np.ravel(np.asarray(x, np.float64))
                                      for x in jax.tree_util.tree_leaves(tree)])
  ref = flat(params)
  for n in range(1, 7):  # MDLM (models/ema.py): n counts updates from 1
    state, _ = step(state, batch)
    d = min(decay, (1 + n) / (10 + n))  # 2/11, 3/12, ..., then 0.9 from n = 80
    ref = d * ref + (1 - d) * flat(state.params)
    np.testing.assert_allclose(flat(state.ema_params), ref, rtol=1e-5, atol=1e-7)
  # Without warm-up the first update already keeps 90 % of the initial weights.
  assert float(decay) > (1 + 1) / (10 + 1)


def _write_fortunes(folder, n_files=2, entries=120, seed=0):
  rng = np.random.default_rng(seed)
  words = ("the cat sat on a mat and then it ran far away from home because dogs bark "
           "loudly at night while owls hoot").split()
  os.makedirs(folder, exist_ok=True)
  for f in range(n_files):
    with open(os.path.join(folder, f"cookies{f}"), "w") as fh:
      for _ in range(entries):
        fh.write(" ".join(rng.choice(words, rng.integers(4, 25))) + "\n%\n")
    with open(os.path.join(folder, f"cookies{f}.dat"), "wb") as fh:  # fortune's index: skipped
      fh.write(b"\x00\x01")


def test_heldout_set_is_fixed_by_content_and_batches_ignore_the_training_seed(tmp_path):
  _write_fortunes(tmp_path / "fort")
  split = study_corpus.write_split(str(tmp_path / "fort"), str(tmp_path / "a"))
  docs = study_corpus.fortune_documents(str(tmp_path / "fort"))
  assert split["documents"]["train"] + split["documents"]["heldout"] == len(docs) == 240
  assert 0 < split["documents"]["heldout"] < 60
  train = {json.loads(x)["text"] for x in open(split["paths"]["train"])}
  held = [json.loads(x)["text"] for x in open(split["paths"]["heldout"])]
  assert not train & set(held)
  # Reordering the corpus's files does not change which documents are held out.
  os.rename(tmp_path / "fort" / "cookies0", tmp_path / "fort" / "zz")
  again = study_corpus.write_split(str(tmp_path / "fort"), str(tmp_path / "b"))
  assert sorted(json.loads(x)["text"] for x in open(again["paths"]["heldout"])) == sorted(held)
  tok = make_tokenizer("byte")
  b1 = study_corpus.heldout_batches(split["paths"]["heldout"], tok, seq_len=32, rows=8,
                                    batch_size=4)
  assert len(b1) == 2 and b1[0]["tokens"].shape == (4, 32)
  # Two runs that differ only in train.seed are scored on the same rows and the same draws.
  p = runner.PRESETS["tiny"]
  configs = [runner.run_config(p, "loopmdm", lr=1e-3, seed=s, train_path=split["paths"]["train"],
                               extend=1) for s in (0, 7)]
  assert configs[0].train.seed != configs[1].train.seed
  assert configs[0].data == configs[1].data
  b2 = study_corpus.heldout_batches(split["paths"]["heldout"], tok, seq_len=32, rows=8,
                                    batch_size=4)
  for x, y in zip(b1, b2):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert isinstance(scoring.EVAL_SEED, int)


def test_missing_corpus_says_how_to_get_it(tmp_path, capsys):
  assert main(["study", "--workdir", str(tmp_path / "w"), "--preset", "tiny",
               "--corpus", str(tmp_path / "none")]) == 2
  assert "apt-get download fortunes" in capsys.readouterr().err
  with pytest.raises(FileNotFoundError, match="apt-get download fortunes"):
    run(str(tmp_path / "w"), preset="tiny", corpus=str(tmp_path / "none"))
  assert not (tmp_path / "w" / "runs").exists()  # nothing trained or compiled


def test_tiny_study_end_to_end_and_cached(tmp_path):
  _write_fortunes(tmp_path / "fort")
  w = str(tmp_path / "study")
  lines = []
  result = run(w, preset="tiny", corpus=str(tmp_path / "fort"), log=lines.append)
  saved = json.load(open(os.path.join(w, "study.json")))
  assert saved["metric"].startswith("held-out NELBO, bits per byte")
  assert saved["loop_block"] == [1, 3] and saved["s_max"] == 3
  models = saved["models"]
  assert set(models) == {"mdm", "loopmdm", "deep_mdm", "loopmdm_s4"}
  # FLOP matching: LoopMDM's budget is the MDM's, up to rounding its steps to 8 checkpoint
  # intervals (half an interval at most: 1/16 of the budget).
  assert models["loopmdm"]["budget_flops"] == pytest.approx(models["mdm"]["budget_flops"],
                                                             rel=1 / 16)
  assert models["deep_mdm"]["layers"] > models["mdm"]["layers"]
  mdm_last = [s["curve"][-1]["flops"] for s in models["mdm"]["seeds"]]
  for name in ("loopmdm", "deep_mdm", "loopmdm_s4"):
    for s in models[name]["seeds"]:
      assert len(s["flop_multiplier"]) == len(s["curve"]) == 4
      budgets = [q["flops"] for q in s["curve"]]
      assert budgets[-1] / budgets[0] == pytest.approx(8.0)
      assert max(budgets) < min(mdm_last)  # the MDM's curve reaches past every budget
      assert all(m["bound"] in ("=", "<", ">") and m["value"] > 0 for m in s["flop_multiplier"])
  for name, m in models.items():
    # The lr was chosen on a seed that is not reported.
    assert saved["lr_seed"] not in [s["seed"] for s in m["seeds"]]
    sweep = {x["lr"]: x["bits_per_byte"] for x in m["lr_sweep"]}
    assert sweep[m["best_lr"]] == min(sweep.values())
  lo = models["loopmdm"]["seeds"][0]
  assert [r["loops"] for r in lo["loop_sweep"]] == ["1", "3", "6", "adaptive:0.05"]
  assert all(r["executed_loops"] >= r["loops_per_sequence"] - 1e-9 for r in lo["loop_sweep"])
  assert [a["loops"] for a in lo["attention"]] == [1, 3, 6]
  assert {c["verdict"] for c in saved["summary"]["claims"]} <= {
      "reproduced", "not reproduced", "inconclusive"}
  assert {c["key"] for c in saved["summary"]["claims"]} == {
      "flops", "deep", "range", "s1", "loops", "extrapolate", "adaptive", "attention"}
  md = open(os.path.join(w, "study.md")).read()
  assert "## FLOP multiplier against training budget" in md and "flop_multiplier" not in md
  assert set(saved["summary"]["trend"]) == {"loopmdm", "deep_mdm", "loopmdm_s4"}
  assert "Trend of M with budget" in md
  for plot in ("study_multiplier_vs_budget.png", "study_bits_vs_flops.png"):
    assert os.path.getsize(os.path.join(w, "plots", plot)) > 0
  assert any("trained loopmdm" in x for x in lines)
  # A second run trains and scores nothing.
  runner.Counter.trained = scoring.Counter.computed = 0
  again = run(w, preset="tiny", corpus=str(tmp_path / "fort"), log=lambda _: None)
  assert runner.Counter.trained == 0 and scoring.Counter.computed == 0
  first = result["models"]["loopmdm"]["seeds"][1]["curve"]
  assert again["models"]["loopmdm"]["seeds"][1]["curve"] == first


def test_multiplier_trend_reads_the_growth_of_m_with_budget():
  # M = 0.5 at b = 1e9 growing as b^0.25; a censored point is left out.
  entries = [dict(budget=b, value=0.5 * (b / 1e9) ** 0.25, bound="=") for b in (1e9, 2e9, 8e9)]
  assert measure.trend(entries + [dict(budget=1.6e10, value=9.0, bound=">")]) == \
      pytest.approx(0.25)
  assert measure.trend(entries[:1]) is None
