"""A loopjax run as an lm-evaluation-harness model, registered as "loopjax".

  loopjax-lm-eval --model loopjax --model_args workdir=DIR,loops=4 --tasks arc_easy
  python -m loopjax.cli.lm_eval --model loopjax --model_args workdir=DIR ...

Both import this module (which registers the model) and then run lm-eval's own CLI, whose
arguments are unchanged. A plain `lm_eval --model loopjax` does not work: lm-eval 0.4 discovers
no models from installed packages' entry points, only from modules imported before it resolves
`--model`.

model_args (comma separated, lm-eval's syntax):
  workdir=DIR       a training run folder or a `loopjax export` folder (required)
  loops=SPEC        one loop policy: S, adaptive:TAU[:MIN:MAX], or a schedule with ';' for ','
                    (default: S_max)
  time_grid=K       the NELBO on a fixed midpoint grid of K times (default 16) ...
  mc_samples=N      ... or N Monte-Carlo draws of t (and masks) instead; seed=SEED for both
  params=ema|raw, step=N   which checkpoint of a run folder
  batch_size=B      rows per compiled call (lm-eval's --batch_size sets it too)
  steps=N           denoising steps of generate_until (0: one per generated token)
  sampler=confidence|ancestral, block_len=N, temperature=T   the sampler (loopjax.diffusion)
  max_gen_toks=N    generated positions when a task does not say (at most half a row)
From Python (`loopjax eval --lm-eval`, through lm-eval's dict model_args), `loaded=` an already
loaded model (loopjax.io.load.Loaded) stands for workdir/params/step, and `loops=` may be a
LoopPolicy it resolved.

loglikelihood is `conditional_loglik` (the continuation's conditional NELBO; its is_greedy is
the single-step argmax reading documented there); loglikelihood_rolling sums it over lm-eval's
disjoint rolling windows of one row each (one context token + L - 1 scored, the first window's
context is EOS/BOS); generate_until fills `max_gen_toks` masked positions after the context with
a loopjax sampler at the loop policy and cuts the text at the task's `until` strings. Rows longer
than the model's length keep the context's last tokens (warned once).
"""

from __future__ import annotations

import logging
import os
import sys

import lm_eval.models  # noqa: F401  lm-eval's own models, registered before ours
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from loopjax.data.tokenizers import bos_id, fill_id
from loopjax.diffusion import make_schedule
from loopjax.diffusion.samplers import sampler_endpoint
from loopjax.evaluate.conditional import check_estimator, conditional_loglik
from loopjax.inference.denoiser import make_sampler
from loopjax.inference.generate import run_sampler
from loopjax.evaluate.gsm8k import build_rows, decode_answer
from loopjax.io.load import load_model_dir
from loopjax.loops import LoopPolicy

log = logging.getLogger(__name__)


@register_model("loopjax")
class LoopjaxLM(TemplateLM):
  """lm-eval's LM interface over a loopjax model folder at one loop policy."""

  def __init__(self, workdir: str | None = None, loops=None, time_grid: int = 0,
               mc_samples: int = 0, seed: int = 0, params: str | None = None,
               step: int | None = None, batch_size=16, steps: int = 0,
               sampler: str = "confidence", block_len: int = 0,
               temperature: float | None = None, max_gen_toks: int = 256, loaded=None,
               **unused):
    super().__init__()
    for k in ("max_batch_size", "device"):  # lm-eval's generic arguments: JAX places the model
      unused.pop(k, None)
    if unused:
      raise ValueError(f"loopjax model: unknown model_args {sorted(unused)}")
    time_grid, mc_samples = int(time_grid or 0), int(mc_samples or 0)
    self.time_grid = time_grid if time_grid or mc_samples else 16
    self.mc_samples = mc_samples
    check_estimator(self.time_grid, self.mc_samples)
    if loaded is None:
      if not workdir:
        raise ValueError("loopjax model: model_args needs workdir=DIR")
      loaded = _load(str(workdir), params, step)
    self.loaded = loaded
    self.config, self.model, self.params = loaded.config, loaded.model, loaded.params
    cfg = self.model.cfg
    if isinstance(loops, LoopPolicy):  # resolved by the caller's `loaded.policy`
      self.policy = loops
    else:  # a model_args string (';' for ',' in schedule tables): parsed and resolved once here
      self.policy = loaded.policy(cfg.max_loops if loops in (None, "")
                                  else str(loops).replace(";", ","))
    self.schedule = make_schedule(self.config.diffusion)
    self.tok = loaded.tokenizer
    self.seq_len = int(self.config.data.get("seq_len") or cfg.max_length)
    self.pad_id, self.seed = fill_id(self.tok), int(seed)
    bs = str(batch_size)
    self.batch_size = 16 if bs.startswith("auto") else int(bs)
    self.steps, self.sampler, self.block_len = int(steps), str(sampler), int(block_len)
    self.temperature = None if temperature is None else float(temperature)
    self.max_gen_toks = int(max_gen_toks)
    self._warned: set[str] = set()

  # --------------------------------------------------------------------- TemplateLM's hooks

  @property
  def eot_token_id(self) -> int:
    return self.pad_id if self.tok.eos_id is None else int(self.tok.eos_id)

  @property
  def prefix_token_id(self) -> int:
    b = bos_id(self.tok)
    return self.eot_token_id if b is None else int(b)

  @property
  def max_length(self) -> int:
    return self.seq_len

  def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
    return list(self.tok.encode(string))

  def tok_decode(self, ids) -> str:
    return self.tok.decode(list(ids))

  def _warn_once(self, key: str, msg: str) -> None:
    if key not in self._warned:
      self._warned.add(key)
      log.warning(msg)

  def _fit(self, context: list[int], continuation: list[int]) -> list[int]:
    room = self.seq_len - len(continuation)
    if room < 0:
      raise ValueError(f"a continuation of {len(continuation)} tokens is longer than the "
                       f"model's rows ({self.seq_len})")
    if len(context) > room:
      self._warn_once("truncate", f"loopjax: a request is longer than the model's {self.seq_len}"
                      " positions: its context keeps its last tokens (warned once)")
      context = context[len(context) - room:]
    return context

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    todo = [i for i, (_, _, x) in enumerate(requests) if len(x)]  # empty: log 1 = 0, greedy
    pairs = [(self._fit(list(requests[i][1]), list(requests[i][2])), list(requests[i][2]))
             for i in todo]
    out = [(0.0, True)] * len(requests)
    scored = conditional_loglik(self.model, self.params, self.schedule, self.policy, pairs,
                                seq_len=self.seq_len, pad_id=self.pad_id,
                                batch_size=self.batch_size, time_grid=self.time_grid,
                                mc_samples=self.mc_samples, seed=self.seed) if pairs else []
    for i, res in zip(todo, scored):
      out[i] = res
    for (key, _, _), res in zip(requests, out):
      self.cache_hook.add_partial("loglikelihood", key, res)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    flat, owner = [], []
    for i, req in enumerate(requests):
      windows = get_rolling_token_windows(
          token_list=self.tok_encode(req.args[0]), prefix_token=self.prefix_token_id,
          max_seq_len=self.seq_len - 1, context_len=1)
      for w in map(make_disjoint_window, windows):
        flat.append((None, *w))
        owner.append(i)
    scores = self._loglikelihood_tokens(flat) if flat else []
    totals = [0.0] * len(requests)
    for i, (ll, _) in zip(owner, scores):
      totals[i] += ll
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
    return totals

  # --------------------------------------------------------------------------- generation

  def _gen_settings(self, kw: dict):
    kw = dict(kw or {})
    until = kw.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    n = int(kw.pop("max_gen_toks", self.max_gen_toks))
    if n > self.seq_len // 2:
      self._warn_once("gen", f"loopjax: max_gen_toks {n} is cut to half the model's rows "
                      f"({self.seq_len // 2})")
      n = self.seq_len // 2
    temp = self.temperature
    if kw.get("do_sample") is False or kw.get("temperature") == 0:
      temp = 0.0
    elif kw.get("temperature") is not None:
      temp = float(kw["temperature"])
    return tuple(until), n, temp

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    groups: dict = {}
    for i, req in enumerate(requests):
      groups.setdefault(self._gen_settings(req.args[1]), []).append(i)
    out = [""] * len(requests)
    for (until, n, temp), idx in groups.items():
      fn = make_sampler(self.model, self.policy, steps=self.steps or n, method=self.sampler,
                        block_len=self.block_len, temperature=temp,
                        **sampler_endpoint(self.config.diffusion))
      for k in range(0, len(idx), self.batch_size):
        chunk = idx[k:k + self.batch_size]
        texts = [requests[i].args[0] for i in chunk]
        if any(len(self.tok_encode(t)) > self.seq_len - n for t in texts):
          self._warn_once("prompt", f"loopjax: a prompt does not fit {self.seq_len - n} "
                          "positions before the generated ones: it keeps its last tokens")
        texts += texts[-1:] * (self.batch_size - len(chunk))  # one compiled shape
        x, seg, start = build_rows(self.tok, texts, seq_len=self.seq_len, answer_len=n,
                                   mask_id=self.model.cfg.mask_id, template="{question}")
        tokens = run_sampler(fn, self.model.cfg, self.params, self.policy, np.asarray(x),
                             seed=self.seed + k, segment_ids_BxL=seg)[0]
        for j, i in enumerate(chunk):
          text = decode_answer(self.tok, tokens[j, start[j]:start[j] + n], stop=until)
          out[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return out


_LOADED: dict = {}


def _load(workdir: str, params, step):
  """load_model_dir (a Loaded), kept per folder and checkpoint: one model object and one
  tokenizer per process, so every loop policy reuses its compiled programs (their cache is keyed
  by the model)."""
  key = (os.path.abspath(workdir), params, step)
  if key not in _LOADED:
    _LOADED[key] = load_model_dir(workdir, params=params, step=step)
  return _LOADED[key]


if __name__ == "__main__":  # the command moved to loopjax/cli/: one line naming it, exit 2
  print(f"{__spec__.name if __spec__ else __file__} is a library module now: run loopjax-lm-eval ... (or python -m loopjax.cli.lm_eval ...)",
        file=sys.stderr)
  sys.exit(2)
