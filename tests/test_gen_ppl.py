"""Generative perplexity: the judge's scorer against a direct transformers computation, its EOS
and piece rules, the unigram entropy, clear errors, and `loopjax eval --gen-ppl` end to end on a
tiny exported model (random weights) judged by a tiny random GPT-2 built here."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loopjax.errors import UserError
from loopjax.evaluate import gen_ppl
from word_tokenizer import tiny_gpt2, word_level_tokenizer

WORDS = ["<unk>", "<pad>", "</s>"] + [f"w{i}" for i in range(13)]  # 16 ids


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
  return word_level_tokenizer(tmp_path_factory.mktemp("tok"), WORDS)


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory, tokenizer_file):
  """A randomly initialised one-layer GPT-2 with a 16-token context and its tokenizer."""
  pytest.importorskip("torch", reason="the gen-PPL judge runs on torch "
                      "(pip install loopjax[torch])")
  pytest.importorskip("transformers", reason="the gen-PPL judge is a transformers model "
                      "(pip install loopjax[torch])")
  return tiny_gpt2(tmp_path_factory.mktemp("judge"), tokenizer_file, len(WORDS))


@pytest.fixture(scope="module")
def judge(judge_dir):
  return gen_ppl.load_judge(judge_dir)


def _text(rng, n):
  return " ".join(f"w{i}" for i in rng.integers(0, 13, n))


def test_scorer_gives_the_judge_own_perplexity(judge):
  """Texts fed directly: the token-weighted mean NLL of transformers' own loss, exponentiated;
  a text longer than the context is scored piece by piece (each piece on its own)."""
  import torch
  rng = np.random.default_rng(0)
  texts = [_text(rng, 5), _text(rng, 11), _text(rng, 40)]
  got = gen_ppl.judge_perplexity(judge, texts, batch_size=2)
  nll, count = 0.0, 0
  for t in texts:
    ids = torch.tensor([judge.tokenizer(t)["input_ids"]])
    for piece in torch.split(ids, 16, dim=1):
      with torch.no_grad():
        loss = judge.model(input_ids=piece, labels=piece).loss  # mean over piece length - 1
      nll += float(loss) * (piece.shape[1] - 1)
      count += piece.shape[1] - 1
  assert got["tokens"] == count == 4 + 10 + (15 + 15 + 7)
  assert got["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_eos_after_the_first_is_not_scored(judge):
  """MDLM's rule: every token but the piece's first, and no EOS after the sample's first one;
  the prompt (context) is not scored."""
  eos = judge.eos_id
  seq = [3, 4, eos, 5, eos, eos]
  sums, counts = gen_ppl.score_sequences(judge, [seq, seq[:3]], batch_size=2)
  assert counts.tolist() == [5 - 2, 2]  # padding of the shorter row is never scored
  ids, first = gen_ppl.judge_sequence(judge, ["w1 w2", "w3"], context="w0 w0")
  assert ids == [3, 3, 4, 5, eos, 6] and first == 2
  assert gen_ppl.score_sequences(judge, [ids], [first])[1].tolist() == [4]


def test_unigram_entropy():
  assert gen_ppl.unigram_entropy([7] * 50) == 0.0
  assert gen_ppl.unigram_entropy([1, 2, 3, 4] * 5) == pytest.approx(math.log(4))
  assert gen_ppl.unigram_entropy([1, 1, 1, 2]) == pytest.approx(
      -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_clear_errors_for_a_bad_judge(tmp_path, monkeypatch):
  with pytest.raises(UserError, match="not a local model folder.*nor a Hub model id"):
    gen_ppl.load_judge(str(tmp_path / "no_such_folder"))
  (tmp_path / "config.json").write_text("{}")
  monkeypatch.setitem(__import__("sys").modules, "torch", None)
  with pytest.raises(UserError, match=r"pip install loopjax\[torch\]"):
    gen_ppl.load_judge(str(tmp_path))


def test_eval_gen_ppl_writes_the_table_and_samples(tmp_path, judge_dir, tokenizer_file, capsys):
  from loopjax.io import export
  from loopjax.cli import main
  from loopjax.model import LoopedTransformer, ModelConfig
  from loopjax.config.base import base_config
  cfg = ModelConfig(kernels="reference",
                    vocab_size=len(WORDS), max_length=24, width=32, num_layers=2, num_heads=2,
                    cond_dim=16, loop_start=1, loop_end=2, max_loops=3)
  shapes = jax.eval_shape(LoopedTransformer(cfg).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 24), jnp.int32), 1)["params"]
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape),
                                                        a.dtype), shapes)
  run = base_config()
  run.data.update(source="text", tokenizer=f"hf:{tokenizer_file}", seq_len=24)
  out = str(tmp_path / "export")
  export.export_params(out, cfg, params, run_config=run, source={"params": "ema", "step": 1})
  capsys.readouterr()
  rc = main(["eval", "--workdir", out, "--no-nelbo", "--gen-ppl", judge_dir, "--samples", "3",
             "--steps", "6", "--loops", "1,2,adaptive:0.5:1:3", "--batch-size", "2"])
  stdout = capsys.readouterr().out
  assert rc == 0
  # Beside the export folder, never into it.
  result = json.load(open(os.path.join(out + ".outputs", "eval", "gen_ppl.json")))
  assert os.path.exists(os.path.join(out + ".outputs", "eval", "gen_ppl.md"))
  rows = result["rows"]
  assert [(r["steps"], r["loops"]) for r in rows] == [(6, 1), (6, 2), (6, "adaptive:0.5:1:3")]
  assert [r["loops_mean"] for r in rows[:2]] == [1, 2] and 1 <= rows[2]["loops_mean"] <= 3
  for r in rows:
    assert r["samples"] == 3 and r["sampler"] == "ancestral" and r["nfe"] <= 6
    assert 1 < r["gen_ppl"] < 1e6 and r["judge_tokens"] >= 3 * 15
    assert 0 <= r["entropy"] <= math.log(24)
  lines = [json.loads(x) for x in open(result["samples_file"])]
  assert len(lines) == 9 and {len(x["tokens"]) for x in lines} == {24}
  # the row's entropy is the mean of its samples' entropies, recomputed from their token ids
  first = [x for x in lines if x["loops"] == 1]
  assert rows[0]["entropy"] == pytest.approx(
      np.mean([gen_ppl.unigram_entropy(x["tokens"]) for x in first]))
  assert all(set(x["text"].split()) <= set(WORDS) for x in lines)
  assert stdout.count("gen-ppl S=") == 3
