"""Hub names where a user types them: a tokenizer (`data.tokenizer=hf:ID` or a bare `ID`) and a
gen-PPL judge (`--gen-ppl ID`) resolve from a Hugging Face cache built here, offline; with an
empty cache and HF_HUB_OFFLINE=1 each fails in one line naming the id; a local path wins over a
Hub id of the same spelling. Nothing is downloaded."""

import json

import numpy as np
import pytest

from hub_cache import cache_repo, use_cache
from loopjax.data.tokenizers import make_tokenizer
from loopjax.errors import UserError
from word_tokenizer import tiny_gpt2, word_level_tokenizer

WORDS = ["<unk>", "<pad>", "</s>"] + [f"w{i}" for i in range(13)]


@pytest.fixture
def cache(tmp_path, monkeypatch):
  d = tmp_path / "hub"
  d.mkdir()
  use_cache(monkeypatch, d)
  return d


@pytest.fixture(scope="module")
def tok_folder(tmp_path_factory):
  d = tmp_path_factory.mktemp("tok")
  word_level_tokenizer(d, WORDS)
  return d


def test_tokenizer_by_hub_id_from_the_cache(cache, tok_folder):
  commit = cache_repo(cache, "tiny-org/words", tok_folder)
  cache_repo(cache, "words-base", tok_folder)
  for spec in ("hf:tiny-org/words", "words-base"):
    tok = make_tokenizer(spec)
    assert tok.encode("w3 w0 w12") == [6, 3, 15] and tok.vocab_size == 16
    assert tok.eos_id == 2 and tok.pad_id == 1
  d = make_tokenizer("hf:tiny-org/words").describe()
  assert d["spec"] == "hf:tiny-org/words"
  assert d["hub"] == {"repo_id": "tiny-org/words", "revision": commit}


def test_a_repository_without_tokenizer_json_is_read_by_transformers(cache, tmp_path,
                                                                      monkeypatch):
  """vocab.json + merges.txt only (a GPT-2-style repository): transformers reads them and its
  fast backend becomes the tokenizer.json loopjax uses, kept under HF_HOME/loopjax."""
  pytest.importorskip("transformers", reason="loopjax[torch]")
  from huggingface_hub import constants
  monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf_home"))
  repo = tmp_path / "bpe"
  repo.mkdir()
  (repo / "vocab.json").write_text(json.dumps(
      {"<|endoftext|>": 0, "a": 1, "b": 2, "\u0120": 3, "ab": 4, "\u0120a": 5}))
  (repo / "merges.txt").write_text("#version: 0.2\na b\n\u0120 a\n")
  (repo / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "GPT2Tokenizer", "eos_token": "<|endoftext|>",
       "unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}))
  (repo / "config.json").write_text(json.dumps({"model_type": "gpt2"}))  # AutoTokenizer reads it
  cache_repo(cache, "tiny-org/bpe", repo)
  tok = make_tokenizer("hf:tiny-org/bpe")
  assert tok.encode("ab a") == [4, 5] and tok.decode([4, 5]) == "ab a"
  assert tok.eos_id == 0 and tok.vocab_size == 6
  assert tok.path == str(tmp_path / "hf_home" / "loopjax" / "tokenizers" / "tiny-org--bpe" /
                         "tokenizer.json")


def test_uncached_hub_ids_fail_in_one_line_naming_the_id(cache):
  with pytest.raises(UserError) as e:
    make_tokenizer("hf:tiny-org/absent")
  msg = str(e.value)
  assert "\n" not in msg and "'tiny-org/absent'" in msg and "tokenizer.json" in msg
  assert "HF_HUB_OFFLINE is set" in msg and "hf download tiny-org/absent tokenizer.json" in msg
  with pytest.raises(UserError, match="'bert-base-uncased'.*HF_HUB_OFFLINE"):
    make_tokenizer("bert-base-uncased")


def test_a_local_path_wins_over_a_hub_id(cache, tok_folder, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "words").mkdir()
  word_level_tokenizer(tmp_path / "words", ["<unk>", "x"])
  assert make_tokenizer("hf:words/tokenizer.json").vocab_size == 2  # no cache entry needed
  assert make_tokenizer("hf:words").vocab_size == 2  # the folder, though it reads as an id
  with pytest.raises(FileNotFoundError, match="does not exist"):
    make_tokenizer("hf:missing/tokenizer.json")  # a file name is never taken for an id


@pytest.fixture(scope="module")
def judge_folder(tmp_path_factory, tok_folder):
  pytest.importorskip("torch", reason="the judge runs on torch (loopjax[torch])")
  pytest.importorskip("transformers", reason="loopjax[torch]")
  return tiny_gpt2(tmp_path_factory.mktemp("judge"), tok_folder / "tokenizer.json", len(WORDS))


def test_judge_by_hub_id_from_the_cache(cache, judge_folder):
  from loopjax.evaluate import gen_ppl
  cache_repo(cache, "tiny-org/gpt2-judge", judge_folder)
  by_id = gen_ppl.load_judge("tiny-org/gpt2-judge")
  local = gen_ppl.load_judge(judge_folder)
  assert by_id.path == "tiny-org/gpt2-judge" and by_id.context == 16 and by_id.eos_id == 2
  texts = ["w1 w2 w3 w4", "w5 w5 w6 </s> w7 w8 w9 w10 w11 w12 w0 w1 w2 w3 w4 w5 w6"]
  got, want = gen_ppl.judge_perplexity(by_id, texts), gen_ppl.judge_perplexity(local, texts)
  assert got["tokens"] == want["tokens"] > 0
  np.testing.assert_allclose(got["ppl"], want["ppl"], rtol=1e-6)


def test_uncached_judge_fails_in_one_line_naming_the_id(cache):
  pytest.importorskip("transformers", reason="loopjax[torch]")
  from loopjax.evaluate import gen_ppl
  with pytest.raises(UserError) as e:
    gen_ppl.load_judge("gpt2-large")
  msg = str(e.value)
  assert "\n" not in msg and "'gpt2-large'" in msg and "HF_HUB_OFFLINE is set" in msg
  assert "`hf download gpt2-large`" in msg  # the whole repository
