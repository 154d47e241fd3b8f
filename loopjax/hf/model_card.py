"""The export's model card (README.md), rendered from the export's config.json, the training
numbers the exporter computed and the run's eval/summary.json (if one exists).

The metadata block is built with huggingface_hub's card tools (`ModelCardData`, `EvalResult`):
license, language, datasets, library, tags and a model-index holding every number of the run's
eval/summary.json (one result per metric, loop policy and steps), which the Hub shows as the
model's evaluation results.
"""

from __future__ import annotations

import math
from typing import Any

PAPER = "arXiv 2605.26106"
CITATION = """@misc{loopmdm2026,
  title         = {Looped Diffusion Language Models},
  year          = {2026},
  eprint        = {2605.26106},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2605.26106}
}"""
TAGS = ["loopjax", "masked-diffusion", "diffusion-language-model", "looped-transformer",
        "custom_code"]


def _num(x: Any) -> str:
  if isinstance(x, bool) or x is None:
    return str(x)
  if isinstance(x, int):
    return f"{x:,}"
  if isinstance(x, float):
    return f"{x:.4g}"
  return str(x)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
  return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
          ["| " + " | ".join(_num(v) for v in row) + " |" for row in rows])


_EVAL_KEYS = ("bits_per_token", "ppl_bound", "loops_mean", "flops_per_sample", "nfe")


def eval_tables(summary: dict) -> list[str]:
  """One table per section of an eval summary: loop policy (and steps) x its quality numbers."""
  lines = []
  for section, title in (("likelihood", "Held-out likelihood"), ("tasks", "Task accuracy"),
                         ("gsm8k", "GSM8K-format exact match"),
                         ("zero_shot", "Zero-shot perplexity bound")):
    rows = summary.get(section) or []
    if not rows:
      continue
    keys = [k for k in rows[0] if k.endswith(("accuracy", "exact_match"))]
    keys += [k for k in _EVAL_KEYS if k in rows[0]]
    lead = [k for k in ("corpus", "loops", "steps") if k in rows[0]]
    lines += [f"### {title}", ""]
    lines += _table(lead + keys, [[(str(r[k]).rsplit("/", 1)[-1] if k == "corpus" else r.get(k))
                                   for k in lead + keys] for r in rows])
    lines.append("")
  return lines


def _setting(row: dict) -> str:
  parts = [f"S={row['loops']}"] if row.get("loops") is not None else []
  parts += [f"{row['steps']} steps"] if row.get("steps") else []
  return ", ".join(parts)


def eval_results(summary: dict | None, dataset: tuple[str, str]) -> list:
  """huggingface_hub EvalResults of an eval summary. dataset: (id, name) of the training data,
  where held-out likelihood and task accuracy are measured."""
  from huggingface_hub import EvalResult
  out = []

  def add(row, key, metric_type, label, task_type, task_name, data, split):
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      return
    out.append(EvalResult(task_type=task_type, task_name=task_name, dataset_type=data[0],
                          dataset_name=data[1], dataset_split=split, metric_type=metric_type,
                          metric_value=float(value),
                          metric_name=f"{label} ({_setting(row)})" if _setting(row) else label))

  summary = summary or {}
  for row in summary.get("likelihood") or []:
    add(row, "bits_per_token", "bits_per_token", "NELBO bits per token", "fill-mask",
        "Held-out likelihood (NELBO bound)", dataset, "held-out")
    add(row, "ppl_bound", "perplexity", "perplexity bound", "fill-mask",
        "Held-out likelihood (NELBO bound)", dataset, "held-out")
  for row in summary.get("tasks") or []:
    for key in [k for k in row if k.endswith(("accuracy", "exact_match"))]:
      add(row, key, "accuracy" if key.endswith("accuracy") else "exact_match",
          key.replace("_", " "), "text-generation", "Task accuracy", dataset, "held-out")
  for row in summary.get("gsm8k") or []:
    add(row, "exact_match", "exact_match", "exact match", "text-generation", "GSM8K",
        ("openai/gsm8k", "GSM8K"), "test")
  for row in summary.get("zero_shot") or []:
    corpus = str(row.get("corpus", "corpus")).rsplit("/", 1)[-1]
    add(row, "ppl_bound", "perplexity", "perplexity bound", "fill-mask",
        "Zero-shot perplexity (NELBO bound)", (corpus, corpus), "test")
  for row in summary.get("gen_ppl") or []:
    add(row, "gen_ppl", "perplexity", "generative perplexity", "text-generation",
        "Generative perplexity of samples", ("samples", "unconditional samples"), "generated")
  return out


def card_data(training: dict, eval_summary: dict | None, name: str, *,
              license: str = "other", language=None, datasets=None):
  """The card's metadata (`ModelCardData`). datasets: Hub dataset ids the model was trained
  on (the results' dataset; else the run's data source); language: ISO codes (None: none
  stated)."""
  from huggingface_hub import ModelCardData
  data_id = (datasets or [None])[0] or str(training.get("source") or "unknown")
  return ModelCardData(
      model_name=name, license=license, language=list(language) if language else None,
      datasets=list(datasets) if datasets else None, library_name="transformers",
      pipeline_tag="fill-mask", tags=list(TAGS),
      eval_results=eval_results(eval_summary, (data_id, str(training.get("dataset") or data_id)))
      or None)


def render(config: dict, training: dict, eval_summary: dict | None, name: str,
           **metadata) -> str:
  """README.md text. config: the export's config.json; training: {source, dataset, tokenizer,
  steps, batch_size, seq_len, tokens_seen, train_flops, train_loops} (None where unknown);
  metadata: `card_data`'s license, language, datasets."""
  from huggingface_hub import ModelCard
  data = card_data(training, eval_summary, name, **metadata)
  card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + _body(config, training, eval_summary,
                                                                name))
  return str(card)


def _body(config: dict, training: dict, eval_summary: dict | None, name: str) -> str:
  arch, loop, rep, w = (config["architecture"], config["loop"], config["parameter_report"],
                        config["weights"])
  kind = "LoopMDM (looped masked diffusion LM)" if loop["looped"] else "MDM (masked diffusion LM)"
  lines = [f"# {name}", "",
           f"A {kind} trained with loopjax and exported from step {_num(w.get('step'))} "
           f"({w.get('params')} weights, {w['dtype']}), the method of \"Looped Diffusion "
           f"Language Models\" ({PAPER}). The loop count S is chosen at call time: "
           "`model(input_ids, loops=S)`.", "", "## Architecture", ""]
  lines += _table(["field", "value"], [
      ["layers", arch["num_layers"]], ["width", arch["width"]], ["heads", arch["num_heads"]],
      ["MLP", f"{arch['mlp_type']}, ratio {arch['mlp_ratio']}"],
      ["vocabulary", f"{config['vocab_size']} + [MASK] (id {config['mask_id']})" + (
          f"; tables padded to {pad['output_columns']} columns / {pad['embedding_rows']} rows "
          "(padding sliced off the logits)" if (pad := config.get("vocab_padding") or {})
          and pad.get("multiple", 1) > 1 else "")],
      ["max length", arch["max_length"]], ["time conditioning", arch["time_conditioning"]],
      ["unique parameters", rep["unique_params"]],
      [f"non-looped model of the executed depth (S={rep['default_loops']})",
       f"{_num(rep['non_looped_same_depth_params'])} ({rep['ratio']:.2f}x)"]])
  lines += ["", "## Loop block", ""]
  if loop["looped"]:
    a, b = loop["block"]
    lines += [f"Layers [{a}, {b}) of {arch['num_layers']} form the looped block (stored once, run "
              f"S times); default S = {loop['default_loops']} (S_max of training), trained with "
              f"S ~ `{loop.get('train_loops')}`; input injection {loop['input_injection']}, "
              f"loop embedding {loop['loop_embedding']}. At the default S the model executes "
              f"{loop['executed_depth_at_default']} layers.", ""]
  else:
    lines += ["No looped block: a plain masked diffusion transformer (`loops` is ignored).", ""]
  lines += ["```"] + loop["execution"] + ["```", "", "## Training", ""]
  sched = config.get("noise_schedule") or {}
  lines += _table(["field", "value"], [
      ["data", training.get("source")], ["dataset", training.get("dataset")],
      ["tokenizer", training.get("tokenizer")], ["steps", training.get("steps")],
      ["batch size x sequence length",
       f"{_num(training.get('batch_size'))} x {_num(training.get('seq_len'))}"],
      ["tokens seen", training.get("tokens_seen")],
      ["training FLOPs (analytic, 3x forward)", training.get("train_flops")],
      ["loops during training", training.get("train_loops")],
      ["noise schedule", sched.get("schedule")]])
  lines += [""]
  if eval_summary:
    lines += ["## Evaluation", "", f"From the run's `loopjax eval` (checkpoint step "
              f"{_num(eval_summary.get('checkpoint_step'))}).", ""] + eval_tables(eval_summary)
  lines += ["## Use", "", "```python", "import torch",
            "from transformers import AutoModelForMaskedLM, AutoTokenizer",
            "model = AutoModelForMaskedLM.from_pretrained(PATH, trust_remote_code=True)",
            "tok = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)",
            "ids = tok('...', add_special_tokens=False, return_tensors='pt').input_ids",
            f"logits = model(ids, loops={loop['default_loops']}).logits  # any loops >= 1",
            "x = torch.full((1, model.config.max_position_embeddings), model.config.mask_id)",
            f"tokens, nfe = model.sample(x, steps=64, loops={loop['default_loops']})  "
            "# MDLM ancestral",
            "print(tok.batch_decode(tokens))", "```", "",
            "`model.sample` also decodes by confidence (`method=\"confidence\"`), stops loops "
            "adaptively (`adaptive_tau=`) and takes its random numbers from `noise=` (see "
            "loopjax's docs/hf_export.md). Without PyTorch, `loopjax.reference` computes the "
            "same logits with NumPy from config.json and model.safetensors.", "",
            "## Citation", "", "```bibtex", CITATION, "```", ""]
  return "\n".join(lines)
