"""A checkpoint resumes with another number of processes: each process's data position is
re-derived from the step, so the continuation trains on the same examples as the saved layout's
own continuation, for every data source, and what cannot continue exactly is refused.

In-process, per source; the end-to-end resume of a two-process job's checkpoint by one process
(of two devices, bitwise; of one device) shares test_preemption.py's job set.
"""

import json

import numpy as np
import pytest

from loopjax import data as D
from loopjax.data import reshard
from loopjax.data.prepare import write_tokenized
from loopjax.data.process_rows import make_shards_iterator

G, K = 4, 3  # global batch, steps consumed before the checkpoint


def _source(kind, tmp):
  if kind == "sudoku":
    return dict(source="sudoku")
  if kind == "prepared":
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, rng.integers(1, 30)) for _ in range(60)]
    out = str(tmp / "corpus")
    write_tokenized(out, docs, "byte", heldout_every=10, shard_tokens=500)
    return dict(source="prepared", path=out, seq_len=16, prefetch=0)
  path = tmp / "docs.txt"
  path.write_text("\n\n".join(f"doc {i} " + "word " * (i % 9 + 1) for i in range(40)))
  return dict(source="text", paths=str(path), seq_len=16, eval_examples=4,
              packing=kind == "packed text", prefetch=0)


def _open(cfg, shards):
  c = D.default_data_config()
  c.update(cfg)
  return make_shards_iterator(c, global_batch_size=G, seed=0, shards=shards)


def _saved_states(cfg, layout):
  """Every shard state of a run of `layout` (shards per process) after K steps, as JSON."""
  states = []
  for shards in layout:
    it = _open(cfg, shards)
    for _ in range(K):
      next(it)
    states += reshard.shard_states(json.loads(json.dumps(it.get_state())))
    it.close()
  return states


@pytest.mark.parametrize("kind", ["sudoku", "text", "packed text", "prepared",
                                  "prepared, saved by grain workers"])
def test_rederived_position_continues_the_stream_on_any_layout(kind, tmp_path):
  cfg = _source(kind.split(",")[0], tmp_path)
  ref = _open(cfg, [(0, 1)])
  want = [next(ref) for _ in range(K + 2)][K:]  # global batches K+1, K+2
  ref.close()
  layouts = [[[(0, 2)], [(1, 2)]], [[(0, 4), (2, 4)], [(1, 4), (3, 4)]]]
  for saved_layout in layouts[:1] if "workers" in kind else layouts:
    # Two grain worker processes per saving process; the continuation runs none.
    saved = _saved_states(dict(cfg, workers=2) if "workers" in kind else cfg, saved_layout)
    # One process for all rows; a process of non-adjacent shards (rows 0 and 3).
    for shards, rows in (([(0, 1)], [0, 1, 2, 3]), ([(0, 4), (3, 4)], [0, 3])):
      it = _open(cfg, shards)
      mine = it.get_state()
      new = reshard.rederive(saved, reshard.shard_states(mine), global_batch_size=G, step=K)
      it.set_state(dict(mine, shards=new) if "shards" in mine else new[0])
      for w in want:
        got = next(it)
        for k in D.BATCH_KEYS:
          np.testing.assert_array_equal(got[k], w[k][rows], err_msg=f"{kind} {shards} {k}")
      it.close()


def test_rederive_refuses_what_cannot_continue_exactly(tmp_path):
  cfg = _source("sudoku", tmp_path)
  saved = _saved_states(cfg, [[(0, 2)], [(1, 2)]])
  it = _open(cfg, [(0, 1)])
  fresh = reshard.shard_states(it.get_state())
  it.close()
  with pytest.raises(reshard.ResumeLayoutError, match="global batch size 4, this run has 8"):
    reshard.rederive(saved, [dict(f, fingerprint=dict(f["fingerprint"], global_batch_size=8))
                             for f in fresh], global_batch_size=8, step=K)
  with pytest.raises(reshard.ResumeLayoutError, match="stands at batch 3, not at the"):
    reshard.rederive(saved, fresh, global_batch_size=G, step=K + 1)
  with pytest.raises(reshard.ResumeLayoutError, match="cover 2 distinct rows"):
    reshard.rederive(saved[:1], fresh, global_batch_size=G, step=K)
  other = [dict(f, fingerprint=dict(f["fingerprint"], seed=7)) for f in fresh]
  with pytest.raises(reshard.ResumeLayoutError, match="seed: saved 0 vs now 7"):
    reshard.rederive(saved, other, global_batch_size=G, step=K)
  workers = [dict(s, grain={"workers_state": {}}) for s in saved]
  with pytest.raises(reshard.ResumeLayoutError, match="not per row"):
    reshard.rederive(workers, fresh, global_batch_size=G, step=K)
