"""Zero-shot perplexity: the NELBO bound of a run on local corpora, at every loop policy.

`loopjax eval --corpus NAME=PATH` reads a corpus the user supplies (.txt / .jsonl / .parquet),
applies the detokenizer of NAME (loopjax/data/detokenizers.py: ptb, wikitext, lm1b, lambada,
ag_news, pubmed, arxiv; a bare PATH is read as is), tokenizes every document with the run's
tokenizer (EOS appended) and scores all of it (`--corpus-rows 0`, the default), packed by
data/packing.py in one of the row layouts training uses:

  document  `data.wrap=document`, and `data.packing` with `data.document_attention`. Runs
            trained one padded document per row are scored this way too: attention sees the
            same document either way.
  concat    `data.packing` without `data.document_attention`.
  mdlm      `data.wrap=mdlm`.
The layout follows the run's data config (`run_layout`) unless `--corpus-layout` names one.
The last row is padded (padding fixed, unscored). The result is one row per corpus x policy and
a table corpus x S of the perplexity bound, written to WORKDIR/eval/zero_shot.json.
"""

from __future__ import annotations

import os

import numpy as np

from loopjax.data import packing
from loopjax.data.batch import make_row, stack_rows
from loopjax.data.corpus import first_field
from loopjax.data.detokenizers import corpus_recipe
from loopjax.data.text import encode_document, read_documents
from loopjax.data.tokenizers import bos_id, fill_id
from loopjax.evaluate.likelihood import heldout_nelbo

LAYOUTS = packing.LAYOUTS
_PROGRESS_BATCHES = 16  # a progress line after every this many batches of a long corpus


def parse_corpus(spec: str) -> tuple[str | None, str]:
  """`NAME=PATH` -> (NAME, PATH) with NAME a known corpus; a bare PATH -> (None, PATH)."""
  name, sep, path = spec.partition("=")
  if not sep or os.path.exists(spec):
    name, path = None, spec
  else:
    corpus_recipe(name)
    name = name.strip().lower()
  if not os.path.isfile(os.path.expanduser(path)):
    raise FileNotFoundError(f"--corpus {spec}: file {path!r} does not exist")
  return name, path


def run_layout(data_cfg) -> str:
  """The row layout the run was trained with (see the module docstring)."""
  get = data_cfg.get
  if get("source") == "prepared":
    return "mdlm" if get("wrap", "mdlm") == "mdlm" else "document"
  if get("source") in ("text", "tfds") and get("packing", False):
    return "document" if get("document_attention", True) else "concat"
  return "document"


def read_corpus(name: str | None, path: str) -> list[str]:
  """The documents of one corpus file, detokenized with NAME's recipe (None: as read)."""
  path = os.path.expanduser(path)
  if name is None:
    return read_documents([path])
  recipe = corpus_recipe(name)
  docs = read_documents([path], text_field=first_field(path, recipe.fields),
                        txt_split=recipe.txt_split)
  return docs if recipe.detokenizer is None else [recipe.detokenizer(d) for d in docs]


def corpus_batches(docs, tokenizer, *, seq_len: int, batch_size: int, layout: str,
                   max_rows: int = 0) -> list[dict]:
  """Evaluation batches of the documents `docs` (strings) in `layout`; the last batch is
  completed with filler rows that score nothing (one compiled shape)."""
  ids = [encode_document(tokenizer, d) for d in docs]
  pad = fill_id(tokenizer)
  rows = packing.pack_documents(ids, seq_len=seq_len, layout=layout, pad_id=pad,
                                bos_id=bos_id(tokenizer), eos_id=tokenizer.eos_id,
                                max_rows=max_rows)
  if not rows:
    raise ValueError("the corpus holds no tokens")
  filler = make_row(np.full(seq_len, pad, np.int32), fixed=np.ones(seq_len, bool),
                    loss_mask=np.zeros(seq_len, bool), segment_ids=np.zeros(seq_len, np.int32))
  rows += [filler] * (-len(rows) % batch_size)
  return [stack_rows(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


def corpus_nelbo(model, params, batches, *, schedule, loops, time_points, seed: int = 0,
                 log=None, label: str = "") -> dict:
  """`heldout_nelbo` over many batches in pieces (a progress line after each piece); batch k
  draws its noise from seed + k as in one call."""
  total, count, out = 0.0, 0, None
  for k in range(0, len(batches), _PROGRESS_BATCHES):
    part = batches[k:k + _PROGRESS_BATCHES]
    out = heldout_nelbo(model, params, part, schedule=schedule, loops=loops,
                        time_points=time_points, seed=seed + k)
    total += out["nats_per_token"] * out["tokens"]
    count += out["tokens"]
    if log and len(batches) > _PROGRESS_BATCHES:
      log(f"  {label} batches {min(k + _PROGRESS_BATCHES, len(batches))}/{len(batches)}")
  nats = total / max(count, 1)
  return {**out, "nats_per_token": nats, "bits_per_token": nats / np.log(2.0),
          "ppl_bound": float(np.exp(nats)), "tokens": int(count)}


def zero_shot_eval(model, params, config, corpora, specs, *, schedule, tokenizer,
                   batch_size: int = 64, time_points: int = 8, max_rows: int = 0,
                   layout: str = "auto", seed: int = 0, log=print) -> dict:
  """Zero-shot perplexity bound of every corpus (`NAME=PATH` or `PATH` specs) at every policy.

  Returns {"layout", "rows": one dict per corpus x policy, "table": {"metric", "columns" (the
  policies), "rows" {corpus: [ppl_bound per policy]}}}.
  """
  parsed = [parse_corpus(c) for c in corpora]
  layout = run_layout(config.data) if layout == "auto" else layout
  if layout not in LAYOUTS:
    raise ValueError(f"--corpus-layout must be auto or one of {LAYOUTS}, got {layout!r}")
  seq_len = int(config.data.seq_len)
  packing.check_layout(layout, seq_len=seq_len, bos_id=bos_id(tokenizer),
                       eos_id=tokenizer.eos_id, key="--corpus-layout")
  rows, table = [], {}
  for name, path in parsed:
    docs = read_corpus(name, path)
    label = name or os.path.basename(path)
    if label in table:  # a second file of the same name or corpus: its path tells them apart
      label = path
    batches = corpus_batches(docs, tokenizer, seq_len=seq_len, batch_size=batch_size,
                             layout=layout, max_rows=max_rows)
    scored = sum(int(np.asarray(b["loss_mask"]).any(-1).sum()) for b in batches)  # no filler
    log(f"corpus {label}: {len(docs)} documents, scoring {scored} rows of {seq_len} "
        f"({layout} layout{', --corpus-rows ' + str(max_rows) if max_rows else ''})")
    for s in specs:
      row = {"corpus": label, "path": path, "detokenizer": name, "layout": layout,
             "documents": len(docs), **corpus_nelbo(model, params, batches, schedule=schedule,
                                                    loops=s, time_points=time_points,
                                                    seed=seed, log=log, label=f"{label} S={s}")}
      rows.append(row)
      table.setdefault(label, []).append(row["ppl_bound"])
      log(f"corpus {label:<10} S={s:<10} ppl<= {row['ppl_bound']:.3f}  ({row['tokens']} tokens)")
  columns = [str(r["loops"]) for r in rows[:len(specs)]]
  log("zero-shot ppl bound  " + "  ".join(f"S={c:>8}" for c in columns))
  for label, values in table.items():
    log(f"  {label:<18} " + "  ".join(f"{v:10.3f}" for v in values))
  return {"layout": layout, "rows": rows,
          "table": {"metric": "ppl_bound", "columns": columns, "rows": table}}
