"""OpenWebText, length 1024, GPT-2 BPE: the paper's LoopMDM comparison.

Hardware and time: baseline 1M steps x batch 512 x 1024 tokens is a TPU-pod / multi-node GPU
job (weeks on 8xH100; check `loopjax flops` and `loopjax memory` first).

Data (never downloaded by loopjax unless data.download=True):
  tfds build openwebtext --data_dir=$TFDS_DIR --file_format=array_record
  (or local .jsonl/.parquet shards: --config.data.source=text --config.data.paths=a.parquet,...)
  a GPT-2 tokenizer.json saved locally: --config.data.tokenizer=hf:/path/to/gpt2/tokenizer.json

Variants: mdm, loopmdm, deep_mdm, uniform_loop, mdm_matched (loopjax/train/variants.py).
"""

from loopjax.train.config import base_config
from loopjax.train.variants import paper_backbone

BASELINE_STEPS = 1_000_000


def get_config(variant: str = "loopmdm"):
  c = base_config()
  c.data.update(source="tfds", name="openwebtext", split="train[:-100000]",
                eval_split="train[-100000:]", text_field="text", packing=True,
                tokenizer="hf:gpt2/tokenizer.json")
  paper_backbone(c, vocab_size=50258, length=1024)
  c.variant.update(name=variant or "loopmdm", baseline_steps=BASELINE_STEPS)
  return c
