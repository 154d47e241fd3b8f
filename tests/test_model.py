"""The looped denoiser: loops equal repeated layers, one compile for every S, shapes, errors."""

import dataclasses


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopjax.model import LoopedTransformer, ModelConfig, count_params

TINY = dict(vocab_size=11, max_length=16, width=32, num_layers=4, num_heads=4, cond_dim=16)


def _loop_cfg(**kw):
  return ModelConfig(kernels="reference",
                     **{**TINY, "loop_start": 1, "loop_end": 3, "max_loops": 5, **kw})


def _init(cfg, seed=0, batch=2, length=16):
  model = LoopedTransformer(cfg)
  x = jax.random.randint(jax.random.PRNGKey(seed + 1), (batch, length), 0, cfg.vocab_size + 1)
  params = nn.unbox(model.init(jax.random.PRNGKey(seed), x, 1)["params"])
  # adaLN gates start at zero (blocks are the identity at init); randomise every parameter so
  # the comparisons below are not between identity maps.
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 7), len(leaves))
  leaves = [l + 0.2 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)]
  return model, jax.tree_util.tree_unflatten(tree, leaves), x


def _unrolled_params(params, loops):
  """Parameters of a plain MDM with head + block*S + tail layers stacked in execution order."""
  stacks = [params["head"]["scan"]["layer"]]
  stacks += [params["loop"]["scan"]["block"]["scan"]["layer"]] * loops
  stacks += [params["tail"]["scan"]["layer"]]
  layers = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, 0), *stacks)
  rest = {k: v for k, v in params.items() if k not in ("head", "loop", "tail")}
  return {**rest, "head": {"scan": {"layer": layers}}}


@pytest.mark.parametrize("loops", [1, 5])
def test_looped_equals_block_applied_by_hand(loops):
  cfg = _loop_cfg()
  model, params, x = _init(cfg)
  got = jax.jit(lambda p, x, s: model.apply({"params": p}, x, s))(params, x, loops)
  plain = ModelConfig(kernels="reference", **{**TINY, "num_layers": cfg.executed_depth(loops)})
  want = LoopedTransformer(plain).apply({"params": _unrolled_params(params, loops)}, x)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("loop_inject", [False, True])
def test_more_loops_than_s_max_run_the_same_for_a_traced_and_a_python_s(loop_inject):
  # S_max = 5, S = 7: a traced S runs 7 loops like a Python int, equal to the unrolled model
  # with 7 copies of the block, and not to S = S_max.
  cfg, loops = _loop_cfg(loop_inject=loop_inject), 7
  model, params, x = _init(cfg)
  traced = jax.jit(lambda p, x, s: model.apply({"params": p}, x, s))(params, x, jnp.int32(loops))
  static = model.apply({"params": params}, x, loops)
  np.testing.assert_allclose(traced, static, rtol=2e-5, atol=2e-5)
  at_s_max = jax.jit(lambda p, x, s: model.apply({"params": p}, x, s))(params, x, jnp.int32(5))
  assert np.abs(np.asarray(traced) - np.asarray(at_s_max)).max() > 1e-3
  if not loop_inject:
    plain = ModelConfig(kernels="reference", **{**TINY, "num_layers": cfg.executed_depth(loops)})
    want = LoopedTransformer(plain).apply({"params": _unrolled_params(params, loops)}, x)
    np.testing.assert_allclose(traced, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("loop_remat", ["none", "full"])
def test_loop_gradient_equals_unrolled_gradient(loop_remat):
  # Traced S = 3 of S_max = 5: skipped iterations add nothing; the shared block's gradient is the
  # sum of its 3 unrolled copies' gradients, with or without rematerialised iterations.
  cfg, loops = _loop_cfg(loop_remat=loop_remat), 3
  model, params, x = _init(cfg)
  # train=True (dropout 0): the training program, whose traced S needs no loop past S_max.
  loss = lambda m, p, *s: jnp.sum(jnp.sin(m.apply({"params": p}, x, *s, train=True)))
  got = jax.jit(jax.grad(lambda p, s: loss(model, p, s)))(params, jnp.int32(loops))
  plain = LoopedTransformer(ModelConfig(kernels="reference",
                                        **{**TINY, "num_layers": cfg.executed_depth(loops)}))
  want = jax.grad(lambda p: loss(plain, p))(_unrolled_params(params, loops))
  layers = want["head"]["scan"]["layer"]  # head layer 0, block copies 1-2, 3-4, 5-6, tail 7
  pick = lambda sl: jax.tree_util.tree_map(lambda a: a[sl], layers)
  block = jax.tree_util.tree_map(lambda *xs: sum(xs), *[pick(slice(1 + 2 * k, 3 + 2 * k))
                                                      for k in range(loops)])
  # Gradients reach ~3 here; float32 rounding of two different programs differs by ~1e-5.
  close = lambda a, b: jax.tree_util.tree_map(
      lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-4), a, b)
  close(got["head"]["scan"]["layer"], pick(slice(0, 1)))
  close(got["loop"]["scan"]["block"]["scan"]["layer"], block)
  close(got["tail"]["scan"]["layer"], pick(slice(7, 8)))
  close({k: v for k, v in got.items() if k not in ("head", "loop", "tail")},
        {k: v for k, v in want.items() if k != "head"})


def test_loop_hiddens_follow_iterations():
  cfg = _loop_cfg()
  model, params, x = _init(cfg)
  _, aux = model.apply({"params": params}, x, 3, collect=True)
  hid = aux["loop_hiddens_SxBxLxD"]
  assert hid.shape == (5, 2, 16, 32)
  # Iterations beyond S leave the state unchanged; each executed one changes it.
  np.testing.assert_array_equal(hid[2], hid[3])
  np.testing.assert_array_equal(hid[2], hid[4])
  assert float(jnp.abs(hid[1] - hid[0]).max()) > 1e-3
  probs = aux["attn"]["loop"]
  assert probs.shape == (5, 2, 2, 4, 16, 16)
  np.testing.assert_allclose(probs[:3].sum(-1), 1.0, rtol=1e-5)
  assert float(jnp.abs(probs[3:]).max()) == 0.0
  # Driving the loop chunk by chunk (as adaptive samplers do) gives the same state.
  h, c, mask, _ = model.apply({"params": params}, x, method="encode")
  h1 = model.apply({"params": params}, h, h, c, mask, 0, 2, method="loop_chunk")
  h1 = model.apply({"params": params}, h1, h, c, mask, 2, 1, method="loop_chunk")
  np.testing.assert_allclose(h1, hid[2], rtol=1e-5, atol=1e-5)


def test_param_counts_and_no_loop_axis():
  def n_params(**kw):
    cfg = ModelConfig(kernels="reference", **{**TINY, **kw})
    x = jnp.zeros((1, 8), jnp.int32)
    return count_params(LoopedTransformer(cfg).init(jax.random.PRNGKey(0), x, 1)["params"])

  mdm = n_params()
  loop = n_params(loop_start=1, loop_end=3, max_loops=12)
  uniform = n_params(loop_start=0, loop_end=4, max_loops=12)
  deeper = n_params(num_layers=6)
  assert loop == mdm == uniform
  assert deeper > mdm
  _, params, _ = _init(_loop_cfg(max_loops=12))
  for leaf in jax.tree_util.tree_leaves(params["loop"]):
    assert leaf.shape[0] == 2, "the looped block's weights are stacked per layer, never per loop"


def test_one_compilation_for_every_loop_count():
  cfg = _loop_cfg(max_loops=6)
  model, params, x = _init(cfg)
  f = jax.jit(lambda p, x, s: model.apply({"params": p}, x, s))
  outs = [f(params, x, jnp.int32(s)) for s in range(1, 7)]
  assert f._cache_size() == 1
  assert not np.allclose(outs[0], outs[-1])


def test_unroll_layers_keeps_params_outputs_and_the_rolled_loop():
  cfg = _loop_cfg(max_loops=6)
  model, params, x = _init(cfg)
  unrolled = LoopedTransformer(dataclasses.replace(cfg, unroll_layers=True))
  f = jax.jit(lambda p, x, s: unrolled.apply({"params": p}, x, s))
  np.testing.assert_allclose(f(params, x, jnp.int32(4)), model.apply({"params": params}, x, 4),
                             rtol=2e-5, atol=2e-5)
  # The head/tail stacks are unrolled; the loop stays one rolled while loop (compile time
  # independent of S_max), beside the while loop of the iterations past S_max.
  hlo = f.lower(params, x, jnp.int32(4)).compile().as_text()
  assert hlo.count(" while(") == 2
  # Training (S <= S_max by its distribution) builds no loop past S_max: its program is the scan.
  g = jax.jit(lambda p, x, s: unrolled.apply({"params": p}, x, s, train=True))
  assert g.lower(params, x, jnp.int32(4)).compile().as_text().count(" while(") == 1


def test_mask_is_never_predicted_and_segments_isolate():
  cfg = _loop_cfg()
  model, params, x = _init(cfg)
  logits = model.apply({"params": params}, x, 2)
  assert logits.shape == (2, 16, cfg.vocab_size)  # V outputs; mask id V has no logit.
  seg = jnp.array([[1] * 8 + [2] * 8] * 2)
  a = model.apply({"params": params}, x, 2, segment_ids_BxL=seg)
  x2 = x.at[:, 8:].set((x[:, 8:] + 1) % cfg.vocab_size)  # change document 2 only
  b = model.apply({"params": params}, x2, 2, segment_ids_BxL=seg)
  np.testing.assert_allclose(a[:, :8], b[:, :8], rtol=1e-5, atol=1e-5)
  assert not np.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("extra", [dict(loop_inject=True, loop_embedding=True, grad_last_k=2),
                                   dict(remat="full", mlp_type="swiglu", dtype="bfloat16"),
                                   dict(time_conditioning=True, dropout=0.1, remat="dots", loop_remat="none")])
def test_options_run_and_differentiate(extra):
  cfg = _loop_cfg(**extra)
  model, params, x = _init(cfg)

  def loss(p, s):
    out = model.apply({"params": p}, x, s, jnp.full((2,), 0.5), train=True,
                      rngs={"dropout": jax.random.PRNGKey(3)})
    return jnp.mean(out ** 2)

  g = jax.jit(jax.grad(loss))(params, jnp.int32(4))
  gb = g["loop"]["scan"]["block"]["scan"]["layer"]["mlp"]
  assert all(np.isfinite(v).all() for v in jax.tree_util.tree_leaves(g))
  assert float(jnp.abs(jax.tree_util.tree_leaves(gb)[0]).max()) > 0


def test_grad_last_k_cuts_early_iterations():
  # With k = 1 the gradient reaching the head comes only through the skip path of... nothing:
  # the head output enters iteration 0, which is cut when S > 1, so head params get no gradient.
  cfg = _loop_cfg(grad_last_k=1)
  model, params, x = _init(cfg)
  loss = lambda p, s: jnp.mean(model.apply({"params": p}, x, s, train=True) ** 2)
  g = jax.grad(loss)(params, jnp.int32(3))
  assert float(jnp.abs(g["head"]["scan"]["layer"]["mlp"]["wi"]["kernel"]).max()) == 0.0
  g1 = jax.grad(loss)(params, jnp.int32(1))
  assert float(jnp.abs(g1["head"]["scan"]["layer"]["mlp"]["wi"]["kernel"]).max()) > 0.0


@pytest.mark.parametrize("field,kw", [
    ("loop_start", dict(loop_start=3, loop_end=9)),
    ("max_loops", dict(max_loops=0)),
    ("num_heads", dict(num_heads=5)),
    ("mlp_type", dict(mlp_type="relu6")),
])
def test_bad_config_names_the_field(field, kw):
  with pytest.raises(ValueError, match=f"model.{field}"):
    ModelConfig.from_dict({**TINY, **kw})


def test_unknown_field_and_too_long_input():
  with pytest.raises(ValueError, match="unknown config field"):
    ModelConfig.from_dict({**TINY, "widht": 3})
  cfg = ModelConfig(kernels="reference", **TINY)
  with pytest.raises(ValueError, match="max_length"):
    LoopedTransformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 17), jnp.int32))
