"""Masked-to-masked attention share against a direct NumPy computation."""

import numpy as np

from loopjax.evaluate.attention import layer_labels, masked_share
from loopjax.model import ModelConfig


def test_masked_share_matches_numpy():
  rng = np.random.default_rng(0)
  n, b, h, length = 3, 2, 4, 6
  logits = rng.normal(size=(n, b, h, length, length))
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  masked = rng.random((b, length)) < 0.5
  masked[:, 0] = True
  share, weight = masked_share(probs.astype(np.float32), masked)
  want = []
  for layer in range(n):
    vals = [probs[layer, bi, hi, q][masked[bi]].sum() for bi in range(b) for hi in range(h)
            for q in range(length) if masked[bi, q]]
    want.append(np.mean(vals))
  np.testing.assert_allclose(np.asarray(share), want, rtol=1e-5)
  assert float(weight) == masked.sum()


def test_uniform_attention_gives_the_masked_fraction():
  b, length = 1, 8
  probs = np.full((1, b, 2, length, length), 1.0 / length, np.float32)
  masked = np.array([[1, 1, 1, 0, 0, 0, 0, 0]], bool)
  share, _ = masked_share(probs, masked)
  np.testing.assert_allclose(np.asarray(share), [3 / 8], rtol=1e-6)


def test_layer_labels_follow_execution_order():
  cfg = ModelConfig(kernels="reference", num_layers=4, loop_start=1, loop_end=3, max_loops=3)
  labels = layer_labels(cfg, 2)
  assert labels == ["head 0", "loop 1 / layer 1", "loop 1 / layer 2", "loop 2 / layer 1",
                    "loop 2 / layer 2", "tail 3"]
  assert len(labels) == cfg.executed_depth(2)
