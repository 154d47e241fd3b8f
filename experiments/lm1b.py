"""LM1B, length 128, bert-base-uncased tokenizer: the paper's LoopMDM comparison.

Hardware and time: the paper budget (baseline 1M steps x batch 512) is a TPU-pod / multi-node
GPU job (days on a v4-64 / 8xH100 class system). Shrink with --config.train.batch_size,
--config.train.steps for a smoke run.

Data: token shards made once by `loopjax prepare` from the raw LM1B release (nothing is
downloaded) and bert-base-uncased's tokenizer.json (in bert-base-uncased/):
  loopjax prepare --input R/training-monolingual.tokenized.shuffled \
      --heldout-input R/heldout-monolingual.tokenized.shuffled --format txt --txt-split line \
      --heldout 0 --tokenizer hf:bert-base-uncased/tokenizer.json --out data/lm1b-bert
  loopjax train --config experiments/lm1b.py:loopmdm --workdir runs/lm1b
(R: the unpacked 1-billion-word-language-modeling-benchmark-r13output folder.) Sentences are
joined with BOS/EOS separators (MDLM's wrap); `--config.data.wrap=document` isolates them.

Recipe: MDLM's (variants.paper_backbone; docs/recipe.md).

Variants (--config experiments/lm1b.py:VARIANT): mdm, loopmdm, deep_mdm, uniform_loop,
mdm_matched (see loopjax/config/variants.py; step counts are FLOP-matched by loopjax.flops).
"""

from loopjax.config.base import base_config
from loopjax.config.variants import paper_backbone

BASELINE_STEPS = 1_000_000


def get_config(variant: str = "loopmdm"):
  c = base_config()
  c.data.update(source="prepared", path="data/lm1b-bert",
                tokenizer="hf:bert-base-uncased/tokenizer.json", wrap="mdlm")
  paper_backbone(c, vocab_size=30522, length=128, dropout=0.1)
  # Steps are FLOP-matched with F_base = all forward FLOPs (the output head included); the
  # paper does not say which F_base it used: `loopjax flops --match` prints all three.
  c.variant.update(name=variant or "loopmdm", baseline_steps=BASELINE_STEPS,
                   flop_convention="all_forward")
  return c
