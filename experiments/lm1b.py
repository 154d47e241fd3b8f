"""LM1B, length 128, bert-base-uncased tokenizer: the paper's LoopMDM comparison.

Hardware and time: the paper budget (baseline 1M steps x batch 512) is a TPU-pod / multi-node
GPU job (days on a v4-64 / 8xH100 class system). Shrink with --config.train.batch_size,
--config.train.steps for a smoke run.

Data (never downloaded by loopjax unless data.download=True):
  tfds build lm1b --data_dir=$TFDS_DIR --file_format=array_record
  a bert-base-uncased tokenizer.json saved locally, passed as
  --config.data.tokenizer=hf:/path/to/bert-base-uncased/tokenizer.json
  --config.data.data_dir=$TFDS_DIR

Variants (--config experiments/lm1b.py:VARIANT): mdm, loopmdm, deep_mdm, uniform_loop,
mdm_matched (see loopjax/train/variants.py; step counts are FLOP-matched by loopjax.flops).
"""

from loopjax.train.config import base_config
from loopjax.train.variants import paper_backbone

BASELINE_STEPS = 1_000_000


def get_config(variant: str = "loopmdm"):
  c = base_config()
  c.data.update(source="tfds", name="lm1b", split="train", eval_split="test", text_field="text",
                packing=True, tokenizer="hf:bert-base-uncased/tokenizer.json")
  paper_backbone(c, vocab_size=30522, length=128, dropout=0.1)
  c.variant.update(name=variant or "loopmdm", baseline_steps=BASELINE_STEPS)
  return c
