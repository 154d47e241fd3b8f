"""FineWeb-Edu, length 1024, GPT-2 BPE: the paper's LoopMDM comparison.

Hardware and time: as experiments/owt.py (baseline 1M steps x batch 512 x 1024 tokens).

Data (never downloaded by loopjax): FineWeb-Edu parquet shards saved locally, read as local files:
  --config.data.paths=/data/fineweb-edu/000.parquet,/data/fineweb-edu/001.parquet
  a GPT-2 tokenizer.json saved locally: --config.data.tokenizer=hf:/path/to/gpt2/tokenizer.json

Variants: mdm, loopmdm, deep_mdm, uniform_loop, mdm_matched (loopjax/train/variants.py).
"""

from loopjax.train.config import base_config
from loopjax.train.variants import paper_backbone

BASELINE_STEPS = 1_000_000


def get_config(variant: str = "loopmdm"):
  c = base_config()
  c.data.update(source="text", paths="fineweb-edu/000.parquet", text_field="text",
                packing=True, eval_examples=10_000,
                tokenizer="hf:gpt2/tokenizer.json")
  paper_backbone(c, vocab_size=50258, length=1024)
  c.variant.update(name=variant or "loopmdm", baseline_steps=BASELINE_STEPS)
  return c
