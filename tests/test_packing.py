"""One packing rule for every source: the text source's grain rows, the prepared source's packing
slots and zero-shot scoring's rows are the same rows for the same documents, and all of them are
the rows of an independent reference (the whole stream concatenated, then sliced)."""

import grain
import numpy as np
import pytest

from loopjax.data import packing, prepared

EOS, PAD, BOS = 60, 61, 62


def reference_rows(docs, *, seq_len, layout):
  """The layouts as slices of the concatenated stream: rows of seq_len (mdlm: seq_len - 2 between
  BOS and EOS); a document's number in a row counts from the row's first token's document."""
  stream = np.concatenate(docs)
  doc_of = np.repeat(np.arange(len(docs)), [d.size for d in docs])
  per = seq_len - 2 if layout == "mdlm" else seq_len
  rows = []
  for r in range(-(-stream.size // per)):
    chunk, owner = stream[r * per:(r + 1) * per], doc_of[r * per:(r + 1) * per]
    seg = owner - owner[0] + 1 if layout == "document" else np.ones(chunk.size, np.int64)
    if layout == "mdlm":
      chunk, seg = np.concatenate([[BOS], chunk, [EOS]]), np.ones(chunk.size + 2, np.int64)
    tokens, segments = np.full(seq_len, PAD), np.zeros(seq_len, np.int64)
    tokens[:chunk.size], segments[:chunk.size] = chunk, seg
    rows.append({"tokens": tokens, "segment_ids": segments, "fixed": segments == 0,
                 "loss_mask": segments > 0})
  return rows


def _docs(seed=0, sizes=(5, 12, 3, 20, 7, 9, 1, 16)):
  rng = np.random.default_rng(seed)
  return [np.append(rng.integers(0, 50, n), EOS).astype(np.int32) for n in sizes]


def _assert_rows(got, want, what):
  assert len(got) == len(want), what
  for r, (a, b) in enumerate(zip(got, want)):
    for k in ("tokens", "segment_ids", "fixed", "loss_mask"):
      np.testing.assert_array_equal(a[k], b[k], err_msg=f"{what}: row {r} {k}")


def _prepared_rows(docs, *, seq_len, wrap, n):
  """The first n rows of one prepared-source packing slot reading `docs` (given without EOS:
  the slot appends it)."""
  it = iter(prepared.PackedRows(grain.MapDataset.source([d[:-1] for d in docs]), slots=[0],
                                stride=1, seq_len=seq_len, wrap=wrap, bos_id=BOS, eos_id=EOS,
                                vocab_size=BOS + 1, limit=len(docs)))
  return [{k: v[0] for k, v in next(it).items()} for _ in range(n)]


@pytest.mark.parametrize("seq_len", [4, 8, 11])
def test_three_paths_make_the_same_rows(seq_len):
  docs = _docs()
  for layout in packing.LAYOUTS:
    want = reference_rows(docs, seq_len=seq_len, layout=layout)
    got = packing.pack_documents(docs, seq_len=seq_len, layout=layout, pad_id=PAD, bos_id=BOS,
                                 eos_id=EOS)
    _assert_rows(got, want, f"zero-shot {layout} L={seq_len}")
    if layout != "mdlm":  # the text and tfds sources' grain packing
      grain_rows = list(packing.packed_stream(grain.MapDataset.source(docs), seq_len=seq_len,
                                              pad_id=PAD, document_attention=layout == "document"))
      _assert_rows(grain_rows, want, f"text source {layout} L={seq_len}")
    if layout != "concat":  # a prepared slot makes only full rows: all but the last
      full = len(want) - 1
      _assert_rows(_prepared_rows(docs, seq_len=seq_len, wrap=layout, n=full), want[:full],
                   f"prepared {layout} L={seq_len}")


def test_the_stream_ends_in_one_short_row():
  docs = _docs(sizes=(5, 6))  # 13 stream tokens
  rows = packing.pack_documents(docs, seq_len=8, layout="mdlm", pad_id=PAD, bos_id=BOS,
                                eos_id=EOS)
  assert len(rows) == 3  # 6 + 6 + 1 stream tokens
  np.testing.assert_array_equal(rows[-1]["tokens"], [BOS, EOS, EOS] + [PAD] * 5)
  assert rows[-1]["fixed"].tolist() == [False] * 3 + [True] * 5
  assert len(packing.pack_documents(docs, seq_len=8, layout="mdlm", pad_id=PAD, bos_id=BOS,
                                    eos_id=EOS, max_rows=2)) == 2
  assert packing.pack_documents([], seq_len=8, layout="document", pad_id=PAD) == []
  with pytest.raises(IndexError, match="ran out of documents"):  # prepared rows are never short
    _prepared_rows(docs, seq_len=8, wrap="mdlm", n=3)


def test_packing_state_resumes_mid_document():
  """A slot's state is (document, tokens emitted); restoring it continues the same rows."""
  docs = _docs(seed=1)
  ds = prepared.PackedRows(grain.MapDataset.source([d[:-1] for d in docs]), slots=[0, 1],
                           stride=2, seq_len=5, wrap="document", bos_id=BOS, eos_id=EOS,
                           vocab_size=BOS + 1, limit=len(docs))
  it = iter(ds)
  next(it)
  state = it.get_state()
  assert state["offset"] != [0, 0]  # mid-document in at least one slot
  want = next(it)
  again = iter(ds)
  again.set_state(state)
  for k, v in next(again).items():
    np.testing.assert_array_equal(v, want[k], err_msg=k)


def test_bad_layouts_fail_with_the_key_and_fix():
  with pytest.raises(ValueError, match=r"layout must be one of .*'wrapped'"):
    packing.pack_documents(_docs(), seq_len=8, layout="wrapped", pad_id=PAD)
  with pytest.raises(ValueError, match="mdlm needs .*BOS and EOS; use the document layout"):
    packing.pack_documents(_docs(), seq_len=8, layout="mdlm", pad_id=PAD, eos_id=EOS)
  with pytest.raises(ValueError, match=r"data.wrap=mdlm needs data.seq_len >= 3 \(got 2\)"):
    prepared.PackedRows(grain.MapDataset.source([]), slots=[0], stride=1, seq_len=2,
                        wrap="mdlm", bos_id=BOS, eos_id=EOS, vocab_size=BOS + 1)
