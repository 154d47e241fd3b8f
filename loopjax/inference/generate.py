"""The sampling driver: prompts as rows of token ids, one call of the sampler, decoded text.

`loopjax sample` and the Python API (`loopjax.load(DIR).sample`) both run it on a model loaded
from a run or an export (`loaded = loopjax.io.load.load_model_dir(DIR)`):

    x = prompt_rows(loaded.tokenizer, cfg.mask_id, num, length, prompt="The")  # or template=...
    out = generate(loaded.model, loaded.params, loaded.config, loaded.tokenizer, x,
                   loops=loaded.policy("max"), steps=default_steps(x, mask_id))

A prompt is a fixed prefix and the rest of the row is generated; a template is infilling: every
`mask_char` is one position to fill and the rest never changes.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from loopjax.diffusion import make_schedule
from loopjax.diffusion.samplers import sampler_endpoint
from loopjax.inference.denoiser import (generation_stats, loop_args, make_sampler,
                                       require_policy, timed)


def encode_template(tokenizer, template: str, mask_char: str, mask_id: int) -> np.ndarray:
  """ids of a template: each run of mask_char becomes that many [MASK] ids."""
  ids = []
  for piece in re.split(f"({re.escape(mask_char)}+)", template):
    if piece and set(piece) == {mask_char}:
      ids.extend([mask_id] * len(piece))
    elif piece:
      ids.extend(tokenizer.encode(piece))
  return np.asarray(ids, np.int32)


def prompt_rows(tokenizer, mask_id: int, num: int, length: int, *, prompt: str | None = None,
                template: str | None = None, mask_char: str = "?",
                length_name: str = "length") -> np.ndarray:
  """int32 num x L rows to sample: `template` (its own length) or `prompt` followed by
  [MASK] up to `length` (no prompt: all [MASK]). length_name: what the caller calls `length`
  (a flag, an argument), for the error message."""
  if template is not None:
    return np.tile(encode_template(tokenizer, template, mask_char, mask_id), (num, 1))
  ids = np.asarray(tokenizer.encode(prompt) if prompt else [], np.int32)
  if ids.size >= length:
    raise ValueError(f"the prompt has {ids.size} tokens; {length_name} {length} leaves none "
                     f"to generate (ask for a longer {length_name})")
  return np.tile(np.concatenate([ids, np.full(length - ids.size, mask_id, np.int32)]), (num, 1))


def default_steps(x_BxL: np.ndarray, mask_id: int) -> int:
  """One denoising step per position to fill (at least one)."""
  return int((np.asarray(x_BxL) == mask_id).sum(-1).max()) or 1


@dataclasses.dataclass
class Generation:
  """What one sampler call produced: tokens (B x L numpy), texts (decoded rows) and stats
  (loops executed, model calls, FLOPs, seconds; see denoiser.generation_stats)."""

  tokens: np.ndarray
  texts: list
  stats: dict

  def __str__(self) -> str:
    return "\n".join(f"--- sample {i}\n{t}" for i, t in enumerate(self.texts))

  def __iter__(self):
    return iter(self.texts)

  def __len__(self) -> int:
    return len(self.texts)

  def __getitem__(self, i):
    return self.texts[i]


def generate(model, params, config, tokenizer, x_BxL, *, loops, steps: int,
             sampler: str = "ancestral", block_len: int = 0, temperature=None, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, segment_ids_BxL=None) -> Generation:
  """Fills the [MASK] positions of `x_BxL` with the sampler.

  loops: a LoopPolicy resolved for the model (`Loaded.policy`); steps: denoising steps (>= 1);
  config: the run's (or export's) config, for the noise schedule and the sampler's endpoint.
  """
  require_policy(loops)
  if x_BxL.shape[1] > model.cfg.max_length:
    raise ValueError(f"rows of {x_BxL.shape[1]} tokens exceed model.max_length "
                     f"{model.cfg.max_length}")
  fn = make_sampler(model, loops, steps=steps, method=sampler,
                    schedule=make_schedule(config.diffusion), block_len=block_len,
                    temperature=temperature, top_k=top_k, top_p=top_p,
                    **sampler_endpoint(config.diffusion))
  tokens, stats, secs, compile_s = run_sampler(fn, model.cfg, params, loops, x_BxL, seed=seed,
                                               segment_ids_BxL=segment_ids_BxL)
  stats = {"loops": loops.label, "sampler": sampler, "steps": steps, "seconds": round(secs, 4),
           "compile_seconds": round(compile_s, 2), **stats}
  return Generation(tokens, [tokenizer.decode(row.tolist()) for row in tokens], stats)


def run_sampler(fn, cfg, params, policy, x_BxL, *, seed: int, segment_ids_BxL=None):
  """One run of a sampler from `denoiser.make_sampler` on rows `x_BxL` (PRNG key `seed`):
  (tokens B x L numpy, generation_stats, run seconds, compile seconds)."""
  seg = None if segment_ids_BxL is None else jnp.asarray(segment_ids_BxL)
  out, secs, compile_s = timed(fn, params, jax.random.PRNGKey(seed),
                               jnp.asarray(x_BxL, jnp.int32), seg, loop_args(policy))
  return (np.asarray(out["tokens"]), generation_stats(cfg, x_BxL.shape[1], out), secs,
          compile_s)
