"""Generation from a trained run or an export, with any loop policy and sampler (`run_sample`,
behind `loopjax sample`).

prompt: the text is a fixed prefix, the rest of the row (up to `length`) is generated.
template: infilling; every `mask_char` is one position to fill, the rest never changes.
heldout: the run's held-out task examples (e.g. Sudoku puzzles) as prompts, scored.
Prints the decoded samples and writes samples/sample_<time>.json (loops executed, model calls,
FLOPs, seconds and the texts) under `output_dir(workdir, out)`.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from loopjax.data import make_eval_batches
from loopjax.evaluate.loop_cost import warn_loop_cost
from loopjax.evaluate.outputs import claim_output_dir, output_dir
from loopjax.evaluate.tasks import score
from loopjax.inference.generate import default_steps, generate, prompt_rows
from loopjax.io.load import load_model_dir


def _show(source: str, text: str) -> str:
  if source == "sudoku" and len(text) == 81:
    return "\n".join(text[r * 9:(r + 1) * 9] for r in range(9))
  return text


def run_sample(workdir: str, *, loops="max", steps: int = 0, sampler: str = "ancestral",
               samples: int = 4, prompt: str | None = None, template: str | None = None,
               heldout: bool = False, mask_char: str = "?", length: int = 0,
               temperature: float | None = None, top_k: int = 0, top_p: float = 1.0,
               block_len: int = 0, seed: int = 0, params: str | None = None, step=None,
               out: str | None = None) -> tuple[list[str], dict]:
  """Generates `samples` rows from the run or export at `workdir`, prints them, writes
  samples/sample_<time>.json under `output_dir(workdir, out)`; returns (texts, report)."""
  claim_output_dir(workdir, out)
  # A training workdir or a `loopjax export` folder.
  loaded = load_model_dir(workdir, params=params, step=step)
  config, model, weights = loaded.config, loaded.model, loaded.params
  ckpt = config.source.get("step") or 0
  cfg, tok = model.cfg, loaded.tokenizer
  policy = loaded.policy(loops)  # the `--loops` value, parsed and resolved once
  length = length or config.data.seq_len
  batch = None
  if heldout:
    batch = make_eval_batches(loaded.data, batch_size=samples, num_batches=1,
                              seed=int(config.get("train", {}).get("seed", 0)) + 1)[0]
    x = np.where(batch["loss_mask"], cfg.mask_id, batch["tokens"])
  else:
    x = prompt_rows(tok, cfg.mask_id, samples, length, prompt=prompt, template=template,
                    mask_char=mask_char, length_name="--length")
  steps = steps or default_steps(x, cfg.mask_id)
  warn_loop_cost(cfg, policy.largest, length=x.shape[1], calls=steps, samples=samples)
  gen = generate(model, weights, config, tok, x, loops=policy, steps=steps, sampler=sampler,
                 block_len=block_len, temperature=temperature, top_k=top_k, top_p=top_p,
                 seed=seed, segment_ids_BxL=None if batch is None else batch["segment_ids"])
  tokens, texts = gen.tokens, gen.texts
  for i, text in enumerate(texts):
    print(f"--- sample {i}\n{_show(config.data.source, text)}")
  report = {"checkpoint_step": int(ckpt), **gen.stats}
  if batch is not None and config.data.source in ("sudoku", "arithmetic"):
    report.update(score(config.data.source, tokens, batch["tokens"], batch["fixed"],
                        batch["loss_mask"]))
  given = x != cfg.mask_id
  report["given_kept"] = bool(np.array_equal(tokens[given], x[given]))
  report["masks_left"] = int((tokens == cfg.mask_id).sum())
  samples_dir = os.path.join(output_dir(workdir, out), "samples")
  os.makedirs(samples_dir, exist_ok=True)
  path = os.path.join(samples_dir, f"sample_{time.strftime('%Y%m%d_%H%M%S')}.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump({**report, "samples": texts}, f, indent=2)
  report["file"] = path
  return texts, report
