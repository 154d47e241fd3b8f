"""Tiny Hugging Face tokenizers written by tests (one whitespace-separated word per id), and a
tiny random GPT-2 judge that reads them."""

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


def tiny_gpt2(folder, tokenizer_file, vocab_size: int) -> str:
  """Saves a randomly initialised one-layer GPT-2 with a 16-token context and the word-level
  tokenizer (<unk> 0, <pad> 1, </s> 2 = BOS = EOS) in FOLDER; returns FOLDER. Needs torch and
  transformers."""
  import torch
  import transformers
  d = str(folder)
  transformers.PreTrainedTokenizerFast(
      tokenizer_file=str(tokenizer_file), unk_token="<unk>", pad_token="<pad>",
      eos_token="</s>").save_pretrained(d)
  cfg = transformers.GPT2Config(vocab_size=vocab_size, n_positions=16, n_embd=32, n_layer=1,
                                n_head=2, bos_token_id=2, eos_token_id=2, pad_token_id=1)
  torch.manual_seed(0)
  transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
  return d
