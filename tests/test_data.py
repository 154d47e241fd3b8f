"""Tests for loopjax.data: tasks, text files, tokenizers, TFDS failure path, grain pipelines."""

import json
import time

import numpy as np
import pytest

from loopjax import data as D
from loopjax.data import arithmetic, heldout, sudoku, text
from loopjax.data.batch import stack_rows

# ---------------------------------------------------------------- helpers


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y) == sorted(D.BATCH_KEYS)
    for k in D.BATCH_KEYS:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _concat(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in D.BATCH_KEYS}


def _corpus(tmp_path, n=60, name="corpus.txt"):
  """A .txt corpus of n distinct paragraphs of varied length."""
  docs = [f"doc {i:03d}:" + "abcdefg"[: i % 7] * (1 + i % 3) for i in range(n)]
  path = tmp_path / name
  path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
  return str(path), docs


def _text_cfg(path, **kw):
  cfg = D.default_data_config()
  cfg.update({**dict(source="text", paths=str(path), seq_len=16, eval_examples=6), **kw})
  return cfg


def _pairs(tmp_path, n=60, name="pairs.jsonl"):
  """A GSM8K-format JSONL file of n question/answer pairs of varied length."""
  rows = [{"question": f"What is {i} + {i % 7}?",
           "answer": f"{i} + {i % 7} = {i + i % 7}" + "." * (i % 5) + f"\n#### {i + i % 7}"}
          for i in range(n)]
  path = tmp_path / name
  path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
  return str(path), rows


def _pairs_cfg(path, **kw):
  cfg = D.default_data_config()
  cfg.update({**dict(source="prompt_answer", paths=str(path), seq_len=64, answer_len=32,
                     eval_examples=6), **kw})
  return cfg


def _sudoku_cfg(**kw):
  cfg = D.default_data_config()
  cfg.update(kw)
  return cfg


def _arith_cfg(**kw):
  cfg = D.default_data_config()
  cfg.update({**dict(source="arithmetic", max_digits=3, ops="+-*", seq_len=16), **kw})
  return cfg


# ---------------------------------------------------------------- sudoku


def test_sudoku_grids_valid_and_givens_consistent():
  rows = [sudoku.sudoku_example(7, i, min_givens=20, max_givens=30) for i in range(200)]
  batch = stack_rows(rows)
  D.validate_batch(batch, vocab_size=D.SUDOKU_VOCAB_SIZE, seq_len=81)
  assert D.valid_boards(batch["tokens"]).all()
  n_givens = batch["fixed"].sum(1)
  assert n_givens.min() >= 20 and n_givens.max() <= 30 and len(set(n_givens)) > 3
  np.testing.assert_array_equal(batch["loss_mask"], ~batch["fixed"])
  assert len({r["tokens"].tobytes() for r in rows}) == 200  # grids actually vary
  # The checker rejects a broken board: swapping two different cells in a row breaks columns.
  g = rows[0]["tokens"].copy()
  assert D.check_board(g)
  g[0], g[1] = g[1], g[0]
  assert not D.check_board(g)
  bad_box = np.tile(np.arange(9), 9)  # rows valid, columns and boxes not
  assert not D.check_board(bad_box)


def test_sudoku_accuracy_counts_alternative_solutions():
  row = sudoku.sudoku_example(3, 0, min_givens=30, max_givens=30)
  sol, fixed = row["tokens"][None], row["fixed"][None]
  perfect = D.sudoku_accuracy(sol, sol, fixed)
  assert perfect == {"cell_accuracy": 1.0, "board_accuracy": 1.0, "exact_board_accuracy": 1.0}
  # A relabelled grid is a valid Sudoku; with no givens it solves the empty puzzle.
  relabel = np.roll(np.arange(9), 1)[sol]
  acc = D.sudoku_accuracy(relabel, sol, np.zeros_like(fixed))
  assert acc["board_accuracy"] == 1.0 and acc["exact_board_accuracy"] == 0.0
  assert acc["cell_accuracy"] == 0.0
  # ... but not a puzzle whose givens it contradicts.
  assert D.sudoku_accuracy(relabel, sol, fixed)["board_accuracy"] == 0.0
  # One wrong blank cell out of 51.
  wrong = sol.copy()
  cell = int(np.flatnonzero(~fixed[0])[0])
  wrong[0, cell] = (wrong[0, cell] + 1) % 9
  acc = D.sudoku_accuracy(wrong, sol, fixed)
  assert acc["cell_accuracy"] == pytest.approx(50 / 51) and acc["board_accuracy"] == 0.0


# ---------------------------------------------------------------- arithmetic


def test_arithmetic_rows_are_correct_and_masked():
  cfg = _arith_cfg()
  it = D.make_train_iterator(cfg, global_batch_size=64, seed=0)
  b = next(it)
  D.validate_batch(b, vocab_size=D.data_vocab_size(cfg), seq_len=16)
  width = arithmetic.answer_width(3, "+-*")
  assert width == 6
  for r in range(64):
    s = arithmetic.decode(b["tokens"][r])
    prompt, answer = s.split("=")
    assert str(eval(prompt)) == answer, s  # noqa: S307 (digits and + - * only)
    eq = len(prompt)
    np.testing.assert_array_equal(b["fixed"][r, : eq + 1], True)
    np.testing.assert_array_equal(b["loss_mask"][r, eq + 1 : eq + 1 + width], True)
    assert b["loss_mask"][r].sum() == width and not b["loss_mask"][r, eq + 1 + width :].any()
  assert set("+-*") <= {c for r in b["tokens"] for c in arithmetic.decode(r)}
  ok = D.arithmetic_exact_match(b["tokens"], b["tokens"], b["loss_mask"])
  assert ok.all()
  pred = b["tokens"].copy()
  pos = np.argmax(b["loss_mask"][0])
  pred[0, pos] = (pred[0, pos] + 1) % 10
  pred[1, ~b["loss_mask"][1]] = 0  # unscored positions do not count
  ok = D.arithmetic_exact_match(pred, b["tokens"], b["loss_mask"])
  assert not ok[0] and ok[1:].all()


def test_arithmetic_seq_len_too_short():
  assert arithmetic.required_seq_len(3, "+-*") == 14  # "999*999=" + 6-cell answer field
  D.make_train_iterator(_arith_cfg(seq_len=14), global_batch_size=2, seed=0)
  with pytest.raises(ValueError, match="at least 14"):
    D.make_train_iterator(_arith_cfg(seq_len=13), global_batch_size=2, seed=0)


def test_synthetic_eval_disjoint_from_training():
  # 100 distinct problems: training sees nearly all of its partition in 40 batches.
  cfg = _arith_cfg(max_digits=1, ops="+", seq_len=6)
  it = D.make_train_iterator(cfg, global_batch_size=32, seed=0)
  train = {arithmetic.decode(r) for b in _take(it, 40) for r in b["tokens"]}
  evals = {arithmetic.decode(r) for b in D.make_eval_batches(
      cfg, batch_size=8, num_batches=2, seed=0) for r in b["tokens"]}
  assert len(train) > 50 and evals and not train & evals
  assert all(heldout.is_heldout(b"arithmetic", s.split("=")[0] + "=") for s in evals)
  # Sudoku: eval puzzles come from the held-out partition, training puzzles never do.
  scfg = _sudoku_cfg()
  tr = next(D.make_train_iterator(scfg, global_batch_size=16, seed=1))
  ev = D.make_eval_batches(scfg, batch_size=16, num_batches=1, seed=1)[0]
  part = lambda b: [heldout.is_heldout(b"sudoku", np.where(f, t, -1))  # noqa: E731
                    for t, f in zip(b["tokens"], b["fixed"])]
  assert not any(part(tr)) and all(part(ev))


# ---------------------------------------------------------------- pipeline behaviour

_SOURCES = ["sudoku", "arithmetic", "text", "text_packed", "prompt_answer"]


def _cfg_for(kind, tmp_path):
  if kind == "sudoku":
    return _sudoku_cfg()
  if kind == "arithmetic":
    return _arith_cfg()
  if kind == "prompt_answer":
    return _pairs_cfg(_pairs(tmp_path)[0])
  path, _ = _corpus(tmp_path)
  return _text_cfg(path, packing=kind == "text_packed")


@pytest.mark.parametrize("kind", _SOURCES)
def test_determinism(kind, tmp_path):
  cfg = _cfg_for(kind, tmp_path)
  a = _take(D.make_train_iterator(cfg, global_batch_size=4, seed=5), 3)
  b = _take(D.make_train_iterator(cfg, global_batch_size=4, seed=5), 3)
  _assert_batches_equal(a, b)
  c = _take(D.make_train_iterator(cfg, global_batch_size=4, seed=6), 3)
  assert any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))
  cfg.shuffle_seed = 5  # the config's seed overrides the argument
  _assert_batches_equal(a, _take(D.make_train_iterator(cfg, global_batch_size=4, seed=9), 3))


@pytest.mark.parametrize("kind", _SOURCES)
def test_resume_from_json_state(kind, tmp_path):
  cfg = _cfg_for(kind, tmp_path)
  it = D.make_train_iterator(cfg, global_batch_size=4, seed=0)
  _take(it, 5)
  state = it.get_state()
  saved = json.dumps(state)
  assert json.loads(saved) == state  # plain JSON, no tuples or NumPy scalars
  expected = _take(it, 3)
  fresh = D.make_train_iterator(cfg, global_batch_size=4, seed=0)
  fresh.set_state(json.loads(saved))
  _assert_batches_equal(expected, _take(fresh, 3))


def test_resume_through_grain_checkpoint_handler(tmp_path):
  # The trainer saves the iterator with Orbax through grain's handler (one JSON per process).
  from etils import epath
  from grain import checkpoint as grain_ckpt
  cfg = _cfg_for("text_packed", tmp_path)
  it = D.make_train_iterator(cfg, global_batch_size=4, seed=0)
  _take(it, 3)
  handler = grain_ckpt.CheckpointHandler()
  (tmp_path / "ckpt").mkdir()  # Orbax creates the step directory before calling the handler
  handler.save(epath.Path(tmp_path / "ckpt"), args=grain_ckpt.CheckpointSave(it))
  assert (tmp_path / "ckpt" / "process_0-of-1.json").exists()
  expected = _take(it, 2)
  fresh = D.make_train_iterator(cfg, global_batch_size=4, seed=0)
  handler.restore(epath.Path(tmp_path / "ckpt"), args=grain_ckpt.CheckpointRestore(fresh))
  _assert_batches_equal(expected, _take(fresh, 2))


def test_resume_rejects_other_pipeline(tmp_path):
  it = D.make_train_iterator(_sudoku_cfg(), global_batch_size=4, seed=0)
  next(it)
  other = D.make_train_iterator(_sudoku_cfg(), global_batch_size=8, seed=0)
  with pytest.raises(ValueError, match="global_batch_size: saved 4 vs now 8"):
    other.set_state(it.get_state())


@pytest.mark.parametrize("kind", _SOURCES)
def test_process_sharding(kind, tmp_path):
  cfg = _cfg_for(kind, tmp_path)
  one = _take(D.make_train_iterator(cfg, global_batch_size=8, seed=3), 3)
  parts = [_take(D.make_train_iterator(cfg, global_batch_size=8, seed=3, process_index=p,
                                       process_count=2), 3) for p in range(2)]
  for step in range(3):
    local = [parts[p][step] for p in range(2)]
    assert local[0]["tokens"].shape == (4, cfg.seq_len)
    _assert_batches_equal([one[step]], [_concat(local)])
    rows0 = {r.tobytes() for r in local[0]["tokens"]}
    assert not rows0 & {r.tobytes() for r in local[1]["tokens"]}
  ev1 = D.make_eval_batches(cfg, batch_size=4, num_batches=1, seed=0)
  ev2 = [D.make_eval_batches(cfg, batch_size=4, num_batches=1, seed=0, process_index=p,
                             process_count=2)[0] for p in range(2)]
  _assert_batches_equal(ev1, [_concat(ev2)])


def test_batch_not_divisible_by_processes():
  with pytest.raises(ValueError, match="not divisible"):
    D.make_train_iterator(_sudoku_cfg(), global_batch_size=6, seed=0, process_count=4)


def test_unknown_config_key():
  cfg = _sudoku_cfg()
  cfg.unlock()
  cfg.seqlen = 81
  with pytest.raises(ValueError, match="seqlen"):
    D.data_vocab_size(cfg)


# ---------------------------------------------------------------- text and packing


def _reference_pack(docs, seq_len, eos):
  """Independent concat-and-chunk: (tokens, segment_ids) rows for docs in order."""
  toks, owner = [], []
  for d, doc in enumerate(docs):
    ids = list(doc.encode()) + [eos]
    toks += ids
    owner += [d] * len(ids)
  rows = []
  for s in range(0, len(toks) - seq_len + 1, seq_len):
    o = owner[s : s + seq_len]
    seg = np.cumsum([1] + [int(a != b) for a, b in zip(o, o[1:])])
    rows.append((np.array(toks[s : s + seq_len]), seg))
  return rows


def test_packing_hand_made_corpus(tmp_path):
  docs = ["ab", "cde", "f", "ghij", "k", "lmnop", "qr", "s", "tuv", "w", "xyz", "0123", "45",
          "6789", "AB", "C", "DEFG", "HI", "JKL", "M"]  # all shorter than a row
  path = tmp_path / "tiny.jsonl"
  path.write_text("\n".join(json.dumps({"text": d}) for d in docs), encoding="utf-8")
  cfg = _text_cfg(str(path), packing=True, seq_len=7, eval_examples=0, shuffle_seed=11)
  import grain
  order = list(grain.MapDataset.source(docs).shuffle(seed=11))  # the epoch-0 doc order
  assert sorted(order) == sorted(docs)
  # Two packing slots: row 0 of each batch packs docs 0, 2, 4, ... and row 1 docs 1, 3, ...
  batches = _take(D.make_train_iterator(cfg, global_batch_size=2, seed=0), 3)
  for slot in range(2):
    want = _reference_pack(order[slot::2], seq_len=7, eos=256)[:3]
    assert len(want) == 3
    for step, (tokens, seg) in enumerate(want):
      np.testing.assert_array_equal(batches[step]["tokens"][slot], tokens)
      np.testing.assert_array_equal(batches[step]["segment_ids"][slot], seg)
  for b in batches:
    assert b["loss_mask"].all() and not b["fixed"].any()  # no padding inside a stream
  cfg.document_attention = False
  flat = next(D.make_train_iterator(cfg, global_batch_size=2, seed=0))
  np.testing.assert_array_equal(flat["tokens"], batches[0]["tokens"])
  assert (flat["segment_ids"] == 1).all()


def test_packing_state_without_remainder_round_trips(tmp_path):
  # Every document fills a row exactly (7 bytes + EOS = 8), so the packer holds no remainder:
  # its state has the empty-slice sentinel, which JSON turns from a tuple into a list.
  docs = [f"doc{i:04d}" for i in range(20)]
  path = tmp_path / "exact.txt"
  path.write_text("\n".join(docs), encoding="utf-8")
  cfg = _text_cfg(str(path), txt_split="line", packing=True, seq_len=8, eval_examples=2)
  it = D.make_train_iterator(cfg, global_batch_size=1, seed=0)
  _take(it, 2)
  state = json.loads(json.dumps(it.get_state()))
  assert "[-1, -1]" in json.dumps(state)
  expected = _take(it, 4)
  fresh = D.make_train_iterator(cfg, global_batch_size=1, seed=0)
  fresh.set_state(state)
  _assert_batches_equal(expected, _take(fresh, 4))


def test_unpacked_text_rows_and_heldout_documents(tmp_path):
  path, docs = _corpus(tmp_path, n=30)
  cfg = _text_cfg(path, seq_len=14)
  tok = D.tokenizer_for(cfg)
  b = next(D.make_train_iterator(cfg, global_batch_size=8, seed=0))
  D.validate_batch(b, vocab_size=tok.vocab_size, seq_len=14)
  for r in range(8):
    n = int(b["loss_mask"][r].sum())
    assert (b["segment_ids"][r] == (np.arange(14) < n)).all()
    assert b["fixed"][r, n:].all() and not b["fixed"][r, :n].any()
    assert tok.decode(b["tokens"][r, :n]) in {d[:n] for d in docs}
  it = D.make_train_iterator(cfg, global_batch_size=8, seed=0)
  seen = {tok.decode(r[:13]) for bb in _take(it, 20) for r in bb["tokens"]}
  evals = {tok.decode(r[:13]) for r in D.make_eval_batches(
      cfg, batch_size=3, num_batches=2, seed=0)[0]["tokens"]}
  assert len(seen) == 24 and len(evals) == 3 and not seen & evals
  with pytest.raises(ValueError, match="only 6 rows"):
    D.make_eval_batches(cfg, batch_size=4, num_batches=2, seed=0)


def test_packed_eval_pads_last_row(tmp_path):
  path, _ = _corpus(tmp_path, n=30)
  cfg = _text_cfg(path, packing=True, seq_len=32, eval_examples=3)
  docs = D.read_documents([path])
  held = [docs[i] for i in heldout.split_documents(len(docs), 3)[1]]
  total = sum(len(d.encode()) + 1 for d in held)
  rows = -(-total // 32)
  ev = D.make_eval_batches(cfg, batch_size=rows, num_batches=1, seed=0)[0]
  assert ev["loss_mask"].sum() == total
  last = ev["segment_ids"][-1]
  assert (last == 0).any() and ev["fixed"][-1][last == 0].all()


def test_file_formats(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  (tmp_path / "a.txt").write_text("first para\nstill first\n\n \n\nsecond\n", encoding="utf-8")
  (tmp_path / "b.jsonl").write_text('{"body": "j1"}\n\n{"body": "j2"}\n', encoding="utf-8")
  pq.write_table(pa.table({"body": ["p1", "", "p2"]}), tmp_path / "c.parquet")
  got = D.read_documents([str(tmp_path / "a.txt")])
  assert got == ["first para\nstill first", "second"]
  assert D.read_documents([str(tmp_path / "a.txt")], txt_split="line") == [
      "first para", "still first", "second"]
  got = D.read_documents([str(tmp_path / "b.jsonl"), str(tmp_path / "c.parquet")],
                         text_field="body")
  assert got == ["j1", "j2", "p1", "p2"]
  with pytest.raises(ValueError, match="line 1: no text field 'text'"):
    D.read_documents([str(tmp_path / "b.jsonl")])


# ---------------------------------------------------------------- errors


def test_error_empty_file(tmp_path):
  (tmp_path / "empty.txt").write_bytes(b"")
  with pytest.raises(ValueError, match="empty.txt.*is empty"):
    D.read_documents([str(tmp_path / "empty.txt")])
  (tmp_path / "blank.txt").write_text("\n \n\n")
  with pytest.raises(ValueError, match="blank.txt.*no non-empty documents"):
    D.read_documents([str(tmp_path / "blank.txt")])


def test_error_non_utf8_file(tmp_path):
  (tmp_path / "latin1.txt").write_bytes("caf".encode() + b"\xe9 au lait")
  with pytest.raises(ValueError, match=r"latin1\.txt.*not valid UTF-8: byte offset 3"):
    D.read_documents([str(tmp_path / "latin1.txt")])


def test_one_reader_for_every_text_file(tmp_path):
  """The text source, prepare and zero-shot read through corpus.py: the same documents, and a
  bad byte reported by its offset in the whole (decompressed) file, not in its line."""
  import gzip

  from loopjax.data import corpus
  text = "first para\nstill first\n\n \n\nsecond\n"
  (tmp_path / "a.txt").write_text(text, encoding="utf-8")
  with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
    f.write(text)
  want = ["first para\nstill first", "second"]
  assert D.read_documents([str(tmp_path / "a.txt")]) == want
  assert list(corpus.iter_documents(str(tmp_path / "a.txt.gz"))) == want
  bad = b"ok line\ncaf\xe9\n"
  (tmp_path / "bad.txt").write_bytes(bad)
  with gzip.open(tmp_path / "bad.txt.gz", "wb") as f:
    f.write(bad)
  for name in ("bad.txt", "bad.txt.gz"):
    with pytest.raises(ValueError, match=rf"{name}.*not valid UTF-8: byte offset 11"):
      D.read_documents([str(tmp_path / name)])
  assert corpus.first_field(str(tmp_path / "a.txt"), ["sentence", "text"]) == "text"
  (tmp_path / "c.jsonl").write_text('{"sentence": "s", "text": "t"}\n', encoding="utf-8")
  assert corpus.first_field(str(tmp_path / "c.jsonl"), ["sentence", "text"]) == "sentence"


def test_error_missing_file(tmp_path):
  cfg = _text_cfg(str(tmp_path / "nope.txt"))
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    D.make_train_iterator(cfg, global_batch_size=2, seed=0)
  with pytest.raises(FileNotFoundError, match="missing.model"):
    D.make_tokenizer(f"sentencepiece:{tmp_path / 'missing.model'}")
  with pytest.raises(FileNotFoundError, match="tok.json"):
    D.make_tokenizer(f"hf:{tmp_path / 'tok.json'}")
  with pytest.raises(ValueError, match="unknown tokenizer spec"):
    D.make_tokenizer("wordpiece:vocab.txt")  # a bare Hub id such as gpt2 is resolved instead


def test_error_token_id_out_of_vocab():
  D.check_vocab(256, 257)
  with pytest.raises(ValueError, match=r"token id 257 .* vocab_size 257"):
    D.check_vocab(257, 257)

  class Broken(D.ByteTokenizer):
    vocab_size = 100  # claims fewer ids than the bytes it emits
  with pytest.raises(ValueError, match=r"token id 256 .* vocab_size 100"):
    text.encode_document(Broken(), "hi")


def test_error_missing_tfds_data_is_fast(tmp_path):
  cfg = D.default_data_config()
  cfg.update(dict(source="tfds", name="lm1b", data_dir=str(tmp_path), seq_len=32))
  start = time.monotonic()
  with pytest.raises(FileNotFoundError) as e:
    D.make_train_iterator(cfg, global_batch_size=2, seed=0)
  assert time.monotonic() - start < 10
  msg = str(e.value)
  assert "lm1b" in msg and str(tmp_path) in msg and "not prepared" in msg
  assert "tfds build lm1b" in msg and "download_and_prepare" in msg
  with pytest.raises(ValueError, match="no dataset named"):
    D.open_tfds_source("no_such_dataset_xyz", split="train", data_dir=str(tmp_path))


def _prepare_tiny_tfds(data_dir):
  """Writes a two-split text dataset as ArrayRecord under data_dir (offline, no TensorFlow)."""
  import tensorflow_datasets as tfds

  class LoopjaxTinyText(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples("train", 24),
              "test": self._generate_examples("heldout", 6)}

    def _generate_examples(self, prefix, n):
      for i in range(n):
        yield i, {"text": f"{prefix} {i:02d}"}

  LoopjaxTinyText(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_tfds_source_prepared_locally(tmp_path):
  _prepare_tiny_tfds(tmp_path)
  cfg = D.default_data_config()
  cfg.update(dict(source="tfds", name="loopjax_tiny_text", data_dir=str(tmp_path),
                  seq_len=12, packing=True))
  tok = D.tokenizer_for(cfg)
  it = D.make_train_iterator(cfg, global_batch_size=2, seed=0)
  first = _take(it, 4)
  train_text = "".join(tok.decode(t) for b in first for t in b["tokens"])
  assert "train " in train_text and "heldout" not in train_text
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 2)
  fresh = D.make_train_iterator(cfg, global_batch_size=2, seed=0)
  fresh.set_state(state)
  _assert_batches_equal(expected, _take(fresh, 2))
  ev = D.make_eval_batches(cfg, batch_size=2, num_batches=2, seed=0)
  eval_text = "".join(tok.decode(t) for b in ev for t in b["tokens"])
  assert "heldout " in eval_text and "train" not in eval_text
  cfg.eval_split = "validation"
  with pytest.raises(ValueError, match="no split 'validation'"):
    D.make_eval_batches(cfg, batch_size=2, num_batches=1, seed=0)


# ---------------------------------------------------------------- tokenizers

_SAMPLE = "Héllo, wörld! 你好 🙂\nsecond line"


def test_byte_tokenizer_round_trip():
  tok = D.make_tokenizer("byte")
  ids = tok.encode(_SAMPLE)
  assert max(ids) < 256 and len(ids) == len(_SAMPLE.encode())
  assert tok.decode(ids + [tok.eos_id]) == _SAMPLE
  assert tok.vocab_size == 257 and tok.describe()["spec"] == "byte"
  json.dumps(tok.describe())


def _word_corpus(tmp_path):
  rng = np.random.default_rng(0)
  words = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far", "away", "home", "big",
           "red", "sun", "rose", "over", "hill", "and", "then", "slept", "quietly"]
  lines = [" ".join(rng.choice(words, size=8)) for _ in range(300)]
  path = tmp_path / "words.txt"
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return str(path), lines


def test_sentencepiece_train_and_round_trip(tmp_path):
  path, lines = _word_corpus(tmp_path)
  model = D.train_sentencepiece([path], str(tmp_path / "sp" / "tiny"), vocab_size=40)
  tok = D.make_tokenizer(f"sentencepiece:{model}")
  assert tok.vocab_size == 40 and tok.eos_id == 1 and tok.pad_id == 2
  for line in lines[:20]:
    ids = tok.encode(line)
    assert max(ids) < 40 and tok.decode(ids) == line
  assert len(tok.encode(lines[0])) < len(lines[0])  # it learned multi-character pieces
  assert tok.files() == [model] and json.dumps(tok.describe())
  # It drives a text pipeline whose vocabulary is the tokenizer's.
  cfg = _text_cfg(path, txt_split="line", tokenizer=f"sentencepiece:{model}", packing=True)
  assert D.data_vocab_size(cfg) == 40
  b = next(D.make_train_iterator(cfg, global_batch_size=2, seed=0))
  assert b["tokens"].max() < 40 and (b["tokens"] == 1).any()  # EOS separates documents


def test_hf_tokenizer_trained_locally_round_trip(tmp_path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  path, lines = _word_corpus(tmp_path)
  hf = Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  hf.train([path], trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<pad>", "<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  file = tmp_path / "tokenizer.json"
  hf.save(str(file))
  tok = D.make_tokenizer(f"hf:{file}")
  assert tok.eos_id == 1 and tok.pad_id == 0 and tok.vocab_size == hf.get_vocab_size()
  for s in lines[:20] + [_SAMPLE]:
    ids = tok.encode(s)
    assert max(ids) < tok.vocab_size and tok.decode(ids) == s
  assert len(tok.encode(lines[0])) < len(lines[0])
  assert tok.decode(tok.encode("cat") + [tok.eos_id]) == "cat"  # specials are skipped
  assert json.dumps(tok.describe()) and tok.files() == [str(file)]


# ---------------------------------------------------------------- prompt/answer (GSM8K format)


def test_prompt_answer_rows_match_the_gsm8k_eval_layout(tmp_path):
  from loopjax.evaluate.gsm8k import DEFAULT_TEMPLATE, build_rows
  path, rows = _pairs(tmp_path)
  cfg = _pairs_cfg(path)
  tok = D.tokenizer_for(cfg)
  batch = D.make_eval_batches(cfg, batch_size=6, num_batches=1, seed=0)[0]
  # The held-out pairs, in file order (a fixed, seed-free subset).
  _, held = heldout.split_documents(len(rows), 6)
  eval_x, eval_seg, start = build_rows(tok, [rows[i]["question"] for i in held], seq_len=64,
                                       answer_len=32, mask_id=tok.vocab_size,
                                       template=DEFAULT_TEMPLATE)
  for r, i in enumerate(held):
    # Prompts keep their last seq_len - answer_len tokens (here all are 32-34 bytes long).
    prompt = tok.encode(DEFAULT_TEMPLATE.format(question=rows[i]["question"]))[-32:]
    answer = tok.encode(rows[i]["answer"])
    n = len(prompt)
    assert start[r] == n  # the answer field starts where the evaluation puts it
    np.testing.assert_array_equal(batch["tokens"][r, :n], prompt)
    np.testing.assert_array_equal(batch["tokens"][r, n:n + len(answer)], answer)
    assert (batch["tokens"][r, n + len(answer):n + 32] == tok.eos_id).all()
    field = np.zeros(64, bool)
    field[n:n + 32] = True
    np.testing.assert_array_equal(batch["loss_mask"][r], field)
    np.testing.assert_array_equal(batch["fixed"][r], ~field)
    np.testing.assert_array_equal(batch["segment_ids"][r], eval_seg[r])
    # what the sampler sees at test time: the same row with the answer field masked
    np.testing.assert_array_equal(np.where(field, tok.vocab_size, batch["tokens"][r])[:n + 32],
                                  eval_x[r, :n + 32])
  D.validate_batch(batch, vocab_size=tok.vocab_size, seq_len=64)


def test_prompt_answer_cuts_long_answers_and_checks_input(tmp_path, caplog):
  path, _ = _pairs(tmp_path)
  with caplog.at_level("WARNING", logger="loopjax"):
    b = next(D.make_train_iterator(_pairs_cfg(path, answer_len=8), global_batch_size=4, seed=0))
  assert "were cut" in caplog.text
  assert b["loss_mask"].sum(1).tolist() == [8] * 4
  with pytest.raises(ValueError, match="answer_len must be in"):
    D.make_train_iterator(_pairs_cfg(path, answer_len=64), global_batch_size=4, seed=0)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"question": "q", "answer": "a"}\n{"question": "q"}\n', encoding="utf-8")
  with pytest.raises(ValueError, match="line 2: need string fields 'question' and 'answer'"):
    D.make_train_iterator(_pairs_cfg(bad), global_batch_size=4, seed=0)
  bad.write_text('{"question": "q", "answer": "a"}\n{oops\n', encoding="utf-8")
  with pytest.raises(ValueError, match="line 2: invalid JSON"):
    D.make_train_iterator(_pairs_cfg(bad), global_batch_size=4, seed=0)
  with pytest.raises(FileNotFoundError, match="grade-school-math"):
    D.make_train_iterator(_pairs_cfg(tmp_path / "missing.jsonl"), global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match="names 'topic'"):
    D.make_train_iterator(_pairs_cfg(path, prompt_template="{topic}: {question}"),
                          global_batch_size=4, seed=0)
