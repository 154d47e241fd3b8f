"""Bad input stops with a one-line error that names the problem, never a traceback."""

import pytest

from loopjax import data as D
from loopjax.data.tokenizers import make_tokenizer


def _sudoku_cfg():
  cfg = D.default_data_config()
  cfg.update(source="sudoku", seq_len=81)
  return cfg


def test_iterator_state_is_a_copy():
  it = D.make_train_iterator(_sudoku_cfg(), global_batch_size=4, seed=0)
  next(it)
  state = it.get_state()
  state["fingerprint"]["global_batch_size"] = 999
  state["grain"].clear()
  again = it.get_state()
  assert again["fingerprint"]["global_batch_size"] == 4 and again["grain"]
  it.close()


@pytest.mark.parametrize("spec, file, message", [
    ("sentencepiece", "x.model", "is not a SentencePiece model file"),
    ("hf", "tokenizer.json", "is not a Hugging Face tokenizer.json"),
])
def test_corrupt_tokenizer_file(tmp_path, spec, file, message):
  (tmp_path / file).write_text("not a tokenizer")
  with pytest.raises(ValueError, match=message):
    make_tokenizer(f"{spec}:{tmp_path / file}")
