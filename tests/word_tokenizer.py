"""Tiny Hugging Face tokenizers written by tests (one whitespace-separated word per id)."""

import os


def word_level_tokenizer(folder, words) -> str:
  """Writes FOLDER/tokenizer.json: a WordLevel tokenizer with id i for words[i] (words[0] the
  unknown token) that splits on whitespace; returns its path."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  path = os.path.join(str(folder), "tokenizer.json")
  tok.save(path)
  return path
