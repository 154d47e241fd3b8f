"""GSM8K-format evaluation: JSONL of {"question", "answer"} with answers ending in `#### N`.

Each question becomes a prompt (`template`, default "Question: {question}\\nAnswer:"), followed by
`answer_len` masked positions that the sampler fills; the rest of the row is padding. The number
is extracted from the generation (after the first `####` if there is one, else the last number in
the text), normalised ("1,000.50" -> "1000.5", "$7" -> "7") and compared with the gold number:
exact match. Works with any run whose tokenizer handles the text (byte, SentencePiece, HF).

Kept consistent with lm-evaluation-harness's `gsm8k` task (run through `--lm-eval gsm8k`): the
same prompt (its doc_to_text), the generation cut at its stop strings (`STOP`), and the number
after the first "####" (its "strict-match" filter) or, without one, the last number (its
"flexible-extract"). Differences: lm-eval's default is 5-shot (this path is 0-shot: pass
num_fewshot=0 to lm-eval to compare); lm-eval compares strings after dropping ",", "$" and a
final "." while this path compares numbers ("72.0" == "72" here, not there); "#### $7" is 7
here and no match for lm-eval's strict-match.
"""

from __future__ import annotations

import decimal
import os
import re

import numpy as np

from loopjax.data.corpus import jsonl_objects
from loopjax.inference.denoiser import make_sampler, require_policy
from loopjax.inference.generate import run_sampler

DEFAULT_TEMPLATE = "Question: {question}\nAnswer:"
STOP = ("Question:", "</s>", "<|im_end|>")  # lm-eval gsm8k's generation_kwargs.until
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")


def normalize_number(s: str) -> str | None:
  """Canonical text of a number ("1,000.50" -> "1000.5", "-$3" -> "-3", "7." -> "7")."""
  s = s.replace(",", "").replace("$", "").strip().rstrip(".")
  try:
    d = decimal.Decimal(s)
  except decimal.InvalidOperation:
    return None
  if d == d.to_integral_value():
    return str(int(d))
  return format(d.normalize(), "f")


def extract_answer(text: str) -> str | None:
  """The answer number of a GSM8K-style text, normalised; None if there is none."""
  if "####" in text:
    found = _NUMBER.findall(text.split("####", 1)[1])
    return normalize_number(found[0]) if found else None
  found = _NUMBER.findall(text)
  return normalize_number(found[-1]) if found else None


def read_gsm8k(path: str, limit: int = 0) -> list[dict]:
  """Examples of a GSM8K-format JSONL file: question, answer text and gold number."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--gsm8k {path}: the file does not exist (give a GSM8K-format "
                            "JSONL: one {\"question\", \"answer\": \"... #### N\"} per line)")
  out = []
  for n, row in jsonl_objects(path):
    if not isinstance(row, dict) or "question" not in row or "answer" not in row:
      raise ValueError(f"--gsm8k {path} line {n}: need fields 'question' and 'answer'")
    gold = extract_answer(row["answer"]) if "####" in row["answer"] else None
    if gold is None:
      raise ValueError(f"--gsm8k {path} line {n}: the answer does not end in '#### NUMBER'")
    out.append({"question": row["question"], "answer": row["answer"], "gold": gold})
    if limit and len(out) >= limit:
      break
  if not out:
    raise ValueError(f"--gsm8k {path} holds no examples")
  return out


def build_rows(tokenizer, questions, *, seq_len: int, answer_len: int, mask_id: int,
               template: str = DEFAULT_TEMPLATE):
  """(x_BxL with masks on the answer field, segment_ids_BxL, answer_start_B).

  Prompts longer than seq_len - answer_len keep their last tokens (the question's end)."""
  if not 0 < answer_len < seq_len:
    raise ValueError(f"answer_len must be in (0, {seq_len}), got {answer_len}")
  b = len(questions)
  x = np.zeros((b, seq_len), np.int32)
  seg = np.zeros((b, seq_len), np.int32)
  start = np.zeros((b,), np.int32)
  for i, q in enumerate(questions):
    ids = tokenizer.encode(template.format(question=q))[-(seq_len - answer_len):]
    n = len(ids)
    x[i, :n] = ids
    x[i, n:n + answer_len] = mask_id
    seg[i, :n + answer_len] = 1
    start[i] = n
  return x, seg, start


def decode_answer(tokenizer, ids, stop=STOP) -> str:
  """Text of a generated answer field, cut at the first EOS and at the first of `stop`."""
  ids = [int(t) for t in ids]
  if tokenizer.eos_id is not None and tokenizer.eos_id in ids:
    ids = ids[:ids.index(tokenizer.eos_id)]
  text = tokenizer.decode(ids)
  for s in stop:
    text = text.split(s, 1)[0]
  return text


def gsm8k_accuracy(model, params, tokenizer, examples, *, seq_len: int, loops,
                   answer_len: int = 64, steps: int = 64, method: str = "confidence",
                   batch_size: int = 8, template: str = DEFAULT_TEMPLATE, seed: int = 0,
                   keep: int = 5, **sampler_kw) -> dict:
  """Exact match of generated answers; plus loops, model calls, FLOPs and time (as tasks.py).
  loops: a LoopPolicy resolved for the model (`Loaded.policy`)."""
  cfg = model.cfg
  policy = require_policy(loops)
  fn = make_sampler(model, policy, steps=steps, method=method, **sampler_kw)
  hits, stats, shown, seconds = [], [], [], 0.0
  padded = examples + examples[-1:] * (-len(examples) % batch_size)  # one compiled shape
  for k in range(0, len(padded), batch_size):
    chunk = padded[k:k + batch_size]
    x, seg, start = build_rows(tokenizer, [e["question"] for e in chunk], seq_len=seq_len,
                               answer_len=answer_len, mask_id=cfg.mask_id, template=template)
    tokens, st, secs, _ = run_sampler(fn, cfg, params, policy, np.asarray(x), seed=seed + k,
                                      segment_ids_BxL=seg)
    seconds += secs
    stats.append(st)
    for i, e in enumerate(chunk):
      if k + i >= len(examples):
        break
      text = decode_answer(tokenizer, tokens[i, start[i]:start[i] + answer_len])
      pred = extract_answer(text)
      hits.append(pred is not None and pred == e["gold"])
      if len(shown) < keep:
        shown.append({"question": e["question"], "generated": text, "pred": pred,
                      "gold": e["gold"]})
  mean = lambda key: (None if any(s[key] is None for s in stats)
                      else float(np.mean([s[key] for s in stats])))
  return {"exact_match": float(np.mean(hits)), "examples": len(hits),
          "loops": policy.label, "steps": steps, "method": method,
          "loops_mean": mean("loops_mean"), "nfe": mean("nfe"),
          "flops_per_sample": mean("flops_per_sample"),
          "executed_loops_mean": mean("executed_loops_mean"),
          "executed_flops_per_sample": mean("executed_flops_per_sample"),
          "seconds": seconds, "samples": shown}
