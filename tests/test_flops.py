"""FLOP accounting: analytic counts against what JAX/XLA compile, FLOP matching, params, CLI.

Two independent references for the analytic count:
* `jaxpr_dot_flops` sums every dot_general JAX emits: it must equal the analytic matmul count
  exactly for the forward pass (and 3x it, up to the tiny work JAX's AD skips, for a train step).
* XLA's `cost_analysis` counts all ops, elementwise ones too; on these width-64 configs norms,
  softmax, GELU and RoPE add about 3-5 % on top of the matmuls, so it must lie in [1, 1.05) x.
"""

import dataclasses
import json
import os
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopjax import flops as F
from loopjax.cli.flops import flops_main
from loopjax.loops import LoopDistribution
from loopjax.model import LoopedTransformer, ModelConfig, count_params
from loopjax.config.base import model_config
from loopjax.config.load import load_config

TINY = dict(vocab_size=64, max_length=32, width=64, num_layers=4, num_heads=4, cond_dim=32,
            scan_unroll=True)
PLAIN = ModelConfig(kernels="reference", **TINY)
LOOPED = ModelConfig(kernels="reference", **TINY, loop_start=1, loop_end=3, max_loops=3)
SWIGLU = ModelConfig(kernels="reference",
                     **{**TINY, "vocab_size": 300}, mlp_type="swiglu", time_conditioning=True)
PAPER = dict(vocab_size=50257, max_length=1024, width=768, num_layers=12, num_heads=12,
             cond_dim=128)


def _abstract(cfg, batch=2, length=32):
  """Model, abstract params and tokens: cost analysis needs shapes only, nothing is run."""
  model = LoopedTransformer(cfg)
  x = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  params = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, 1), x)["params"]
  return model, nn.unbox(params), x


def _forward(model, loops):
  return lambda p, x: model.apply({"params": p}, x, loops)


def _train(model, loops):
  loss = lambda p, x: jnp.mean(model.apply({"params": p}, x, loops) ** 2)
  return lambda p, x: jax.value_and_grad(loss)(p, x)


@pytest.mark.parametrize("cfg,loops", [(PLAIN, 1), (LOOPED, 3), (SWIGLU, 1)],
                         ids=["mdm", "looped_S3", "swiglu_v300"])
def test_forward_matches_jaxpr(cfg, loops):
  model, params, x = _abstract(cfg)
  want = 2 * F.forward_flops_per_seq(cfg, 32, loops)
  dots = F.jaxpr_dot_flops(_forward(model, loops), params, x)
  assert dots == pytest.approx(want, rel=1e-9), "analytic matmul count != dot_generals in the jaxpr"


@pytest.mark.xla_behaviour
@pytest.mark.parametrize("cfg,loops", [(PLAIN, 1), (LOOPED, 3), (SWIGLU, 1)],
                         ids=["mdm", "looped_S3", "swiglu_v300"])
def test_xla_cost_analysis_is_the_matmuls_plus_elementwise_work(cfg, loops):
  model, params, x = _abstract(cfg)
  want = 2 * F.forward_flops_per_seq(cfg, 32, loops)
  ratio = F.xla_flops(_forward(model, loops), params, x) / want
  assert 1.0 <= ratio < 1.05, f"XLA/analytic = {ratio:.4f} (elementwise ops should add 0-5 %)"


def test_train_step_is_three_forwards():
  cfg = dataclasses.replace(LOOPED, loop_remat="none")
  model, params, x = _abstract(cfg)
  fwd = 2 * F.forward_flops_per_seq(cfg, 32, 3)
  want = 2 * F.train_flops_per_step(cfg, 32, 1, 3)
  assert want == 3 * fwd
  # JAX's AD skips the time-MLP input gradient and hoists the loop-invariant adaLN projection
  # out of the loop: about 0.1 % less than 3x; anything else would show here.
  dots = F.jaxpr_dot_flops(_train(model, 3), params, x)
  assert dots == pytest.approx(want, rel=3e-3)


@pytest.mark.xla_behaviour
def test_xla_counts_a_train_step_as_three_forwards():
  cfg = dataclasses.replace(LOOPED, loop_remat="none")
  model, params, x = _abstract(cfg)
  want = 2 * F.train_flops_per_step(cfg, 32, 1, 3)
  # Within 5 % of the analytic count (the difference is elementwise work), and the elementwise
  # share the same as the forward's, so backward = 2 forwards in XLA's count too.
  xla_train = F.xla_flops(_train(model, 3), params, x)
  assert xla_train / want == pytest.approx(1.0, abs=0.05)
  xla_fwd = F.xla_flops(_forward(model, 3), params, x)
  assert xla_train / xla_fwd == pytest.approx(3.0, rel=0.01)


@pytest.mark.parametrize("remat,loop_remat", [("full", "full"), ("dots", "dots"),
                                               ("dots_no_batch", "dots_no_batch"),
                                               ("none", "full")])  # the last: the default
def test_remat_overhead_is_the_recomputed_matmuls(remat, loop_remat):
  cfg = ModelConfig(kernels="reference",
                    **{**TINY, "remat": remat}, loop_remat=loop_remat, loop_start=1, loop_end=3,
                    max_loops=3)
  model, params, x = _abstract(cfg)
  useful = 2 * F.train_flops_per_step(cfg, 32, 1, 3)
  extra = 2 * F.remat_overhead_flops_per_seq(cfg, 32, 3)
  assert (extra > 0) == (remat != "dots")
  if remat == "none":  # only the loop's 2 layers x S = 3 iterations, batch 2, are recomputed
    assert extra == 2 * 2 * 3 * F.layer_flops_per_seq(cfg, 32)
  dots = F.jaxpr_dot_flops(_train(model, 3), params, x)
  assert dots == pytest.approx(useful + extra, rel=3e-3)


@pytest.mark.xla_behaviour
def test_xla_needs_unrolled_scans_and_static_full_loops():
  """Why the cross-checks use scan_unroll=True and S == max_loops (a Python int)."""
  rolled = ModelConfig(kernels="reference", **{**TINY, "scan_unroll": False})
  model, params, x = _abstract(rolled)
  want = 2 * F.forward_flops_per_seq(rolled, 32, 1)
  # A rolled scan is a while loop; XLA counts its body once, not 4 times.
  assert F.xla_flops(_forward(model, 1), params, x) < 0.5 * want
  # S < max_loops keeps nn.cond in every iteration; XLA (like the jaxpr count) charges the
  # executed branch for all 3 iterations, so a static count is only right for S == max_loops.
  model, params, x = _abstract(LOOPED)
  s2 = F.xla_flops(_forward(model, 2), params, x)
  s3 = F.xla_flops(_forward(model, 3), params, x)
  assert s2 == pytest.approx(s3, rel=0.01)
  assert s2 > 1.2 * 2 * F.forward_flops_per_seq(LOOPED, 32, 2)


def test_flops_linear_in_loops_with_slope_of_the_block():
  cfg = ModelConfig(kernels="reference", **TINY, loop_start=1, loop_end=3, max_loops=12)
  slope = cfg.block_layers * F.layer_flops_per_seq(cfg, 32)
  f = [F.forward_flops_per_seq(cfg, 32, s) for s in range(1, 16)]
  assert all(b - a == slope for a, b in zip(f, f[1:]))
  assert F.forward_flops_per_seq(cfg, 32, 1) == F.forward_flops_per_seq(
      ModelConfig(kernels="reference", **{**TINY, "num_layers": 4}), 32, 1)
  # The slope as JAX sees it: compiled forwards at S = 1, 2, 3 (static, S == max_loops).
  counts = []
  for s in (1, 2, 3):
    c = ModelConfig(kernels="reference", **TINY, loop_start=1, loop_end=3, max_loops=s)
    model, params, x = _abstract(c, batch=1)
    counts.append(F.jaxpr_dot_flops(_forward(model, s), params, x))
  assert counts[1] - counts[0] == counts[2] - counts[1] == slope
  # Expectation over a distribution: honest sum == value at E[S] (linearity).
  for spec in ("uniform:1:12", "table:1,0,3,0,0,2", "fixed:5"):
    dist = LoopDistribution.parse(spec)
    got = F.expected_train_flops_per_step(cfg, 32, 8, spec)
    assert got == pytest.approx(F.train_flops_per_step(cfg, 32, 8, dist.expected), rel=1e-12)
  with pytest.raises(ValueError, match="max_loops"):
    F.expected_train_flops_per_step(cfg, 32, 8, "uniform:1:13")
  assert F.inference_flops_per_sample(cfg, 32, 24, 64) == 64 * F.forward_flops_per_seq(cfg, 32, 24)


def test_paper_flop_matching():
  """The paper's rule: F_loop = F_base + (E[S]-1) n_m F_layer; matched deeper MDM ~ 23 layers."""
  base = ModelConfig(kernels="reference", **PAPER)
  loop = ModelConfig(kernels="reference", **PAPER, loop_start=1, loop_end=3, max_loops=12)
  L, D, F_, C, V = 1024, 768, 3072, 128, 50257
  f_layer = 8 * L * D * D + 4 * L * L * D + 4 * L * D * F_ + 12 * C * D  # written out by hand
  f_base = 12 * f_layer + 2 * L * D * V + 2 * 256 * C + 2 * C * C + 4 * C * D
  f_loop = f_base + (6.5 - 1) * 2 * f_layer
  assert F.layer_flops_per_seq(loop, L) == f_layer
  assert 3 * 512 * f_loop == pytest.approx(
      F.expected_train_flops_per_step(loop, L, 512, "uniform:1:12"), rel=1e-12)
  steps = F.matched_steps(loop, "uniform:1:12", base, None, 1_000_000, L, 512, 512)
  assert steps == pytest.approx(1_000_000 * f_base / f_loop, rel=1e-12)
  # Golden: LoopMDM costs 1.668x the baseline per step -> ~599.5k steps for the 1M-step budget.
  # Only legitimate to update if the architecture (and so F_layer / head share) changes.
  assert f_loop / f_base == pytest.approx(1.6683, abs=2e-4)
  assert F.matched_steps(loop, "uniform:1:12", base, None, 1000, L, 256, 512) == pytest.approx(
      2 * F.matched_steps(loop, "uniform:1:12", base, None, 1000, L, 512, 512))
  depth, rounded = F.matched_depth(loop, "uniform:1:12", L)
  assert depth == pytest.approx(23.0) and rounded == 23
  assert F.matched_depth(base, None, L) == (pytest.approx(12.0), 12)
  # Same unique params as the 12-layer MDM (~170M with GPT-2 vocab).
  assert F.param_report(loop)["unique_params"] == F.param_report(base)["unique_params"]
  assert 165e6 < F.param_report(base)["unique_params"] < 175e6


def test_flop_conventions_by_hand():
  """The paper's rule under each F_base: layers only gives n / (n + (E[S]-1) n_m) exactly; 6ND
  counts N = all parameters (written out by hand) and N_layer per extra layer executed."""
  base = ModelConfig(kernels="reference", **PAPER)
  loop = ModelConfig(kernels="reference", **PAPER, loop_start=1, loop_end=3, max_loops=12)
  L, D, F_, C, V = 1024, 768, 3072, 128, 50257
  steps = lambda conv: F.matched_steps(loop, "uniform:1:12", base, None, 1_000_000, L, 512,
                                       convention=conv)
  assert steps("all_forward") == F.matched_steps(loop, "uniform:1:12", base, None, 1_000_000, L,
                                                 512)
  assert steps("layers_only") == pytest.approx(1_000_000 * 12 / 23, rel=1e-12)
  n_layer = 4 * D * D + 2 * D * F_ + F_ + D + 6 * C * D + 6 * D + 2 * D
  f_layer = 8 * L * D * D + 4 * L * L * D + 4 * L * D * F_ + 12 * C * D
  n = (V + 1) * D + (256 * C + C + C * C + C) + 12 * n_layer + (2 * C * D + 2 * D) + D + D * V + V
  assert steps("6nd") == pytest.approx(1_000_000 * n / (n + 5.5 * 2 * n_layer), rel=1e-12)
  assert F.train_flops_per_step_as(base, L, 512, None, "6nd") == 6 * n * 512 * L
  # The three counts the paper's unstated F_base leaves open at the 1M-step budget, for
  # experiments/owt.py's vocabulary (GPT-2's 50257 tokens + EOS separator), unpadded and padded to
  # 128 as experiments/ trains it: the padded head columns are computed, so counted, and the
  # padded tables are parameters. Each against the same formulas written out here (float64).
  V = 50258
  for multiple in (1, 128):
    v_out = -(-V // multiple) * multiple  # head columns
    v_in = -(-(V + 1) // multiple) * multiple  # embedding rows: the tokens and [MASK]
    f_base = 12 * f_layer + 2 * L * D * v_out + 2 * 256 * C + 2 * C * C + 4 * C * D
    n = (v_in * D + (256 * C + C + C * C + C) + 12 * n_layer + (2 * C * D + 2 * D) + D
         + D * v_out + v_out)
    want = np.array([f_base / (f_base + 5.5 * 2 * f_layer), 12 / 23,
                     n / (n + 5.5 * 2 * n_layer)], np.float64) * 1_000_000
    cfg = {**PAPER, "vocab_size": V, "vocab_multiple": multiple}
    got = [F.matched_steps(ModelConfig(kernels="reference", **cfg, loop_start=1, loop_end=3,
                                       max_loops=12),
                           "uniform:1:12", ModelConfig(kernels="reference", **cfg), None,
                           1_000_000, L, 512, convention=c) for c in F.FLOP_CONVENTIONS]
    assert list(F.FLOP_CONVENTIONS) == ["all_forward", "layers_only", "6nd"]
    np.testing.assert_allclose(got, want, rtol=1e-12)
  assert round(got[0]) == 599_500  # the steps experiments/owt.py's loopmdm trains
  with pytest.raises(ValueError, match="FLOP convention"):
    steps("kaplan")


@pytest.mark.parametrize("kw", [
    {}, dict(loop_start=1, loop_end=3, max_loops=4, loop_embedding=True),
    dict(mlp_type="swiglu", mlp_ratio=2.5, time_conditioning=True, vocab_size=300)],
    ids=["mdm", "looped_loop_emb", "swiglu"])
def test_param_report_equals_count_params(kw):
  cfg = ModelConfig(kernels="reference", **{**TINY, **kw})
  report = F.param_report(cfg)
  assert report["unique_params"] == count_params(_abstract(cfg)[1])
  s = cfg.max_loops
  plain = ModelConfig(kernels="reference",
                      **{**TINY, **kw, "num_layers": cfg.executed_depth(s), "loop_start": 0,
                         "loop_end": 0, "max_loops": 1, "loop_embedding": False})
  assert report["executed_depth_params"][s] == count_params(_abstract(plain)[1])


CONFIG_FILE = textwrap.dedent("""
    from loopjax.config.base import base_config

    def get_config(arg="loop"):
      c = base_config()
      c.model.update(vocab_size=64, max_length=32, width=64, num_layers=4, num_heads=4,
                     cond_dim=32)
      if arg == "loop":
        c.model.update(loop_start=1, loop_end=3)
        c.loops.train = "uniform:1:6"
      c.data.source, c.data.seq_len = "arithmetic", 32  # a valid run: flops resolves it whole
      c.train.batch_size, c.train.steps = 8, 1000
      return c
""")


def test_cli_json_and_table(tmp_path, capsys):
  path = tmp_path / "tiny.py"
  path.write_text(CONFIG_FILE)
  assert flops_main(["--config", f"{path}:loop", "--match", f"{path}:base", "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  loop = ModelConfig(kernels="reference",
                     **{**TINY, "scan_unroll": False}, loop_start=1, loop_end=3, max_loops=6)
  base = ModelConfig(kernels="reference", **{**TINY, "scan_unroll": False})
  assert out["params"] == F.param_report(loop)["unique_params"]
  assert out["expected_loops"] == pytest.approx(3.5)
  assert out["flops_per_step"] == pytest.approx(F.expected_train_flops_per_step(
      loop, 32, 8, "uniform:1:6"))
  assert out["executed_depth_max"] == 14 and out["executed_depth_expected"] == pytest.approx(9.0)
  assert out["matched_depth_rounded"] == 9
  want = F.matched_steps(loop, "uniform:1:6", base, None, 1000, 32, 8, 8)
  assert out["match"]["steps_to_match"] == pytest.approx(want)
  assert out["match"]["steps_to_match_rounded"] == round(want) < 1000
  assert out["matched_steps"] == pytest.approx(want) and out["flop_convention"] == "all_forward"
  assert out["matched_steps_layers_only"] == pytest.approx(1000 * 4 / 9)  # n / E[depth]
  assert out["matched_steps_6nd"] == pytest.approx(F.matched_steps(
      loop, "uniform:1:6", base, None, 1000, 32, 8, convention="6nd"))
  assert flops_main(["--config", f"{path}:loop", "--match", f"{path}:base"]) == 0
  table = capsys.readouterr().out
  assert "steps A needs" in table and "parameters (unique)" in table
  assert "F_base layers only" in table and "F_base 6ND" in table
  with pytest.raises(FileNotFoundError, match="path.py"):
    flops_main(["--config", str(tmp_path / "missing.py")])


def test_cli_takes_train_overrides_and_reports_trains_steps(capsys):
  """`flops` loads A as `train` does: overrides first, then the variant's FLOP-matched steps."""
  spec = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "experiments", "owt.py") + ":loopmdm"
  override = "--config.model.num_layers=24"
  assert flops_main(["--config", spec, override, "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  want = load_config(spec, [override]).train.steps
  assert out["steps"] == want != load_config(spec).train.steps
  assert out["overrides"] == [override]
  assert flops_main(["--config", spec, "--config.model.num_layers", "24", "--json"]) == 0
  assert json.loads(capsys.readouterr().out)["steps"] == want
  # B is loaded as its file defines it: A's overrides do not reach it.
  assert flops_main(["--config", spec, override, "--match", spec.replace("loopmdm", "mdm"),
                     "--json"]) == 0
  assert json.loads(capsys.readouterr().out)["match"]["steps"] == 1_000_000
  with pytest.raises(ValueError, match="stepz"):
    flops_main(["--config", spec, "--config.train.stepz=1"])


def test_peak_flops_from_the_chips_units():
  """Table entries against the chips' arithmetic: units x multiply-adds per cycle x 2 x clock
  (published unit counts and clocks; the vendors round their figures)."""
  mxu = 128 * 128  # multiply-adds per cycle of one TPU matrix unit
  chips = {  # device_kind: (dtype, units, multiply-adds per unit and cycle, clock in Hz)
      "TPU v4": ("bfloat16", 2 * 4, mxu, 1.05e9),  # 2 TensorCores x 4 MXUs
      "TPU v5 lite": ("bfloat16", 4, mxu, 1.5e9),  # v5e: 1 TensorCore x 4 MXUs
      "TPU v5": ("bfloat16", 2 * 4, mxu, 1.75e9),  # v5p reports "TPU v5"
      "NVIDIA A100-SXM4-80GB": ("float32", 108, 64, 1.41e9),  # SMs x FP32 lanes (no TF32)
      "NVIDIA A100-SXM4-40GB": ("bfloat16", 108 * 4, 256, 1.41e9),  # tensor cores, dense
  }
  for kind, (dtype, units, macs, clock) in chips.items():
    assert F.peak_flops_per_device(kind, dtype) == pytest.approx(units * macs * 2 * clock,
                                                                 rel=0.01), kind


def test_peak_flops_lookup_picks_the_most_specific_entry():
  peak = F.peak_flops_per_device
  # Shared prefixes resolve to their own chip, in any case.
  assert peak("TPU v5 lite") == peak("tpu v5e") < peak("TPU v5") == peak("TPU v5p")
  assert peak("NVIDIA H100 PCIe") < peak("NVIDIA H100 80GB HBM3")
  assert peak("TPU v6 lite") == peak("TPU v6e") > peak("TPU v5")
  # A float32 request gets the float32 figure on GPUs; on TPUs f32 dots run as bf16 passes.
  for kind in ("NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3", "NVIDIA H200"):
    assert peak(kind, "float32") < peak(kind) / 10
  assert peak("TPU v4", "float32") == peak("TPU v4")
  assert peak("Some NPU") is None and peak("Some NPU", "float32") is None


def test_cpu_peak_measurement():
  if jax.devices()[0].platform == "cpu":
    peak = F.peak_flops_per_device()
    assert 1e8 < peak < 1e14 and F.peak_flops_per_device() == peak  # measured once, cached


def test_match_takes_its_own_overrides_or_those_of_a(capsys):
  """`--match B --match-config.KEY=VALUE` resizes B; `--same-overrides` gives B A's overrides;
  either way the matched steps are the paper rule's for the two resized models (and equal the
  steps `train` derives for the resized loopmdm)."""
  spec = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "experiments", "owt.py")
  a_over = ["--config.data.seq_len=128", "--config.model.max_length=128"]
  b_over = [o.replace("--config.", "--match-config.") for o in a_over]
  with pytest.raises(ValueError, match="--match-config.data.seq_len=128"):
    flops_main(["--config", f"{spec}:loopmdm", *a_over, "--match", f"{spec}:mdm"])
  capsys.readouterr()
  assert flops_main(["--config", f"{spec}:loopmdm", *a_over, "--match", f"{spec}:mdm",
                     *b_over]) == 0
  table = capsys.readouterr().out
  a, b = load_config(f"{spec}:loopmdm", a_over), load_config(f"{spec}:mdm", a_over)
  want = F.matched_steps(model_config(a), a.loops.train, model_config(b), b.loops.train,
                         b.train.steps, 128, a.train.batch_size, b.train.batch_size)
  assert f"matched steps, F_base all forward FLOPs  {want:,.1f}" in table
  assert round(want) == a.train.steps
  assert "match: config" in table and "--config.data.seq_len=128" in table.split("match: config")[1]
  assert flops_main(["--config", f"{spec}:loopmdm", *a_over, "--match", f"{spec}:mdm",
                     "--same-overrides", "--json"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["match"]["overrides"] == a_over
  assert out["match"]["steps_to_match"] == pytest.approx(want)
  with pytest.raises(SystemExit):
    flops_main(["--config", f"{spec}:loopmdm", *b_over])  # B's overrides without B
