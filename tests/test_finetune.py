"""Fine-tuning: experiments/gsm8k.py's data source and `train.init_from`, at a tiny size."""

import json
import os

import jax
import numpy as np
import pytest

from loopjax.config.load import load_config
from loopjax.evaluate.sweep import run_eval
from loopjax.train.loop import train
from loopjax.io.load import load_model_dir
from tiny import MODEL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The suite's tiny model (tests/tiny.py) on GSM8K-style rows of bytes.
TINY = [*MODEL, "--config.model.vocab_size=0", "--config.model.dtype=float32",
        "--config.data.tokenizer=byte", "--config.data.seq_len=64", "--config.data.answer_len=32",
        "--config.data.eval_examples=4", "--config.train.batch_size=4",
        "--config.train.eval_batches=1", "--config.train.eval_time_points=2",
        "--config.train.async_checkpoints=False", "--config.train.log_every=1",
        "--config.train.warmup_steps=0"]


def _config(pairs, *extra):
  return load_config(os.path.join(ROOT, "experiments", "gsm8k.py") + ":loopmdm",
                     [*TINY, f"--config.data.paths={pairs}", *extra])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("finetune")
  pairs = tmp / "train.jsonl"
  pairs.write_text("".join(json.dumps({"question": f"What is {i} + 2?",
                                       "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}) + "\n"
                           for i in range(40)), encoding="utf-8")
  train(_config(pairs, "--config.train.steps=3"), str(tmp / "pre"))
  return tmp, str(pairs)


def test_init_from_starts_from_the_source_weights(pretrained):
  tmp, pairs = pretrained
  # lr 0: no update moves the weights, so the fine-tuned run must end on the source's EMA.
  out = train(_config(pairs, "--config.train.steps=2", "--config.train.lr=0.0",
                      f"--config.train.init_from={tmp / 'pre'}"), str(tmp / "ft"))
  source = load_model_dir(str(tmp / "pre")).params
  got = jax.device_get(out["state"].params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, jax.device_get(source))
  assert np.isfinite(out["metrics"]["loss"])
  assert int(out["state"].step) == 2  # a new run: step 0 + 2, fresh optimizer
  # The fine-tuned run is evaluated in its training layout (answer_len 32 from its config).
  summary = run_eval(str(tmp / "ft"), {"gsm8k": {"file": pairs, "limit": 4}}, loops=("2",),
                     batch_size=4)
  (row,) = summary["gsm8k"]
  assert row["examples"] == 4 and row["steps"] == 32
  # The score is the one of the generations it shows (all 4 are shown).
  assert row["exact_match"] == np.mean([s["pred"] == s["gold"] for s in row["samples"]])


def test_init_from_refuses_other_architectures_and_missing_paths(pretrained):
  tmp, pairs = pretrained
  with pytest.raises(ValueError, match="do not fit this model"):
    train(_config(pairs, "--config.model.width=48", f"--config.train.init_from={tmp / 'pre'}"),
          str(tmp / "wide"))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    train(_config(pairs, f"--config.train.init_from={tmp / 'nowhere'}"), str(tmp / "none"))
  assert not os.path.exists(tmp / "wide" / "checkpoints") or not os.listdir(
      tmp / "wide" / "checkpoints")
