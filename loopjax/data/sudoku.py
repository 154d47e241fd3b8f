"""Sudoku puzzles generated on the fly, deterministic from (seed, index).

Vocabulary: the digit d in 1..9 is token id d - 1 (ids 0..8, vocab_size 9); a board is 81
ids in row-major order (L = 81). `tokens` holds the full solution; given cells are
fixed=True / loss_mask=False, blank cells are loss_mask=True.

Solved grids are random relabellings of a base pattern under the validity-preserving
symmetries (digit permutation, row permutations inside bands, band permutation, the same
for columns/stacks, transpose): about 1.2e12 distinct grids. Givens are a uniformly random
subset of min_givens..max_givens cells, so a puzzle may have several solutions; accuracy
therefore counts a board as solved iff it is a valid Sudoku that agrees with the givens
(`board_accuracy`); `exact_board_accuracy` compares with the stored solution.
"""

from __future__ import annotations

import numpy as np

from loopjax.data import heldout
from loopjax.data.batch import make_row
from loopjax.data.tokenizers import CharTokenizer

SUDOKU_LEN = 81
SUDOKU_VOCAB_SIZE = 9
_TAG = 0x5D0C  # separates the Sudoku random stream from other tasks'
_MAX_TRIES = 10_000

_R, _C = np.meshgrid(np.arange(9), np.arange(9), indexing="ij")
_BASE = (3 * (_R % 3) + _R // 3 + _C) % 9  # a valid solved grid
_BOX = (_R // 3) * 3 + _C // 3


def sudoku_tokenizer() -> CharTokenizer:
  return CharTokenizer("123456789", name="sudoku")


def _band_perm(rng: np.random.Generator) -> np.ndarray:
  """A row order that keeps rows inside bands: permute bands, then rows in each band."""
  return np.concatenate([3 * b + rng.permutation(3) for b in rng.permutation(3)])


def random_solution(rng: np.random.Generator) -> np.ndarray:
  """A random valid solved grid as int32 [81] ids 0..8."""
  grid = _BASE[_band_perm(rng)][:, _band_perm(rng)]
  if rng.integers(2):
    grid = grid.T
  return rng.permutation(9)[grid].reshape(-1).astype(np.int32)


def sudoku_example(seed: int, index: int, *, min_givens: int, max_givens: int,
                   heldout_split: bool = False) -> dict[str, np.ndarray]:
  """Example `index` of the stream `seed`, from the train (or held-out) partition."""
  for attempt in range(_MAX_TRIES):
    rng = np.random.default_rng([_TAG, seed, index, attempt])
    solution = random_solution(rng)
    n = int(rng.integers(min_givens, max_givens + 1))
    fixed = np.zeros(SUDOKU_LEN, bool)
    fixed[rng.permutation(SUDOKU_LEN)[:n]] = True
    if heldout.is_heldout(b"sudoku", np.where(fixed, solution, -1)) == heldout_split:
      return make_row(solution, fixed=fixed, loss_mask=~fixed,
                      segment_ids=np.ones(SUDOKU_LEN, np.int32))
  raise RuntimeError("no Sudoku example found in the requested partition")


def valid_boards(grids) -> np.ndarray:
  """bool [...]: each row, column and 3x3 box of each [..., 81] board holds ids 0..8 once."""
  g = np.asarray(grids).reshape(*np.shape(grids)[:-1], 9, 9)
  want = np.arange(9)
  rows = np.all(np.sort(g, axis=-1) == want, axis=(-2, -1))
  cols = np.all(np.sort(g, axis=-2) == want[:, None], axis=(-2, -1))
  boxes = np.zeros(g.shape[:-2] + (9, 9), g.dtype)
  boxes[..., _BOX, _C % 3 + 3 * (_R % 3)] = g  # box b holds its 9 cells in row b
  box_ok = np.all(np.sort(boxes, axis=-1) == want, axis=(-2, -1))
  return rows & cols & box_ok


def check_board(grid) -> bool:
  """True iff one board (81 ids or 9x9) is a valid solved Sudoku."""
  return bool(valid_boards(np.asarray(grid).reshape(81)))


def sudoku_accuracy(pred, solution, fixed) -> dict[str, float]:
  """Accuracies of predicted boards [B, 81] against solutions and givens (`fixed`).

  cell_accuracy: fraction of blank (non-given) cells equal to the stored solution.
  board_accuracy: fraction of boards that are valid Sudokus agreeing with every given
    (the right notion when a puzzle has several solutions).
  exact_board_accuracy: fraction of boards equal to the stored solution.
  """
  pred, solution = np.asarray(pred), np.asarray(solution)
  fixed = np.asarray(fixed, bool)
  blanks = ~fixed
  cell = (pred == solution) & blanks
  keeps_givens = np.all((pred == solution) | blanks, axis=-1)
  return {
      "cell_accuracy": float(cell.sum() / max(blanks.sum(), 1)),
      "board_accuracy": float(np.mean(valid_boards(pred) & keeps_givens)),
      "exact_board_accuracy": float(np.mean(np.all(pred == solution, axis=-1))),
  }
