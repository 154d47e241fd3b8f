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
from loopjax.train.variants import apply_variant

BASELINE_STEPS = 1_000_000


def get_config(variant: str = "loopmdm"):
  c = base_config()
  c.data.update(source="tfds", name="openwebtext", split="train[:-100000]",
                eval_split="train[-100000:]", text_field="text", seq_len=1024, packing=True,
                tokenizer="hf:gpt2/tokenizer.json")
  c.model.update(vocab_size=50258, max_length=1024, width=768, num_layers=12, num_heads=12,
                 cond_dim=128, dtype="bfloat16", remat="dots_no_batch")
  c.train.update(batch_size=512, lr=3e-4, warmup_steps=2500, lr_schedule="constant",
                 weight_decay=0.0, ema_decay=0.9999, log_every=100, checkpoint_every=10_000,
                 eval_every=10_000, eval_batches=8)
  return apply_variant(c, variant or "loopmdm", baseline_steps=BASELINE_STEPS)
