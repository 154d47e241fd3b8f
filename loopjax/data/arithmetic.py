"""Multi-digit arithmetic problems, deterministic from (seed, index).

Vocabulary (vocab_size 15): '0'..'9' -> ids 0..9, '+' 10, '-' 11, '*' 12, '=' 13, '_' 14 (pad).

Row layout for "123+45=168" with max_digits=3, ops="+" (answer_width 4, seq_len 12):

    1 2 3 + 4 5 = 1 6 8 _ _      tokens
    F F F F F F F . . . . F      fixed (F) = the prompt up to and including '=', and padding
    . . . . . . . S S S S .      loss_mask (S) = the answer field

The answer field starts right after '=' and is `answer_width(max_digits, ops)` cells wide:
the answer (a leading '-' when negative), then pads. The pads inside the field are scored, so
the model must predict where the answer ends and the unscored padding after the field (which
is clean and visible) does not reveal the answer's length. Operands have 1..max_digits digits
(the digit count is drawn uniformly, then the value).
"""

from __future__ import annotations

import numpy as np

from loopjax.data import heldout
from loopjax.data.batch import make_row
from loopjax.data.tokenizers import CharTokenizer

ARITH_ALPHABET = "0123456789+-*=_"
ARITH_VOCAB_SIZE = len(ARITH_ALPHABET)
PAD_ID = ARITH_ALPHABET.index("_")
_TAG = 0xA217
_MAX_TRIES = 10_000


def arithmetic_tokenizer() -> CharTokenizer:
  return CharTokenizer(ARITH_ALPHABET, pad="_", name="arithmetic")


def _check(max_digits: int, ops: str) -> None:
  if max_digits < 1:
    raise ValueError(f"data.max_digits must be >= 1, got {max_digits}")
  if not ops or set(ops) - set("+-*") or len(set(ops)) != len(ops):
    raise ValueError(f"data.ops must be distinct characters from '+-*', got {ops!r}")


def answer_width(max_digits: int, ops: str) -> int:
  """Cells in the answer field: enough for the longest possible answer."""
  _check(max_digits, ops)
  return max(2 * max_digits if "*" in ops else 0, max_digits + 1)


def required_seq_len(max_digits: int, ops: str) -> int:
  """Shortest seq_len holding the longest prompt plus the answer field."""
  return 2 * max_digits + 2 + answer_width(max_digits, ops)


def _operand(rng: np.random.Generator, max_digits: int) -> int:
  d = int(rng.integers(1, max_digits + 1))
  return int(rng.integers(0 if d == 1 else 10 ** (d - 1), 10 ** d))


def problem(seed: int, index: int, *, max_digits: int, ops: str,
            heldout_split: bool = False) -> tuple[str, str]:
  """(prompt, answer) strings, e.g. ("123+45=", "168"), from the requested partition."""
  _check(max_digits, ops)
  for attempt in range(_MAX_TRIES):
    rng = np.random.default_rng([_TAG, seed, index, attempt])
    a, b = _operand(rng, max_digits), _operand(rng, max_digits)
    op = ops[int(rng.integers(len(ops)))]
    prompt = f"{a}{op}{b}="
    if heldout.is_heldout(b"arithmetic", prompt) == heldout_split:
      value = a + b if op == "+" else a - b if op == "-" else a * b
      return prompt, str(value)
  raise RuntimeError(f"no arithmetic problem found in the requested partition (max_digits="
                     f"{max_digits}, ops={ops!r}: the problem space may be too small)")


def encode_problem(prompt: str, answer: str, *, seq_len: int, width: int):
  """A row in the batch format (see the module docstring)."""
  if len(prompt) + width > seq_len:
    raise ValueError(f"seq_len {seq_len} cannot hold {prompt!r} plus a {width}-cell answer")
  tok = arithmetic_tokenizer()
  ids = np.full(seq_len, PAD_ID, np.int32)
  ids[:len(prompt) + len(answer)] = tok.encode(prompt + answer)
  pos = np.arange(seq_len)
  scored = (pos >= len(prompt)) & (pos < len(prompt) + width)
  return make_row(ids, fixed=~scored, loss_mask=scored,
                  segment_ids=np.ones(seq_len, np.int32))


def arithmetic_example(seed: int, index: int, *, max_digits: int, ops: str, seq_len: int,
                       heldout_split: bool = False) -> dict[str, np.ndarray]:
  prompt, answer = problem(seed, index, max_digits=max_digits, ops=ops,
                           heldout_split=heldout_split)
  return encode_problem(prompt, answer, seq_len=seq_len,
                        width=answer_width(max_digits, ops))


def exact_match(pred, tokens, loss_mask) -> np.ndarray:
  """bool [B]: every scored position of `pred` equals `tokens` (the whole answer is right)."""
  pred, tokens = np.asarray(pred), np.asarray(tokens)
  return np.all((pred == tokens) | ~np.asarray(loss_mask, bool), axis=-1)


def decode(ids) -> str:
  """Row ids -> text without padding, e.g. '123+45=168'."""
  return arithmetic_tokenizer().decode(ids).replace("_", "")
