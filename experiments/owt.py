"""OpenWebText, length 1024, GPT-2 BPE: the paper's LoopMDM comparison.

Hardware and time: baseline 1M steps x batch 512 x 1024 tokens is a TPU-pod / multi-node GPU
job (weeks on 8xH100; check `loopjax flops` and `loopjax memory` first).

Data: token shards made once by `loopjax prepare` (nothing is downloaded). Bring OpenWebText as
local Parquet / JSONL / `datasets` Arrow files and GPT-2's tokenizer.json (in gpt2/), then
  loopjax prepare --input raw/owt --tokenizer hf:gpt2/tokenizer.json --out data/owt-gpt2 \
      --heldout 0.0125
  loopjax train --config experiments/owt.py:loopmdm --workdir runs/owt
Documents are joined with BOS/EOS separators and attend across each other (MDLM's wrap);
`--config.data.wrap=document` keeps attention inside documents.

Recipe: MDLM's (variants.paper_backbone; docs/recipe.md).

Variants: mdm, loopmdm, deep_mdm, uniform_loop, mdm_matched (loopjax/config/variants.py).
"""

from loopjax.config.base import base_config
from loopjax.config.variants import paper_backbone

BASELINE_STEPS = 1_000_000


def get_config(variant: str = "loopmdm"):
  c = base_config()
  c.data.update(source="prepared", path="data/owt-gpt2", tokenizer="hf:gpt2/tokenizer.json",
                wrap="mdlm")
  paper_backbone(c, vocab_size=50258, length=1024)
  # Steps are FLOP-matched with F_base = all forward FLOPs (the output head included); the
  # paper does not say which F_base it used: `loopjax flops --match` prints all three.
  c.variant.update(name=variant or "loopmdm", baseline_steps=BASELINE_STEPS,
                   flop_convention="all_forward")
  return c
