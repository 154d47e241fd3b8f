"""The experiment config: every section and key with its default, and its validation.

Experiment files in `experiments/` start from `base_config()` and change what they need; a key
that is not here is an error (ml_collections refuses unknown override keys), so typos fail fast.
Reading a file with its overrides and resolving its variant: loopjax/config/load.py.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from loopjax.data import data_vocab_size, default_data_config
from loopjax.diffusion import make_schedule
from loopjax.diffusion.samplers import sampler_endpoint
from loopjax.flops import FLOP_CONVENTIONS
from loopjax.loops import LoopDistribution
from loopjax.model import ModelConfig
from loopjax.config.runtime import parse_profile_steps


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  model = dataclasses.asdict(ModelConfig())
  model.pop("max_loops")  # derived from loops.train (S_max)
  model["vocab_size"] = 0  # 0: the data's vocabulary (tokenizer or built-in task)
  c.model = model
  c.loops = dict(
      train="fixed:1",  # S per step: fixed:S | uniform:LO:HI | table:p1,p2,...
      eval=0,           # S for held-out NELBO and the end-of-run task evaluation; 0 = S_max
  )
  c.diffusion = dict(
      schedule="linear", exponent=1.0, eps=1e-3, antithetic=True,
      # Ancestral sampler endpoint (loopjax/diffusion/samplers.py): "sample" runs the grid to
      # t = 0 and samples every position left at the last step; "argmax" (MDLM) stops at
      # t = sample_eps and fills what is still masked with the argmax. sample_eps 0: eps above.
      final_step="sample", sample_eps=0.0,
  )
  c.data = default_data_config()
  c.train = dict(
      steps=1000, batch_size=32, seed=0,
      lr=1e-3, lr_schedule="cosine", warmup_steps=100, min_lr_ratio=0.1,
      # b2 0.98 (a ~50-step second-moment horizon) for the 1k-step built-in tasks; the paper
      # configs set MDLM's 0.999 (variants.paper_backbone).
      weight_decay=0.01, b1=0.9, b2=0.98, adam_eps=1e-8, clip_norm=1.0,
      # ema_warmup: MDLM's decay min(ema_decay, (1 + n) / (10 + n)) at update n.
      ema_decay=0.999, ema_warmup=False, grad_accum=1,
      log_every=50, checkpoint_every=500, keep_checkpoints=3, async_checkpoints=True,
      # Besides the newest keep_checkpoints: this many with the lowest held-out NELBO (the
      # eval_every evaluation at a checkpoint's step); `--step best` reads the lowest. 0: none.
      keep_best=1,
      # Where logged rows go, a comma list (loopjax/train/writers.py): jsonl, tensorboard, wandb.
      writers="jsonl,tensorboard", wandb_project="loopjax",
      eval_every=500, eval_batches=4, eval_time_points=8, eval_params="ema",
      on_nonfinite="error",  # error: stop with a message | skip: leave the state unchanged
      max_consecutive_skips=10,  # skip: stop with an error after this many skipped in a row
      # Fine-tuning: a run workdir (its newest EMA weights) or an exported folder whose weights
      # start a new run (params and EMA; fresh optimizer and step 0). Ignored when resuming.
      init_from="",
      # JAX's persistent compilation cache: auto ($JAX_COMPILATION_CACHE_DIR, else
      # ~/.cache/loopjax/jax_cache), a folder (local or gs://), or "" for none.
      compile_cache="auto",
      profile_steps="",  # "A:B": a jax.profiler trace of steps A+1..B in WORKDIR/profile
  )
  # Whole-mesh sizes (-1 = fill). dcn_*: the part of each axis that crosses TPU slices
  # (multi-slice) or hosts (multi-node GPU); 1 everywhere = data spans the slices, if several.
  c.mesh = dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1)
  c.eval = dict(  # end-of-run task evaluation (built-in tasks)
      examples=64, steps=0,  # steps 0: one token per step
      loops=0,  # deprecated alias of loops.eval (read into it by loopjax/config/load.py)
  )
  # The comparison run this is (loopjax/config/variants.py), resolved after the overrides:
  # name "" = the config as written; else one of variants.VARIANTS, whose block, loops and
  # FLOP-matched steps derive from this base and `baseline_steps` (mdm's step count).
  # flop_convention: the F_base of the matching rule (loopjax.flops.FLOP_CONVENTIONS).
  c.variant = dict(name="", baseline_steps=0, block=(1, 3), s_max=12,
                   flop_convention="all_forward")
  return c


def model_config(config, data=None, loops: LoopDistribution | None = None) -> ModelConfig:
  """The ModelConfig an experiment or a run's config describes, validated: S_max from
  loops.train, vocab_size 0 = the data's vocabulary, the configured kernels (e.g. auto).
  `data` (a DataSpec) and `loops` (loops.train parsed): reused when already loaded."""
  fields = dict(config.model)
  if fields.get("vocab_size", 0) == 0:
    fields["vocab_size"] = data_vocab_size(data if data is not None else config.data)
  return ModelConfig.from_dict(
      {**fields, "max_loops": (loops or LoopDistribution.parse(config.loops.train)).max_loops})


def check_vocab(model: ModelConfig, data) -> None:
  """Raises unless the model's vocabulary covers the data's token ids (reads the tokenizer)."""
  need = data_vocab_size(data)
  if need > model.vocab_size:
    raise ValueError(f"the data's token ids go up to {need - 1} but model.vocab_size is "
                     f"{model.vocab_size}: set model.vocab_size >= {need}")


def validate(config, data=None, loops: LoopDistribution | None = None) -> ModelConfig:
  """Checks everything that can be checked without devices or data files (check_vocab reads the
  data's tokenizer); raises ValueError. Returns the ModelConfig (see model_config, which takes
  the same `data` and `loops`)."""
  model = model_config(config, data, loops)
  make_schedule(config.diffusion)
  sampler_endpoint(config.diffusion)
  convention = config.get("variant", {}).get("flop_convention", "all_forward")
  if convention not in FLOP_CONVENTIONS:
    raise ValueError(f"variant.flop_convention must be one of {FLOP_CONVENTIONS}, got "
                     f"{convention!r}")
  t = config.train
  positive = ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints",
              "eval_every", "grad_accum", "eval_time_points")
  for key in positive:
    if int(t[key]) < 1:
      raise ValueError(f"train.{key} must be >= 1, got {t[key]}")
  parse_profile_steps(t.profile_steps)
  if int(t.keep_best) < 0:
    raise ValueError(f"train.keep_best must be >= 0 (0: keep no best checkpoint), got "
                     f"{t.keep_best}")
  if t.batch_size % t.grad_accum:
    raise ValueError(f"train.batch_size {t.batch_size} is not divisible by train.grad_accum "
                     f"{t.grad_accum}")
  if t.lr_schedule not in ("constant", "cosine"):
    raise ValueError(f"train.lr_schedule must be 'constant' or 'cosine', got {t.lr_schedule!r}")
  if t.on_nonfinite not in ("error", "skip"):
    raise ValueError(f"train.on_nonfinite must be 'error' or 'skip', got {t.on_nonfinite!r}")
  if int(t.max_consecutive_skips) < 1:
    raise ValueError(f"train.max_consecutive_skips must be >= 1, got {t.max_consecutive_skips}")
  if t.eval_params not in ("ema", "raw"):
    raise ValueError(f"train.eval_params must be 'ema' or 'raw', got {t.eval_params!r}")
  if not 0.0 <= t.ema_decay < 1.0:
    raise ValueError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
  if config.data.seq_len > model.max_length:
    raise ValueError(f"data.seq_len {config.data.seq_len} exceeds model.max_length "
                     f"{model.max_length}")
  if config.loops.eval < 0:
    raise ValueError(f"loops.eval must be >= 0 (0 = S_max), got {config.loops.eval}")
  return model
