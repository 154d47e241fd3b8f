"""Train/held-out partitions that do not depend on any seed.

Synthetic tasks (Sudoku, arithmetic) split their example space by a hash of the example's
content: an example is held out iff its hash falls in a fixed 1/HELDOUT_MODULUS bucket.
Training streams reject held-out examples and evaluation streams keep only them, so the two
are disjoint whatever seeds the trainer uses. Local text corpora hold out a fixed set of
documents chosen by a constant-seed permutation.
"""

from __future__ import annotations

import hashlib

import numpy as np

HELDOUT_MODULUS = 16  # 1/16 of the synthetic example space is reserved for evaluation.
_DOC_SPLIT_SEED = 20260526  # constant: the held-out documents never depend on run seeds.


def is_heldout(*parts: bytes | np.ndarray | str) -> bool:
  """True iff the example made of `parts` belongs to the held-out partition."""
  h = hashlib.blake2b(digest_size=8)
  for p in parts:
    if isinstance(p, str):
      p = p.encode()
    elif isinstance(p, np.ndarray):
      p = np.ascontiguousarray(p).tobytes()
    h.update(p)
    h.update(b"\x1f")
  return int.from_bytes(h.digest(), "little") % HELDOUT_MODULUS == 0


def split_documents(num_docs: int, num_heldout: int) -> tuple[np.ndarray, np.ndarray]:
  """(train_indices, heldout_indices) of a corpus; both sorted, disjoint, seed-free."""
  if not 0 <= num_heldout < num_docs:
    raise ValueError(
        f"cannot hold out {num_heldout} of {num_docs} documents for evaluation: need "
        f"0 <= data.eval_examples < number of documents ({num_docs})")
  perm = np.random.default_rng(_DOC_SPLIT_SEED).permutation(num_docs)
  return np.sort(perm[num_heldout:]), np.sort(perm[:num_heldout])
