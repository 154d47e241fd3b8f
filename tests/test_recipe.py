"""The paper configs resolve to MDLM's published recipe (github.com/kuleshov-group/mdlm), and the
recipe's model options do what they say: MDLM's initialisation, norm eps, dropout placement and
the warning when a truncated loop gradient leaves the embedding without gradient."""

import logging
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopjax.diffusion.samplers import sampler_endpoint
from loopjax.model import ModelConfig
from loopjax.model import config as model_config_module
from loopjax.model.kernels.masks import AttentionMask
from loopjax.model.layers import Block, Mlp, layer_norm
from loopjax.model.transformer import OutputLayer, TimeEmbedding, embedding_initializer
from loopjax.config.load import load_config

EXPERIMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "experiments")

# MDLM's values, each with the file of kuleshov-group/mdlm that sets it.
MDLM = {
    "model.width": 768,                 # configs/model/small.yaml: hidden_size
    "model.num_layers": 12,             # configs/model/small.yaml: n_blocks
    "model.num_heads": 12,              # configs/model/small.yaml: n_heads
    "model.cond_dim": 128,              # configs/model/small.yaml: cond_dim
    "model.dropout": 0.1,               # configs/model/small.yaml: dropout
    "model.mlp_ratio": 4.0,             # models/dit.py: DDiTBlock(mlp_ratio=4)
    "model.mlp_type": "gelu",           # models/dit.py: nn.GELU(approximate='tanh')
    # models/dit.py: DDiTBlock drops out only in bias_dropout_add_scale (attention and MLP
    # outputs), nothing after the GELU
    "model.mlp_hidden_dropout": False,
    "model.embed_init": "mdlm",         # models/dit.py: EmbeddingLayer kaiming_uniform_(a=sqrt(5))
    "model.dense_init": "torch",        # models/dit.py: nn.Linear layers left at torch's default
    "model.zero_init_head": True,       # models/dit.py: DDitFinalLayer linear weight/bias zero_()
    "model.norm_eps": 1e-5,             # models/dit.py: LayerNorm -> F.layer_norm (eps 1e-5)
    "model.time_conditioning": False,   # configs/config.yaml: time_conditioning
    "model.max_length": 1024,           # configs/config.yaml / small.yaml: model.length
    "data.seq_len": 1024,               # configs/model/small.yaml: length
    "train.batch_size": 512,            # configs/config.yaml: loader.global_batch_size
    "train.lr": 3e-4,                   # configs/config.yaml: optim.lr
    "train.b1": 0.9,                    # configs/config.yaml: optim.beta1
    "train.b2": 0.999,                  # configs/config.yaml: optim.beta2
    "train.adam_eps": 1e-8,             # configs/config.yaml: optim.eps
    "train.weight_decay": 0.0,          # configs/config.yaml: optim.weight_decay
    "train.warmup_steps": 2500,         # configs/lr_scheduler/constant_warmup.yaml
    "train.lr_schedule": "constant",    # configs/lr_scheduler/constant_warmup.yaml (constant after)
    "train.clip_norm": 1.0,             # configs/config.yaml: trainer.gradient_clip_val
    "train.ema_decay": 0.9999,          # configs/config.yaml: training.ema
    "train.ema_warmup": True,           # models/ema.py: min(decay, (1 + n) / (10 + n))
    "diffusion.schedule": "linear",     # configs/noise/loglinear.yaml: 1 - alpha_t = t (loglinear)
    "diffusion.eps": 1e-3,              # configs/config.yaml: training.sampling_eps
    "diffusion.antithetic": True,       # configs/config.yaml: training.antithetic_sampling
    "diffusion.final_step": "argmax",   # configs/config.yaml: sampling.noise_removal
    "diffusion.sample_eps": 1e-5,       # diffusion.py: _sample(eps=1e-5)
    "variant.baseline_steps": 1_000_000,  # configs/config.yaml: trainer.max_steps
}
# bf16 compute as MDLM's configs/config.yaml trainer.precision; not a recipe value, but a check
# that the paper backbone stays the one measured.
OWN = {"model.dtype": "bfloat16", "variant.flop_convention": "all_forward",
       "model.vocab_multiple": 128}


def _get(c, key):
  section, name = key.split(".")
  return c[section][name]


def _mismatches(c, table):
  return {k: (_get(c, k), v) for k, v in table.items() if _get(c, k) != v}


def test_owt_mdm_is_mdlm_recipe():
  c = load_config(os.path.join(EXPERIMENTS, "owt.py") + ":mdm")
  assert _mismatches(c, {**MDLM, **OWN}) == {}
  assert c.train.steps == 1_000_000 and c.model.loop_start == c.model.loop_end
  assert sampler_endpoint(c.diffusion) == {"final_step": "argmax", "eps": 1e-5}


@pytest.mark.parametrize("spec", ["owt.py:loopmdm", "fineweb_edu.py:loopmdm", "fineweb_edu.py:mdm",
                                  "lm1b.py:loopmdm"])
def test_paper_variants_inherit_the_recipe(spec):
  c = load_config(os.path.join(EXPERIMENTS, spec))
  table = dict(MDLM)
  if spec.startswith("lm1b"):  # LM1B: length 128 (MDLM's lm1b runs use model.length=128)
    table.update({"model.max_length": 128, "data.seq_len": 128})
  assert _mismatches(c, table) == {}
  if spec.endswith("loopmdm"):
    assert c.model.loop_end > c.model.loop_start and c.train.steps < 1_000_000


def test_builtin_tasks_keep_their_short_run_recipe():
  """The small built-in tasks keep the legacy defaults (and the sampler that ends at t = 0)."""
  c = load_config(os.path.join(EXPERIMENTS, "sudoku.py") + ":mdm")
  assert (c.train.b2, c.model.embed_init, c.model.zero_init_head) == (0.98, "normal", False)
  assert sampler_endpoint(c.diffusion) == {"final_step": "sample", "eps": 1e-3}


TINY = dict(vocab_size=40, max_length=8, width=48, num_layers=2, num_heads=4, cond_dim=16)
MDLM_INIT = dict(embed_init="mdlm", dense_init="torch", zero_init_head=True, norm_eps=1e-5)


def _flat(variables):
  return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(
      flax.core.meta.unbox(variables["params"]), sep="/").items()}


def test_mdlm_initialisation():
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's default) for the linears and the embedding
  (fan_in = D for the V x D table), zeros for the output projection and every adaLN."""
  cfg = ModelConfig(kernels="reference", **TINY, **MDLM_INIT)
  d, f, c, key = cfg.width, cfg.mlp_dim, cfg.cond_dim, jax.random.PRNGKey(0)
  x, c_BxC = jnp.ones((1, 8, d)), jnp.ones((1, c))
  modules = {"block": (Block(cfg), (x, c_BxC, AttentionMask.from_segment_ids(None, 1, 8))),
             "time": (TimeEmbedding(c, init_kind=cfg.dense_init), (jnp.ones(1),)),
             "output": (OutputLayer(cfg), (x, c_BxC))}
  init = jax.jit(lambda key: {name: m.init(key, *args) for name, (m, args) in modules.items()})
  flat = {f"{name}/{k}": v for name, variables in init(key).items()
          for k, v in _flat(variables).items()}
  flat["embed"] = embedding_initializer(cfg.embed_init)(key, (cfg.vocab_size + 1, d))
  bound = {"embed": d, "attn/query/kernel": d, "attn/out/kernel": d, "mlp/wi/kernel": d,
           "mlp/wi/bias": d, "mlp/wo/kernel": f, "mlp/wo/bias": f, "time/fc1/kernel": 256,
           "time/fc1/bias": 256, "time/fc2/kernel": c}
  for name, fan_in in bound.items():
    (v,) = [v for k, v in flat.items() if k.endswith(name)]
    b = 1.0 / np.sqrt(fan_in)
    assert b >= np.abs(v).max() > 0.95 * b, name
    assert np.std(v) == pytest.approx(b / np.sqrt(3.0), rel=0.1), name  # uniform: bound/sqrt(3)
  zero = [k for k in flat if "adaln" in k or k.startswith("output/proj")]
  assert len(zero) == 6 and all(not np.any(flat[k]) for k in zero)
  legacy = ModelConfig(kernels="reference", **TINY)
  v = embedding_initializer(legacy.embed_init)(key, (legacy.vocab_size + 1, d))
  assert np.std(v) == pytest.approx(1.0, rel=0.1)


def test_norm_eps_reaches_the_layer_norm():
  """On a row whose variance (2e-6) is comparable to eps, 1e-5 and 1e-6 give different norms."""
  x = jnp.asarray([[[1e-3, -1e-3, 2e-3, 0.0]]])
  cfg = ModelConfig(kernels="reference", **TINY, **MDLM_INIT)
  got = layer_norm(jnp.float32, "n", cfg.norm_eps).apply({"params": {"scale": jnp.ones(4)}}, x)
  x64 = np.asarray(x, np.float64)
  want = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4)


def test_mlp_dropout_placement():
  """MDLM's placement (mlp_hidden_dropout False): dropout only on the MLP output, so each output
  is either dropped or the deterministic output scaled by 1/(1-p); dropout after the GELU too
  breaks that."""
  p = 0.5
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, TINY["width"]))
  only_output = {}
  for hidden in (False, True):
    mlp = Mlp(ModelConfig(kernels="reference", **TINY, dropout=p, mlp_hidden_dropout=hidden))
    params = mlp.init(jax.random.PRNGKey(1), x, train=False)
    det = np.asarray(mlp.apply(params, x, train=False))
    out = np.asarray(mlp.apply(params, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)}))
    kept = np.isclose(out, det / (1 - p), rtol=1e-5, atol=1e-7)
    only_output[hidden] = bool(np.all(kept | (out == 0))) and (out == 0).any()
  assert only_output == {False: True, True: False}


def test_grad_last_k_without_inject_warns_once(caplog):
  model_config_module._WARNED.clear()
  kw = dict(TINY, loop_start=1, loop_end=2, max_loops=4, grad_last_k=2)
  with caplog.at_level(logging.WARNING, logger="loopjax.model.config"):
    ModelConfig.from_dict(kw)
    ModelConfig.from_dict(kw)
    ModelConfig.from_dict({**kw, "loop_inject": True})
    ModelConfig.from_dict({**kw, "grad_last_k": 4})  # k = S_max: never cut
  # (that the gradient is then exactly zero: tests/test_model.py, grad_last_k test)
  warned = [r for r in caplog.records if "grad_last_k" in r.getMessage()]
  assert len(warned) == 1 and "zero gradient" in warned[0].getMessage()
