"""The export's model card (README.md), rendered from the export's config.json, the training
numbers the exporter computed and the run's eval/summary.json (if one exists)."""

from __future__ import annotations

from typing import Any


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


def render(config: dict, training: dict, eval_summary: dict | None, name: str) -> str:
  """README.md text. config: the export's config.json; training: {source, dataset, tokenizer,
  steps, batch_size, seq_len, tokens_seen, train_flops, train_loops} (None where unknown)."""
  arch, loop, rep, w = (config["architecture"], config["loop"], config["parameter_report"],
                        config["weights"])
  kind = "LoopMDM (looped masked diffusion LM)" if loop["looped"] else "MDM (masked diffusion LM)"
  lines = ["---", "library_name: transformers", "pipeline_tag: fill-mask",
           "tags: [loopjax, masked-diffusion, looped-transformer]", "---", "",
           f"# {name}", "",
           f"A {kind} trained with loopjax and exported from step {_num(w.get('step'))} "
           f"({w.get('params')} weights, {w['dtype']}). The loop count S is chosen at call time: "
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
  lines += ["## Use", "", "```python",
            "from transformers import AutoModelForMaskedLM, AutoTokenizer",
            "model = AutoModelForMaskedLM.from_pretrained(PATH, trust_remote_code=True)",
            "tok = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)",
            "ids = tok('...', add_special_tokens=False, return_tensors='pt').input_ids",
            f"logits = model(ids, loops={loop['default_loops']}).logits  # any loops >= 1",
            "```", "", "Sampling with the MDLM ancestral sampler: see loopjax's "
            "docs/hf_export.md. Without PyTorch, `loopjax.reference` computes the same logits "
            "with NumPy from config.json and model.safetensors.", ""]
  return "\n".join(lines)
