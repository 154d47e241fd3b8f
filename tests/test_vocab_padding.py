"""A vocabulary padded to `model.vocab_multiple`: the padded head columns carry no probability
(never sampled, never the argmax, nothing in the NELBO), the real logits are those of the same
weights unpadded, FLOPs count the padded matmul, the vocabulary shards over a mesh axis that
divides the padded size, and the export (NumPy reference, transformers) gives the real
vocabulary's logits."""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh

from test_export import TINY, _random_params
from loopjax import flops, reference
from loopjax.io import export
from loopjax.diffusion import diffusion_loss, make_schedule, mask_tokens
from loopjax.diffusion.samplers import sample_categorical
from loopjax.model import LoopedTransformer, ModelConfig, count_params
from loopjax.model.config import MASKED_LOGIT
from loopjax.parallel import mesh as mesh_lib

V = TINY["vocab_size"]  # 9 (+ [MASK] = 9)
PADDED = ModelConfig(kernels="reference",
                     **TINY, loop_start=1, loop_end=2, max_loops=3, vocab_multiple=8)
PLAIN = dataclasses.replace(PADDED, vocab_multiple=1)
TOKENS = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, V)


def _unpadded(params):
  """The same weights without the padded embedding rows and head columns."""
  p = jax.tree_util.tree_map(lambda x: x, params)
  p["embed"] = {"embedding": params["embed"]["embedding"][:V + 1]}
  proj = params["output"]["proj"]
  p["output"] = dict(params["output"], proj={"kernel": proj["kernel"][:, :V],
                                             "bias": proj["bias"][:V]})
  return p


@pytest.fixture(scope="module")
def padded():
  params = _random_params(PADDED, seed=2)
  noisy, _ = mask_tokens(jax.random.PRNGKey(3), TOKENS, jnp.full((2,), 0.5), PADDED.mask_id)
  return params, noisy, _logits(PADDED, params, noisy)


def _logits(cfg, params, tokens):
  return jax.jit(lambda p, x: LoopedTransformer(cfg).apply({"params": p}, x, 2))(params, tokens)


def test_tables_are_padded_and_the_padded_logits_are_masked(padded):
  params, noisy, logits = padded
  assert (PADDED.padded_vocab, PADDED.input_vocab, PADDED.mask_id) == (16, 16, V)
  assert params["embed"]["embedding"].shape == (16, TINY["width"])
  assert params["output"]["proj"]["kernel"].shape == (TINY["width"], 16)
  assert logits.shape == (2, 8, 16)
  assert (np.asarray(logits[..., V:]) == MASKED_LOGIT).all()
  assert (np.asarray(jax.nn.softmax(logits, -1)[..., V:]) == 0).all()  # exactly no mass
  want = _logits(PLAIN, _unpadded(params), noisy)
  np.testing.assert_allclose(logits[..., :V], want, rtol=1e-5, atol=1e-6)


def test_nelbo_and_gradient_equal_the_unpadded_model(padded):
  params, noisy, _ = padded
  masked = noisy == PADDED.mask_id
  t = jnp.array([0.4, 0.7])
  schedule = make_schedule({"schedule": "linear"})

  def loss(cfg, p):
    logits = LoopedTransformer(cfg).apply({"params": p}, noisy, 2)
    return diffusion_loss(logits, TOKENS, masked, t, schedule)["loss"]

  got, grad = jax.jit(jax.value_and_grad(lambda p: loss(PADDED, p)))(params)
  want = jax.jit(lambda p: loss(PLAIN, p))(_unpadded(params))
  assert np.isfinite(float(got)) and float(got) > 0
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grad))
  # Padded head columns never influence the loss: no gradient reaches them.
  assert (np.asarray(grad["output"]["proj"]["kernel"][:, V:]) == 0).all()
  assert (np.asarray(grad["output"]["proj"]["bias"][V:]) == 0).all()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (3.0, 0, 1.0),
                                                     (0.5, 0, 0.9), (1.0, 12, 1.0)])
def test_sampling_never_returns_a_padded_id(temperature, top_k, top_p):
  # Flat real logits (every real id as likely as possible): the padded ids' best chance.
  logits = jnp.where(jnp.arange(16) < V, 0.0, MASKED_LOGIT) * jnp.ones((64, 32, 16))
  ids = np.concatenate([np.asarray(sample_categorical(
      jax.random.PRNGKey(i), logits, temperature, top_k, top_p)[0]) for i in range(8)])
  assert ids.max() < V and len(np.unique(ids)) == V  # every real id drawn, no padded one
  greedy, prob = sample_categorical(jax.random.PRNGKey(0), logits - jnp.arange(16.0), 0.0)
  assert (np.asarray(greedy) == 0).all() and np.isfinite(np.asarray(prob)).all()


def test_flops_and_parameter_counts_include_the_padding(padded):
  params = padded[0]
  assert flops.param_counts(PADDED)["total"] == count_params(params)
  assert flops.param_counts(PADDED)["total"] - flops.param_counts(PLAIN)["total"] == (
      (16 - (V + 1)) * TINY["width"] + (16 - V) * (TINY["width"] + 1))
  b, length = 4, 8
  extra = flops.train_flops_per_step(PADDED, length, b, 2) - flops.train_flops_per_step(
      PLAIN, length, b, 2)
  assert extra == flops.TRAIN_MULTIPLIER * b * 2 * length * TINY["width"] * (16 - V)


def test_padded_vocabulary_shards_over_the_tensor_axis():
  mesh = AbstractMesh((1, 1, 4), mesh_lib.MESH_AXES)

  def specs(cfg):
    boxed = jax.eval_shape(lambda: LoopedTransformer(cfg).init(jax.random.PRNGKey(0), TOKENS,
                                                               1))["params"]
    sh = mesh_lib.tree_shardings(mesh, boxed)
    return sh["embed"]["embedding"].spec, sh["output"]["proj"]["kernel"].spec

  # 9 logits / 10 embedding rows do not split in four: whole on every device.
  assert [tuple(s)[:2] for s in specs(PLAIN)] == [(None, "fsdp"), ("fsdp", None)]
  assert [tuple(s)[:2] for s in specs(PADDED)] == [("tensor", "fsdp"), ("fsdp", "tensor")]


def test_bad_vocab_multiple_is_named():
  with pytest.raises(ValueError, match="model.vocab_multiple: must be >= 1"):
    ModelConfig.from_dict(dict(TINY, vocab_multiple=0))


def test_export_of_a_padded_model_gives_the_real_vocabulary(padded, tmp_path):
  params, noisy, logits = padded
  out = str(tmp_path / "export")
  config = export.export_params(out, PADDED, params)
  assert config["vocab_size"] == V and config["vocab_padding"] == {
      "multiple": 8, "output_columns": 16, "embedding_rows": 16,
      "logits": "columns >= vocab_size are padding: sliced off"}
  with open(os.path.join(out, "README.md"), encoding="utf-8") as f:
    assert "tables padded to 16 columns / 16 rows" in f.read()
  cfg, w = reference.load(out)
  ref = reference.forward(cfg, w, np.asarray(noisy), loops=2)
  assert ref.shape == (2, 8, V)
  np.testing.assert_allclose(ref, logits[..., :V], rtol=1e-4, atol=1e-4)
  from loopjax.io import load
  model, back, _ = load.load_export(out)
  assert model.cfg == PADDED
  np.testing.assert_array_equal(back["output"]["proj"]["kernel"],
                                params["output"]["proj"]["kernel"])

  torch = pytest.importorskip("torch", reason="the transformers check needs the [torch] extra")
  transformers = pytest.importorskip(
      "transformers", reason="the transformers check needs the [torch] extra")
  import transformers.dynamic_module_utils
  cache = str(tmp_path / "hf_home")
  with pytest.MonkeyPatch.context() as mp:  # remote code copied to a temporary module cache
    mp.setenv("HF_HOME", cache)
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE",
               os.path.join(cache, "modules"))
    mp.setattr(sys, "path", list(sys.path))
    hf = transformers.AutoModelForMaskedLM.from_pretrained(
        out, trust_remote_code=True, local_files_only=True).eval()
    with torch.no_grad():
      res = hf(torch.as_tensor(np.array(noisy, np.int64)), loops=2,
               labels=torch.as_tensor(np.array(TOKENS, np.int64)))
  got = res.logits.numpy()
  assert got.shape == (2, 8, V)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
  # Cross-entropy over the real vocabulary only.
  lse = np.log(np.exp(ref - ref.max(-1, keepdims=True)).sum(-1)) + ref.max(-1)
  ce = (lse - np.take_along_axis(ref, np.asarray(TOKENS)[..., None], -1)[..., 0]).mean()
  np.testing.assert_allclose(float(res.loss), ce, rtol=1e-4)
