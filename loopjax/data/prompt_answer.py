"""Prompt/answer pairs for supervised fine-tuning (GSM8K format), one example per row.

Source files are JSONL, one object per line with a prompt field and an answer field (GSM8K:
{"question": ..., "answer": "... #### 42"}). A row is laid out exactly as the GSM8K evaluation
(loopjax/evaluate/gsm8k.py) lays out its prompts, so a fine-tuned model sees at test time what
it was trained on:

  [ template(prompt) | answer, EOS, EOS, ... (answer_len positions) | padding ]
    fixed, unscored     noised and scored                              fixed, unscored

The prompt is conditioning only (never masked, never scored, as Sudoku givens); the answer field
is padded with EOS and every one of its answer_len positions is scored, so the model learns
where the answer ends (MDLM-style SFT). Prompts longer than seq_len - answer_len keep their last
tokens; answers longer than answer_len - 1 are cut (counted and reported at set-up).
"""

from __future__ import annotations

import logging
import os

import numpy as np

from loopjax.data.batch import make_row
from loopjax.data.corpus import jsonl_objects
from loopjax.data.tokenizers import fill_id

log = logging.getLogger("loopjax")


def read_pairs(paths: list[str], *, prompt_field: str, answer_field: str) -> list[dict]:
  """The JSON objects of `paths`, each checked to carry string prompt and answer fields."""
  if not paths:
    raise ValueError("data.paths is empty: list the local GSM8K-format .jsonl files "
                     "(e.g. grade-school-math's train.jsonl)")
  out = []
  for path in paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"data file {path!r} does not exist. GSM8K: download train.jsonl / test.jsonl from "
          "https://github.com/openai/grade-school-math (grade_school_math/data/) and pass "
          "--config.data.paths=/path/to/train.jsonl")
    for n, row in jsonl_objects(path):
      if not isinstance(row, dict) or not all(
          isinstance(row.get(k), str) for k in (prompt_field, answer_field)):
        raise ValueError(f"{path!r} line {n}: need string fields {prompt_field!r} and "
                         f"{answer_field!r} (set data.prompt_field / data.answer_field)")
      out.append(row)
  if not out:
    raise ValueError(f"{paths} hold no examples")
  return out


def format_prompt(template: str, row: dict, prompt_field: str) -> str:
  """`template` filled from the row; `{prompt}` is the prompt field, other names the row's."""
  try:
    return template.format(**{**row, "prompt": row[prompt_field]})
  except (KeyError, IndexError) as e:
    raise ValueError(f"data.prompt_template {template!r} names {e} which the data rows do "
                     f"not have (fields: {sorted(row)})") from None


def encode_pair(tokenizer, row: dict, *, seq_len: int, answer_len: int, template: str,
                prompt_field: str, answer_field: str) -> tuple[dict, bool]:
  """(row in the batch format, whether the answer was cut to fit answer_len)."""
  eos = tokenizer.eos_id
  if eos is None:
    raise ValueError("prompt/answer data needs a tokenizer with an EOS id (it ends answers)")
  prompt = tokenizer.encode(format_prompt(template, row, prompt_field))
  prompt = np.asarray(prompt, np.int32)[len(prompt) - min(len(prompt), seq_len - answer_len):]
  answer = np.asarray(tokenizer.encode(row[answer_field]), np.int32)
  cut = answer.size > answer_len - 1
  field = np.full(answer_len, eos, np.int32)
  field[:min(answer.size, answer_len)] = answer[:answer_len]
  n = prompt.size
  tokens = np.full(seq_len, fill_id(tokenizer), np.int32)
  tokens[:n] = prompt
  tokens[n:n + answer_len] = field
  pos = np.arange(seq_len)
  scored = (pos >= n) & (pos < n + answer_len)
  return make_row(tokens, fixed=~scored, loss_mask=scored,
                  segment_ids=(pos < n + answer_len).astype(np.int32)), cut


def encode_pairs(tokenizer, rows: list[dict], **kw) -> list[dict]:
  """encode_pair for every row; warns how many answers were cut."""
  out, cut = [], 0
  for r in rows:
    row, was_cut = encode_pair(tokenizer, r, **kw)
    out.append(row)
    cut += was_cut
  if cut:
    log.warning("%d of %d answers are longer than data.answer_len - 1 = %d tokens and were cut "
                "(raise data.answer_len, and data.seq_len with it)", cut, len(rows),
                kw["answer_len"] - 1)
  return out
