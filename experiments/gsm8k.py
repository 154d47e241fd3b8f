"""GSM8K-format fine-tuning of a pretrained FineWeb-Edu / OpenWebText model (the paper's
downstream comparison): prompt = "Question: ...\\nAnswer:", answer = the worked solution ending in
"#### N", scored on the answer field only (loopjax/data/prompt_answer.py).

Each variant fine-tunes the pretrained run of the same variant (same architecture and loops):

  loopjax train --config experiments/gsm8k.py:loopmdm --workdir runs/gsm8k_loopmdm \\
      --config.train.init_from=runs/fineweb_loopmdm \\
      --config.data.paths=grade-school-math/grade_school_math/data/train.jsonl \\
      --config.data.tokenizer=hf:/path/to/gpt2/tokenizer.json
  loopjax eval --workdir runs/gsm8k_loopmdm --gsm8k .../data/test.jsonl --answer-len 256 \\
      --loops 1,4,12,24

Hardware and time: 170M parameters, length 512, batch 64; every variant spends the same
7.8e16 training FLOPs (`loopjax flops --config experiments/gsm8k.py:loopmdm --match
experiments/gsm8k.py:mdm`: mdm 3,000 steps, loopmdm 1,818), about 3-4 minutes on one H100 at
40% MFU (an estimate from that count, not a measurement). On CPU only tiny sizes are practical.

Data (never downloaded by loopjax): train.jsonl and test.jsonl from
https://github.com/openai/grade-school-math (grade_school_math/data/); 500 training pairs are
held out for the NELBO evaluation during training (data.eval_examples).

The fine-tuning recipe (steps, lr, batch) is a starting point chosen here, not the paper's;
steps are FLOP-matched across variants by the same rule as pretraining.

Variants: mdm, loopmdm, deep_mdm, uniform_loop, mdm_matched (loopjax/config/variants.py).
"""

from loopjax.config.base import base_config
from loopjax.config.variants import paper_backbone

BASELINE_STEPS = 3_000


def get_config(variant: str = "loopmdm"):
  c = base_config()
  paper_backbone(c, vocab_size=50258, length=1024)  # the pretrained model's architecture
  c.data.update(source="prompt_answer", paths="grade-school-math/train.jsonl",
                prompt_field="question", answer_field="answer",
                prompt_template="Question: {question}\nAnswer:", seq_len=512, answer_len=256,
                eval_examples=500, tokenizer="hf:gpt2/tokenizer.json")
  c.train.update(batch_size=64, lr=3e-5, lr_schedule="cosine", warmup_steps=100,
                 ema_decay=0.999, log_every=50, checkpoint_every=500, eval_every=500,
                 eval_batches=4)
  c.variant.update(name=variant or "loopmdm", baseline_steps=BASELINE_STEPS)
  return c
