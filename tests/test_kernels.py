"""Kernel sets against the reference: values and gradients of each op and of the whole model,
forward-mode AD through the reference, and the choice `auto` makes from the devices.

No timing here: throughput is measured by benchmarks/ (see BENCHMARKS.md).
"""

import dataclasses
import functools
import importlib.util
import math
import os
import re
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopjax.model import KERNELS, LoopedTransformer, ModelConfig, resolve_kernels
from loopjax.model import kernels
from loopjax.model import layers
from loopjax.model.kernels import cudnn, masks, reference, splash, xla_cpu

TINY = dict(vocab_size=11, max_length=16, width=32, num_layers=4, num_heads=4, cond_dim=16,
            loop_start=1, loop_end=3, max_loops=3)


def _segment_mask(seg_BxL):
  eye = jnp.eye(seg_BxL.shape[1], dtype=bool)
  return (((seg_BxL[:, :, None] == seg_BxL[:, None, :]) & (seg_BxL[:, None, :] > 0)) | eye)[:, None]


def test_the_model_mask_is_the_document_mask():
  seg = jnp.array([[1] * 5 + [2] * 4 + [0] * 3, [3] * 12])
  mask = masks.AttentionMask.from_segment_ids(seg, 2, 12)
  np.testing.assert_array_equal(mask.dense_Bx1xLxL, _segment_mask(seg))
  assert mask.segment_ids_BxL is seg
  # With padding ids made unique, "same id" alone is that mask (what splash is given).
  ids = masks.unique_padding_ids(seg)
  np.testing.assert_array_equal((ids[:, :, None] == ids[:, None, :])[:, None], _segment_mask(seg))
  assert masks.dense_mask(None, 2, 12).all()


def _f32(tree):
  return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), tree)


def _close(got, want, tol, what=""):
  """Leaf by leaf: |got - want| <= tol * (|want| + max |want|)."""
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(_f32(got)),
                          jax.tree_util.tree_leaves(_f32(want))):
    scale = max(float(np.max(np.abs(r))), 1e-6)
    np.testing.assert_allclose(g, r, rtol=tol, atol=tol * scale,
                               err_msg=f"{what}{jax.tree_util.keystr(path)}")


# --- attention ------------------------------------------------------------------------------

def _qkv(dtype, b=2, length=12, h=3, k=8):
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, kk, v, w = (jax.random.normal(key, (b, length, h, k)) for key in keys)
  seg = jnp.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12])[:, :length]
  return q.astype(dtype), kk.astype(dtype), v.astype(dtype), w, _segment_mask(seg)


def test_reference_attention_matches_float64_numpy():
  q, k, v, _, mask = _qkv(jnp.float32)
  qn, kn, vn, mn = (np.asarray(a, np.float64) for a in (q, k, v, mask))
  logits = np.einsum("bqhk,bthk->bhqt", qn, kn) / math.sqrt(q.shape[-1])
  logits = np.where(mn, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = np.einsum("bhqt,bthk->bqhk", p, vn)
  np.testing.assert_allclose(reference.attention(q, k, v, mask), want, rtol=1e-5, atol=1e-6)
  # Keys of another segment get no weight.
  probs = np.asarray(reference.attention_probs(q, k, mask))
  assert probs[0, :, 0, 5:].max() == 0.0 and np.allclose(probs.sum(-1), 1.0)


@pytest.mark.parametrize("dtype,eigen,tol", [(jnp.float32, True, 1e-4),
                                             (jnp.float32, False, 1e-4),
                                             (jnp.bfloat16, False, 4e-2)],
                         ids=["f32_eigen_forms", "f32_row_major_forms", "bf16"])
def test_xla_cpu_attention_matches_reference(dtype, eigen, tol, monkeypatch):
  # Both arrangements of the batched products (float32 takes the Eigen forms, bfloat16 not).
  monkeypatch.setattr(xla_cpu, "eigen_forms", lambda dt: eigen)
  q, k, v, w, mask = _qkv(dtype)
  loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, mask).astype(jnp.float32)) * w)
  _close(xla_cpu.attention(q, k, v, mask), reference.attention(q, k, v, mask), tol, "value")
  got = jax.jit(jax.grad(loss(xla_cpu.attention), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss(reference.attention), argnums=(0, 1, 2))(q, k, v)
  for name, g, r in zip("qkv", got, want):
    assert g.dtype == dtype
    _close(g, r, tol, f"d/d{name}")


def test_bfloat16_attention_dots_stay_bfloat16():
  # A transposed operand feeding a 4-D batched dot made XLA:CPU upcast bfloat16 attention dots to
  # float32; `bdot` merges the batch axes to prevent it.
  q, k, v = (jnp.ones((2, 16, 2, 8), jnp.bfloat16) for _ in range(3))
  mask = jnp.ones((2, 1, 16, 16), bool)
  loss = lambda q, k, v: jnp.sum(xla_cpu.attention(q, k, v, mask).astype(jnp.float32))
  hlo = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, k, v).compile().as_text()
  shapes = dict(re.findall(r"%(\S+) = (\S+) ", hlo))
  operands = re.findall(r"= \S+ dot\(%(\S+), %(\S+)\)", hlo)
  assert len(operands) == 6, hlo
  for a, b in operands:
    assert shapes[a].startswith("bf16") and shapes[b].startswith("bf16"), (shapes[a], shapes[b])


def _loss_and_grads(attend, q, k, v, w, mask, seg):
  loss = lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v, mask, seg).astype(jnp.float32)) * w)
  return jax.jit(lambda q, k, v: (attend(q, k, v, mask, seg),
                                  jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)


REFERENCE_ATTENTION = kernels.get("reference").attention


@pytest.mark.parametrize("length,documents", [(128, False), (40, True)],
                         ids=["one_block_one_document", "padded_to_a_block_documents"])
def test_splash_attention_matches_reference(length, documents):
  # Pallas' interpreter runs the TPU kernel on CPU. 128 positions are one kernel block, no
  # segment ids; 40 are padded to a block, with three documents and padding in a row.
  q, k, v, w, _ = _qkv(jnp.float32, length=length, h=2, k=16)
  seg = (jnp.array([[1] * 15 + [2] * 15 + [3] * 6 + [0] * 4, [4] * 20 + [6] * 20])
         if documents else None)
  mask = masks.dense_mask(seg, 2, length)
  got, want = (_loss_and_grads(fn, q, k, v, w, mask, seg)
               for fn in (splash.interpreted, REFERENCE_ATTENTION))
  _close(got, want, 1e-5, "splash ")


def test_splash_model_matches_reference(monkeypatch):
  # Segment ids reach the looped block's layer (under the loop's scan and cond) and the kernel
  # set reads them; the TPU kernel runs interpreted. One layer and forward only: the kernel's
  # gradient is checked above, and each interpreted kernel in a program adds seconds of compile.
  monkeypatch.setitem(kernels._SETS, "splash", dataclasses.replace(
      kernels.get("splash"), attention=splash.interpreted))
  cfg = ModelConfig(kernels="reference",
                    **dict(TINY, num_layers=1, loop_start=0, loop_end=1, max_loops=2))
  x, seg = _model_inputs()
  ref, spl = (LoopedTransformer(dataclasses.replace(cfg, kernels=n))
              for n in ("reference", "splash"))
  params = _open_gates(_init(ref, x, 1))
  # S = 1 of 2 (a traced S): the iteration runs under the loop's cond.
  logits = lambda model: jax.jit(lambda p, s: model.apply({"params": p}, x, s, None, seg))(
      params, jnp.int32(1))
  _close(logits(spl), logits(ref), 1e-4, "splash model logits")


_SPLASH_MESH = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from loopjax.model import kernels
    from loopjax.model.kernels import masks, splash
    from loopjax.parallel import mesh as mesh_lib
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, jax.devices())
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v, w = (jax.random.normal(key, (2, 40, 2, 16)) for key in keys)
    seg = jnp.array([[1] * 15 + [2] * 15 + [3] * 6 + [0] * 4, [4] * 20 + [6] * 20])
    mask = masks.dense_mask(seg, 2, 40)
    # The program spans the mesh's devices as the train step's sharded arguments make it.
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    q, k, v, w, seg, mask = jax.device_put((q, k, v, w, seg, mask), rows)

    def run(attend):
      loss = lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v, mask, seg)) * w)
      return jax.jit(mesh_lib.with_rules(lambda q, k, v: (
          attend(q, k, v, mask, seg), jax.grad(loss, (0, 1, 2))(q, k, v)), mesh))(q, k, v)

    lowered = jax.jit(mesh_lib.with_rules(lambda q, k, v: splash.interpreted(
        q, k, v, mask, seg), mesh)).lower(q, k, v).as_text()
    print("SHARD_MAP", "sdy.manual_computation" in lowered)
    got, want = run(splash.interpreted), run(kernels.get("reference").attention)
    err = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(got),
                                                           jax.tree_util.tree_leaves(want)))
    print("MAX_ERR", err)
""")


def test_splash_runs_per_shard_under_a_mesh():
  # 4 fake CPU devices: rows over `data`, heads over `tensor`; each shard's kernel sees its own
  # rows and heads, and the result is the unsharded reference's.
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
  out = subprocess.run([sys.executable, "-c", _SPLASH_MESH], env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "SHARD_MAP True" in out.stdout, out.stdout
  assert float(re.search(r"MAX_ERR (\S+)", out.stdout)[1]) < 1e-5, out.stdout


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 3e-2), (jnp.bfloat16, 1e-2)],
                         ids=["f32_cast_to_bf16", "bf16"])
@pytest.mark.parametrize("documents", [True, False], ids=["documents", "one_document"])
def test_cudnn_prepared_call_matches_reference(dtype, tol, documents):
  # cuDNN itself needs an NVIDIA GPU; the same call (bfloat16 casts, mask as given to cuDNN)
  # with XLA's attention in its place runs anywhere.
  q, k, v, w, mask = _qkv(dtype)
  seg = jnp.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12]) if documents else None
  mask = masks.dense_mask(seg, 2, 12)
  prepared = functools.partial(cudnn.attention, implementation="xla")
  got, want = (_loss_and_grads(fn, q, k, v, w, mask, seg)
               for fn in (prepared, REFERENCE_ATTENTION))
  assert got[0].dtype == dtype and all(g.dtype == dtype for g in got[1])
  _close(got, want, tol, "cudnn-prepared ")
  if dtype == jnp.float32:  # the fused call does see bfloat16 operands
    assert not np.array_equal(np.asarray(got[0]), np.asarray(want[0]))


def test_cudnn_refuses_shapes_it_cannot_fuse_before_compiling():
  mask = jnp.ones((1, 1, 12, 12), bool)
  for shape, match in (((1, 12, 2, 12), "multiple of 8"), ((1, 12, 2, 264), "at most 256")):
    q = jnp.zeros(shape, jnp.bfloat16)
    with pytest.raises(ValueError, match=match):
      cudnn.attention(q, q, q, mask, None)
  q = jnp.zeros((1, 11, 2, 8), jnp.bfloat16)
  with pytest.raises(ValueError, match="even sequence length"):
    cudnn.attention(q, q, q, jnp.ones((1, 1, 11, 11), bool), jnp.ones((1, 11), jnp.int32))


# --- dense layers ---------------------------------------------------------------------------

DTYPE_TOL = [(jnp.float32, 1e-4), (jnp.bfloat16, 3e-2)]


@pytest.mark.parametrize("dtype,tol", DTYPE_TOL, ids=["f32", "bf16"])
@pytest.mark.parametrize("n,kdim,m", [(10, 6, 12), (10, 12, 6), (6, 6, 6), (12, 12, 6),
                                      (6, 6, 12)],
                         ids=["x_transposed", "g_transposed", "square", "n_eq_k_gt_m",
                              "n_eq_k_lt_m"])
def test_xla_cpu_dot_general_matches_reference(n, kdim, m, dtype, tol):
  # Each weight-gradient mode, including N == K where a shape test could not tell x from x^T,
  # through a DenseGeneral-style contraction over a 2-axis kernel.
  x = jax.random.normal(jax.random.PRNGKey(1), (1, n, kdim)).astype(dtype)
  w = jax.random.normal(jax.random.PRNGKey(2), (kdim, m // 2, 2)).astype(dtype)
  dims = (((2,), (0,)), ((), ()))
  f = lambda dot: lambda x, w: jnp.sum(jnp.sin(dot(x, w, dims).astype(jnp.float32)))
  ours, plain = f(xla_cpu.dot_general), f(jax.lax.dot_general)
  assert xla_cpu.dot_general(x, w, dims).dtype == dtype
  _close(ours(x, w), plain(x, w), tol)
  got, want = jax.jit(jax.grad(ours, (0, 1)))(x, w), jax.grad(plain, (0, 1))(x, w)
  assert got[0].dtype == got[1].dtype == dtype
  _close(got, want, tol)


@pytest.mark.parametrize("dtype,tol", DTYPE_TOL, ids=["f32", "bf16"])
@pytest.mark.parametrize("n,kdim,m", [(10, 6, 12), (10, 12, 6)],
                         ids=["x_transposed", "g_transposed"])
def test_xla_cpu_shared_input_projections_match_reference(n, kdim, m, dtype, tol):
  # Attention's q, k, v: three projections of one input with one saved copy of it.
  x = jax.random.normal(jax.random.PRNGKey(1), (n, kdim)).astype(dtype)
  ws = [jax.random.normal(jax.random.PRNGKey(i), (kdim, m)).astype(dtype) for i in (2, 3, 4)]
  loss = lambda fn: lambda x, ws: sum(jnp.sum(jnp.sin(o.astype(jnp.float32)) * (i + 1))
                                      for i, o in enumerate(fn(x, ws)))
  ours, plain = loss(xla_cpu.projections), loss(reference.projections)
  _close(ours(x, ws), plain(x, ws), tol)
  _close(jax.jit(jax.grad(ours, (0, 1)))(x, ws), jax.grad(plain, (0, 1))(x, ws), tol)


@pytest.mark.parametrize("dtype,tol", DTYPE_TOL, ids=["f32", "bf16"])
@pytest.mark.parametrize("name", ["reference", "xla_cpu"])
def test_dense_matches_flax_dense(name, dtype, tol):
  # Same parameters and init as nn.Dense; values and gradients with a non-zero bias.
  kw = dict(dtype=dtype, kernel_init=layers.dense_init(("embed", "mlp")))
  ours, flax_dense = layers.Dense(24, kernels=name, **kw), nn.Dense(24, **kw)
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 16))
  p, q = (nn.unbox(m.init(jax.random.PRNGKey(0), x)) for m in (ours, flax_dense))
  jax.tree_util.tree_map(np.testing.assert_array_equal, p, q)
  p = jax.tree_util.tree_map(lambda t: t + 0.1, p)
  assert ours.apply(p, x).dtype == dtype
  _close(ours.apply(p, x), flax_dense.apply(p, x), tol)
  grad = lambda m: jax.grad(lambda p: jnp.sum(jnp.sin(m.apply(p, x).astype(jnp.float32))))(p)
  _close(grad(ours), grad(flax_dense), tol)


# --- the whole model ------------------------------------------------------------------------

def _model_inputs():
  x = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 12)
  seg = jnp.array([[1] * 9 + [2] * 4 + [0] * 3, [1] * 16])
  return x, seg


def _open_gates(params):
  """Non-zero adaLN projections, so every gate is open and every layer contributes (at init
  they are zero, and no attention output reaches the logits)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, a: a + 0.02 * jax.random.normal(jax.random.PRNGKey(hash(jax.tree_util.keystr(p))
                                                                   % 2**31), a.shape)
      if "adaln" in jax.tree_util.keystr(p) else a, params)


def _init(model, *args):
  # Jitted: eager initialisation dispatches (and compiles) every op of the scans one by one.
  return jax.jit(lambda key: nn.unbox(model.init(key, *args)["params"]))(jax.random.PRNGKey(1))


@pytest.mark.parametrize("extra,tol", [(dict(), 2e-4),
                                       (dict(mlp_type="swiglu", dtype="bfloat16"), 5e-2)],
                         ids=["f32_gelu", "bf16_swiglu"])
def test_model_xla_cpu_matches_reference(extra, tol):
  ref_cfg = ModelConfig(kernels="reference", **TINY, **extra)
  x, seg = _model_inputs()
  ref = LoopedTransformer(ref_cfg)
  cpu = LoopedTransformer(dataclasses.replace(ref_cfg, kernels="xla_cpu"))
  params = _init(ref, x, 1)
  # The same parameter tree, initialised identically, whatever the kernels.
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, _init(cpu, x, 1))
  params = _open_gates(params)

  def logits_and_grad(model):
    """One program per kernel set: the logits and the gradient of a loss on them."""
    logits = lambda p: model.apply({"params": p}, x, 2, None, seg)
    loss = lambda p: jnp.mean(jnp.sin(logits(p)))
    return jax.jit(lambda p: (logits(p), jax.grad(loss)(p)))(params)

  (got, got_grad), (want, want_grad) = logits_and_grad(cpu), logits_and_grad(ref)
  _close(got, want, tol, "logits")
  _close(got_grad, want_grad, tol * 5, "grad")


def test_jvp_through_the_reference_model_matches_the_gradient():
  model = LoopedTransformer(ModelConfig(kernels="reference", **TINY, time_conditioning=True))
  x, seg = _model_inputs()
  t = jnp.array([0.3, 0.7])
  params = _init(model, x, 1, t)
  leaves, tree = jax.tree_util.tree_flatten(params)
  tangent = jax.tree_util.tree_unflatten(tree, [
      jax.random.normal(jax.random.PRNGKey(i), a.shape) for i, a in enumerate(leaves)])
  loss = lambda p: jnp.mean(jnp.sin(model.apply({"params": p}, x, 2, t, seg)))
  _, directional = jax.jit(lambda p, v: jax.jvp(loss, (p,), (v,)))(params, tangent)
  grad = jax.jit(jax.grad(loss))(params)
  want = sum(jnp.vdot(g, v) for g, v in zip(jax.tree_util.tree_leaves(grad),
                                             jax.tree_util.tree_leaves(tangent)))
  np.testing.assert_allclose(directional, want, rtol=1e-4)


def test_auto_must_be_resolved_before_the_model_runs():
  model = LoopedTransformer(ModelConfig(**TINY, kernels="auto"))
  with pytest.raises(ValueError, match=r"resolve_kernels\(cfg, devices\)"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32), 1)


# --- choosing a kernel set ------------------------------------------------------------------

def _devices(*platforms):
  return [SimpleNamespace(platform=p) for p in platforms]


@pytest.mark.parametrize("platform,want", [("cpu", "xla_cpu"), ("tpu", "splash"),
                                           ("gpu", "reference"), ("cuda", "reference"),
                                           ("rocm", "reference")])
def test_auto_picks_from_the_device_platform(platform, want):
  cfg = resolve_kernels(ModelConfig(kernels="auto"), _devices(platform, platform))
  assert cfg.kernels == want
  assert cfg == dataclasses.replace(ModelConfig(kernels="reference"), kernels=want)


def test_resolve_refuses_mixed_unknown_or_no_devices():
  for devices, match in ((_devices("cpu", "tpu"), "one platform"), ([], "one platform"),
                         (_devices("metal"), "platform 'metal'")):
    with pytest.raises(ValueError, match=match):
      resolve_kernels(ModelConfig(kernels="auto"), devices)


def test_explicit_kernels_are_kept_and_validated():
  for name in KERNELS[1:]:
    cfg = ModelConfig.from_dict({"kernels": name})
    assert resolve_kernels(cfg, _devices("gpu" if name == "cudnn" else "tpu")) is cfg
  with pytest.raises(ValueError, match="model.kernels"):
    ModelConfig.from_dict({"kernels": "xla"})
  # Device-bound kernels on other devices: refused before anything is traced.
  for name, platform in (("splash", "cpu"), ("splash", "gpu"), ("cudnn", "tpu")):
    with pytest.raises(ValueError, match=rf"model.kernels='{name}' runs on .* \['{platform}'\]"):
      resolve_kernels(ModelConfig(kernels=name), _devices(platform))


def test_runs_on_is_false_only_for_a_set_bound_to_other_devices():
  runs_on = kernels.runs_on
  assert not runs_on("splash", _devices("cpu")) and not runs_on("cudnn", _devices("cpu"))
  assert not runs_on("splash", _devices("tpu", "cpu")) and not runs_on("cudnn", _devices("tpu"))
  assert runs_on("splash", _devices("tpu")) and runs_on("cudnn", _devices("cuda"))
  assert all(runs_on(name, _devices("cpu")) for name in ("auto", "reference", "xla_cpu"))


def test_accelerator_attention_is_automatic_only_where_it_compiles():
  # splash: TPUs only, by `auto`; cudnn (cannot be lowered without a GPU): only when named.
  for name, attention, auto_on in (("cudnn", cudnn.attention, ()),
                                   ("splash", splash.attention, ("tpu",))):
    assert name in KERNELS and kernels.get(name).attention is attention
    assert kernels.get(name).projections is reference.projections
    for platform in ("cpu", "tpu", "gpu", "cuda", "rocm"):
      assert (kernels.resolve("auto", _devices(platform)) == name) == (platform in auto_on)
  # The reference is one key away on a TPU.
  assert resolve_kernels(ModelConfig(kernels="reference"), _devices("tpu")).kernels == \
      "reference"


# --- an ahead-of-time compile for TPU from this host -----------------------------------------

_TPU_AOT = textwrap.dedent("""
    import flax.linen as nn, jax, jax.numpy as jnp
    from loopjax.parallel.topology import tpu_topology_devices
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from loopjax.model import LoopedTransformer, ModelConfig, resolve_kernels
    devices = tpu_topology_devices("v5e:2x2")
    mesh = Mesh(devices, ("data",))

    def lowered(kernels):
      cfg = resolve_kernels(ModelConfig(vocab_size=11, max_length=16, width=32, num_layers=2,
                                        num_heads=4, cond_dim=16, kernels=kernels), devices)
      model = LoopedTransformer(cfg)
      params = jax.eval_shape(lambda: nn.unbox(model.init(
          jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))["params"]))
      params = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(
          a.shape, a.dtype, sharding=NamedSharding(mesh, P())), params)
      x = jax.ShapeDtypeStruct((4, 16), jnp.int32, sharding=NamedSharding(mesh, P("data")))
      loss = lambda p, x: jnp.mean(model.apply({"params": p}, x) ** 2)
      return cfg.kernels, jax.jit(jax.value_and_grad(loss)).lower(params, x)

    print("CHOSEN", resolve_kernels(ModelConfig(kernels="auto"), devices).kernels)
    _, tpu = lowered("reference")
    compiled = tpu.compile()
    print("BARRIERS", "optimization_barrier" in tpu.as_text(), "opt-barrier" in compiled.as_text())
    print("CPU_KERNEL_BARRIERS", "optimization_barrier" in lowered("xla_cpu")[1].as_text())
""")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed: no TPU compiler for an AOT compile")
def test_tpu_aot_auto_is_splash_and_reference_compiles_without_barriers():
  # In a subprocess, so the CPU kernels' lowering below is traced in a process of its own.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _TPU_AOT], env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "CHOSEN splash" in out.stdout, out.stdout
  assert "BARRIERS False False" in out.stdout, out.stdout
  # The check can fail: the CPU kernels do put barriers in the program.
  assert "CPU_KERNEL_BARRIERS True" in out.stdout, out.stdout


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed: no TPU compiler for an AOT compile")
def test_tpu_train_step_with_splash_compiles_and_keeps_activations_sharded(monkeypatch):
  # The trainer's step for a tiny model with kernels=splash, compiled by the TPU compiler for a
  # real topology (FSDP over 4 chips): the Pallas kernel is in the program, run per shard, and
  # no collective moves activations.
  from loopjax.parallel.topology import tpu_topology_devices
  from loopjax.train import memory
  from loopjax.config.load import load_config
  hlo = []
  optimized = memory._optimized_hlo
  monkeypatch.setattr(memory, "_optimized_hlo", lambda *a: hlo.append(optimized(*a)) or hlo[-1])
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = load_config(os.path.join(root, "experiments", "sudoku.py"), [
      "--config.model.width=64", "--config.model.num_layers=2", "--config.model.num_heads=2",
      "--config.model.cond_dim=16", "--config.train.batch_size=16",
      "--config.model.dtype=bfloat16", "--config.model.kernels=splash"])
  r = memory.memory_report(config, tpu_topology_devices("v5e:2x2"),
                           {"data": 1, "fsdp": 4, "tensor": 1})
  assert r["kernels"] == "splash" and r["fits"]
  assert r["activation_collectives"] == [], r["activation_collectives"][:4]
  # Forward, and the backward's dq and dkv kernels (the reference has no custom call at all).
  calls = len(re.findall(r"custom_call_target=\"tpu_custom_call\"", hlo[0]))
  assert calls >= 3, hlo[0][:2000]
