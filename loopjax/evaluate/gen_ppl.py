"""Generative perplexity: samples of a run scored by a local autoregressive judge.

`loopjax eval --gen-ppl JUDGE --samples N --steps 64,256,1024 --loops ...` draws N
unconditional samples (or continuations of `--prompt`) of data.seq_len tokens for every
(policy, steps) cell with the chosen sampler, decodes them with the run's tokenizer, re-tokenizes
the text with the judge's tokenizer and scores it with the judge, a Hugging Face causal LM: a
local folder (`save_pretrained` layout, read with local_files_only) or a Hub model id such as
`gpt2-large` (MDLM's judge), taken from the Hugging Face cache first and downloaded only when the
Hub is reachable and HF_HUB_OFFLINE is not set. torch and transformers are imported only here (`pip install
loopjax[torch]`).

The perplexity follows MDLM's `compute_generative_perplexity`: every sample is re-tokenized and
split into pieces of the judge's context length, each piece scored on its own (its first token
unscored, no carried context); the NLL of every scored token is averaged over all tokens of all
samples and exponentiated. EOS: every token is scored except EOS tokens after a sample's first
one (MDLM's `first_eos` / `token_mask`). Where this departs from MDLM:
  - the run's EOS ids split a sample into documents, decoded one by one and joined by the
    judge's EOS id (MDLM decodes EOS as text, which GPT-2 reads back as EOS: the same for
    GPT-2 runs, and it works for any pair of tokenizers);
  - nothing is truncated (MDLM cuts the judge tokens at the diffusion model's length) and
    padding is never scored (MDLM's right padding with EOS makes the first padding token of a
    shorter sample count as its "first EOS");
  - the context length is the judge's own (`n_positions` / `max_position_embeddings`), not a
    fixed 1024, and special tokens the judge's tokenizer puts first (a Llama BOS) are kept;
  - with `--prompt` only the continuation is scored, the prompt being the judge's context.
Beside the perplexity each row reports the unigram entropy of the samples (the entropy of the
token-id histogram of each sample's generated positions, in nats, averaged over samples, as
MDLM and SEDD report it: a low-entropy, repetitive sampler can fake a low perplexity).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

from loopjax.diffusion import make_schedule
from loopjax.errors import UserError
from loopjax.evaluate import tables
from loopjax.inference.denoiser import make_sampler, require_policy
from loopjax.inference.generate import prompt_rows, run_sampler
from loopjax.hf import hub

INSTALL_HINT = "pip install loopjax[torch]"


@dataclasses.dataclass
class Judge:
  """A loaded judge: the torch model, its tokenizer and what scoring needs of them."""
  model: object
  tokenizer: object
  path: str
  context: int            # tokens per scored piece
  eos_id: int | None
  pad_id: int
  prefix: tuple           # special ids the tokenizer puts before a text (a BOS), if any
  device: str = "cpu"


def check_judge(path: str) -> tuple[str, str | None]:
  """(where, repo_id): the absolute path of a local `save_pretrained` folder (repo_id None), or
  a Hub model id (`gpt2-large`) found in the Hugging Face cache or fetched into it
  (loopjax.hf.hub); UserError naming the fix otherwise. Cheap enough to run before any work."""
  local = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(local) and hub.is_repo_id(path):
    repo_id = path.strip()  # a missing or uncached repository fails here, in one line
    hub.hub_file(repo_id, "config.json", what="--gen-ppl judge", whole_repo=True)
    return repo_id, repo_id
  if not os.path.isdir(local) or not os.path.isfile(os.path.join(local, "config.json")):
    raise UserError(f"--gen-ppl {local}: not a local model folder (no config.json there) nor a "
                    "Hub model id; give a folder written by save_pretrained (config.json, "
                    "weights, tokenizer files) or an id such as gpt2-large")
  return local, None


def load_judge(path: str, *, device: str = "cpu") -> Judge:
  """The causal LM and tokenizer of a local `save_pretrained` folder or of a Hub model id
  (`gpt2-large`), the latter from the Hugging Face cache first (loopjax.hf.hub)."""
  where, repo_id = check_judge(path)
  try:
    import torch  # noqa: F401
    import transformers
  except ImportError as e:
    raise UserError(f"--gen-ppl needs torch and transformers ({e.name} is not installed): "
                    f"{INSTALL_HINT}") from None
  transformers.utils.logging.disable_progress_bar()
  path = where
  kw = {"local_files_only": True} if repo_id is None else {}
  try:
    tok = transformers.AutoTokenizer.from_pretrained(where, **kw)
  except (OSError, ValueError, TypeError) as e:
    raise UserError(f"--gen-ppl {where}: no usable tokenizer ({_first_line(e)})") from None
  try:
    model = transformers.AutoModelForCausalLM.from_pretrained(where, **kw)
  except (OSError, ValueError, TypeError) as e:
    raise UserError(f"--gen-ppl {where}: not a causal LM ({_first_line(e)})") from None
  try:
    model.eval().to(device)
  except (RuntimeError, AssertionError, ValueError) as e:  # e.g. a CPU-only torch and "cuda"
    raise UserError(f"--judge-device {device}: {_first_line(e)}") from None
  c = model.config
  context = (getattr(c, "n_positions", None) or getattr(c, "max_position_embeddings", None)
             or 1024)
  eos = tok.eos_token_id
  pad = tok.pad_token_id if tok.pad_token_id is not None else (eos if eos is not None else 0)
  with_special = list(tok("a")["input_ids"])
  plain = list(tok("a", add_special_tokens=False)["input_ids"])
  cut = len(with_special) - len(plain)
  prefix = tuple(with_special[:cut]) if cut > 0 and with_special[cut:] == plain else ()
  return Judge(model=model, tokenizer=tok, path=path, context=int(context), eos_id=eos,
               pad_id=int(pad), prefix=prefix, device=device)


def _first_line(e: Exception) -> str:
  lines = str(e).strip().splitlines()
  return (lines[0] if lines else type(e).__name__)[:300]


def unigram_entropy(ids) -> float:
  """Entropy (nats) of the token-id histogram of one sample; 0 for a constant sample."""
  ids = np.asarray(ids).ravel()
  if ids.size == 0:
    return 0.0
  p = np.unique(ids, return_counts=True)[1] / ids.size
  return float(max(-(p * np.log(p)).sum(), 0.0))


def judge_sequence(judge: Judge, documents, context: str | None = None):
  """(judge ids, index of the first scored token) of a sample given as its documents (joined
  by the judge's EOS) after an optional `context` text that is not scored."""
  tok = judge.tokenizer
  encode = lambda text: list(tok(text, add_special_tokens=False)["input_ids"])
  ids = list(judge.prefix) + (encode(context) if context else [])
  first = len(ids)
  for i, doc in enumerate(documents):
    if i and judge.eos_id is not None:
      ids.append(judge.eos_id)
    elif i:
      ids.extend(encode("\n\n"))
    ids.extend(encode(doc))
  return ids, first


def score_sequences(judge: Judge, seqs, firsts=None, *, batch_size: int = 8):
  """Per-sequence (NLL sum, scored tokens) under the judge, MDLM's way (module docstring):
  pieces of the judge's context length, each piece's first token unscored, EOS after the first
  one in the scored part unscored, padding never scored."""
  import torch
  import torch.nn.functional as F
  firsts = firsts or [0] * len(seqs)
  sums, counts = np.zeros(len(seqs)), np.zeros(len(seqs), np.int64)
  c = judge.context
  for b0 in range(0, len(seqs), batch_size):
    group = seqs[b0:b0 + batch_size]
    width = max(max(len(s) for s in group), 1)
    ids = np.full((len(group), width), judge.pad_id, np.int64)
    scored = np.zeros((len(group), width), bool)
    real = np.zeros((len(group), width), bool)
    for i, s in enumerate(group):
      s = np.asarray(s, np.int64)
      ids[i, :s.size], real[i, :s.size] = s, True
      keep = np.arange(s.size) >= firsts[b0 + i]
      if judge.eos_id is not None:
        eos = (s == judge.eos_id) & keep
        keep &= ~eos | (np.cumsum(eos) == 1)
      scored[i, :s.size] = keep
    ids_t, real_t = torch.from_numpy(ids), torch.from_numpy(real)
    scored_t = torch.from_numpy(scored)
    for start in range(0, width, c):
      piece = ids_t[:, start:start + c].to(judge.device)
      if piece.shape[1] < 2:
        continue
      attn = real_t[:, start:start + c].to(judge.device)
      with torch.no_grad():
        logits = judge.model(input_ids=piece, attention_mask=attn.long()).logits.float()
      nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), piece[:, 1:], reduction="none")
      keep = scored_t[:, start + 1:start + c].to(judge.device)
      nll = torch.where(keep, nll, torch.zeros_like(nll))
      sums[b0:b0 + len(group)] += nll.sum(1).double().cpu().numpy()
      counts[b0:b0 + len(group)] += keep.sum(1).cpu().numpy()
  return sums, counts


def judge_perplexity(judge: Judge, texts, *, batch_size: int = 8) -> dict:
  """Perplexity of plain texts under the judge (mean NLL over all scored tokens, then exp)."""
  seqs = [judge_sequence(judge, [t])[0] for t in texts]
  sums, counts = score_sequences(judge, seqs, batch_size=batch_size)
  nll = float(sums.sum() / max(counts.sum(), 1))
  return {"ppl": float(np.exp(nll)), "nll": nll, "tokens": int(counts.sum())}


def split_documents(tokenizer, ids):
  """The run's token ids of one sample -> its documents' texts (cut at EOS; padding dropped)."""
  eos, pad = tokenizer.eos_id, tokenizer.pad_id
  docs, cur = [], []
  for i in np.asarray(ids).tolist():
    if eos is not None and i == eos:
      docs.append(cur)
      cur = []
    elif pad is None or i != pad:
      cur.append(i)
  docs.append(cur)
  return [tokenizer.decode(d) for d in docs]


def gen_ppl_sweep(loaded, judge: Judge, *, specs, steps, samples: int,
                  method: str = "ancestral", batch_size: int = 64, prompt: str | None = None,
                  seed: int = 0, sampler_kw: dict | None = None, judge_batch_size: int = 8,
                  workdir: str | None = None, header: dict | None = None, log=print) -> list:
  """One row per (steps, policy): judge perplexity, unigram entropy, loops and compute.

  loaded: the model (loopjax.io.load.Loaded: model, weights, config, tokenizer); specs: its loop
  policies, each a LoopPolicy resolved by `loaded.policy`.

  Writes WORKDIR/eval/gen_ppl.json ({**header, judge, rows}) and gen_ppl_samples.jsonl (one
  line per sample: cell, text, judge perplexity, entropy, token ids) when `workdir` is given.
  """
  if samples < 1:
    raise ValueError(f"--samples must be >= 1, got {samples}")
  model, params, config, tok = loaded.model, loaded.params, loaded.config, loaded.tokenizer
  cfg = model.cfg
  length = int(config.data.seq_len)
  bs = min(batch_size, samples)
  x_BxL = prompt_rows(tok, cfg.mask_id, bs, length, prompt=prompt, length_name="data.seq_len")
  prompt_len = int((x_BxL[0] != cfg.mask_id).sum())
  policies = [require_policy(s) for s in specs]
  schedule = make_schedule(config.diffusion)
  rows, lines = [], []
  for n_steps in steps:
    n = n_steps or int(length - prompt_len)
    for policy in policies:
      fn = make_sampler(model, policy, steps=n, method=method, schedule=schedule,
                        **(sampler_kw or {}))
      out_tokens, stats, seconds = [], [], 0.0
      for k in range(-(-samples // bs)):
        tokens, st, secs, _ = run_sampler(fn, cfg, params, policy, x_BxL, seed=seed + k)
        seconds += secs
        out_tokens.append(tokens)
        stats.append(st)
      gen = np.concatenate(out_tokens)[:samples, prompt_len:]
      t0 = time.perf_counter()
      docs = [split_documents(tok, g) for g in gen]
      seqs, firsts = zip(*[judge_sequence(judge, d, prompt) for d in docs])
      sums, counts = score_sequences(judge, list(seqs), list(firsts),
                                     batch_size=judge_batch_size)
      judge_s = time.perf_counter() - t0
      entropies = [unigram_entropy(g) for g in gen]
      nll = float(sums.sum() / max(counts.sum(), 1))
      avg = lambda key: (None if any(s[key] is None for s in stats)
                         else float(np.mean([s[key] for s in stats])))
      row = {"loops": policy.label, "steps": n, "sampler": method, "samples": int(samples),
             "gen_ppl": float(np.exp(nll)), "judge_nll": nll, "judge_tokens": int(counts.sum()),
             "entropy": float(np.mean(entropies)), "entropy_std": float(np.std(entropies)),
             "loops_mean": avg("loops_mean"), "loops_max": max(s["loops_max"] for s in stats),
             "nfe": avg("nfe"), "flops_per_sample": avg("flops_per_sample"),
             "executed_loops_mean": avg("executed_loops_mean"),
             "executed_flops_per_sample": avg("executed_flops_per_sample"),
             "seconds": seconds, "judge_seconds": judge_s}
      rows.append(row)
      log(f"gen-ppl S={policy.label!s:<14} steps {n:<5} ppl {row['gen_ppl']:.3f}  entropy "
          f"{row['entropy']:.3f}  ({samples} samples, {seconds:.1f}s sampling, "
          f"{judge_s:.1f}s judge)")
      for i, g in enumerate(gen):
        lines.append({"loops": policy.label, "steps": n, "index": i,
                      "text": "\n\n".join(docs[i]), "documents": docs[i],
                      "judge_ppl": float(np.exp(sums[i] / max(counts[i], 1))),
                      "judge_tokens": int(counts[i]), "entropy": entropies[i],
                      "tokens": g.tolist()})
  if workdir:
    write_results(workdir, {**(header or {}), "judge": judge.path, "prompt": prompt,
                            "rows": rows}, lines)
  return rows


def write_results(workdir: str, result: dict, lines) -> tuple[str, str]:
  """WORKDIR/eval/gen_ppl.json and gen_ppl_samples.jsonl."""
  folder = os.path.join(workdir, "eval")
  os.makedirs(folder, exist_ok=True)
  samples_path = os.path.join(folder, "gen_ppl_samples.jsonl")
  with open(samples_path, "w", encoding="utf-8") as f:
    for line in lines:
      f.write(json.dumps(line, ensure_ascii=False) + "\n")
  path = os.path.join(folder, "gen_ppl.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump({**result, "samples_file": samples_path}, f, indent=2)
  tables.write_eval_tables(path, result.get("rows") or [])
  return path, samples_path
