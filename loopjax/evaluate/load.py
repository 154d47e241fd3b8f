"""Load a trained run's model and parameters from its workdir (no optimizer, no data)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections

from loopjax.model import LoopedTransformer
from loopjax.parallel import mesh as mesh_lib
from loopjax.train import config as config_lib
from loopjax.train.checkpoint import Checkpointer
from loopjax.train.state import create_abstract_state, make_optimizer


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{workdir} is not a loopjax run: no config.json (train one with "
                            "`loopjax train --config ... --workdir DIR`)")
  with open(path, encoding="utf-8") as f:
    return ml_collections.ConfigDict(json.load(f))


def load_run(workdir: str, *, step: int | None = None, params: str = "ema"):
  """Returns (config, model, params, step) of the newest (or given) checkpoint of a run.

  params: "ema" (EMA weights) or "raw" (the optimizer's current weights).
  """
  if params not in ("ema", "raw"):
    raise ValueError(f"params must be 'ema' or 'raw', got {params!r}")
  config = load_config(workdir)
  cfg = config_lib.model_config(config)
  model = LoopedTransformer(cfg)
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  example = jnp.zeros((1, config.data.seq_len), jnp.int32)
  abstract, _ = create_abstract_state(model, make_optimizer(config.train), example,
                                      config.train.seed, mesh)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=10**6, async_save=False)
  try:
    steps = ckpt.steps()
    if not steps:
      raise FileNotFoundError(f"{workdir} has no checkpoints yet")
    if step is not None and step not in steps:
      raise ValueError(f"{workdir} has no checkpoint {step}; it has {steps}")
    state, got = ckpt.restore_state(abstract, step)
  finally:
    ckpt.close()
  return config, model, (state.ema_params if params == "ema" else state.params), got
