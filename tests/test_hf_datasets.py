"""`loopjax prepare --input datasets:...`: corpora read through Hugging Face `datasets` from
local folders (data files, streamed; a `save_to_disk` folder with its splits), giving the shards
the same documents as a plain file would; a missing column or an uncached Hub dataset offline
fails in one line before any output is written. Nothing is downloaded."""

import json

import numpy as np
import pytest

from loopjax.data import corpus, hf_datasets, prepared, shards
from loopjax.data.prepare import prepare

datasets = pytest.importorskip("datasets", reason="pip install loopjax[hf]")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
  from huggingface_hub import constants
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "ds_cache"))


def _docs(n):
  rng = np.random.default_rng(0)
  words = "the a cat dog sat on mat ran far away".split()
  return [f"{i} " + " ".join(rng.choice(words, rng.integers(2, 30))) for i in range(n)]


def _decoded(out_dir):
  m = shards.load_manifest(out_dir)
  return {s: [bytes(np.asarray(r).tolist()).decode()
              for r in (prepared.split_documents(out_dir, m, s) if m["splits"][s]["docs"]
                        else [])]
          for s in shards.SPLITS}


def test_a_folder_of_data_files_prepares_like_the_file(tmp_path):
  docs = _docs(40)
  folder = tmp_path / "corpus"
  folder.mkdir()
  rows = [{"text": d, "n": i} for i, d in enumerate(docs)] + [{"text": "  ", "n": -1}]
  (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  spec = f"datasets:{folder}@train"
  assert list(corpus.iter_documents(spec)) == docs  # streamed, stripped, the blank one dropped
  assert isinstance(hf_datasets.open_rows(spec), datasets.IterableDataset)
  got, want = str(tmp_path / "via_datasets"), str(tmp_path / "via_file")
  m = prepare([spec], "byte", got, heldout=0.3, progress=False)
  prepare([str(folder / "train.jsonl")], "byte", want, heldout=0.3, progress=False)
  assert _decoded(got) == _decoded(want)
  assert 0 < m["splits"]["heldout"]["docs"] < len(docs)
  assert m["inputs"][0]["path"] == spec


def test_a_saved_dataset_dict_split_and_text_field(tmp_path):
  docs = _docs(12)
  saved = str(tmp_path / "saved")
  datasets.DatasetDict({
      "train": datasets.Dataset.from_dict({"content": docs[:8]}),
      "validation": datasets.Dataset.from_dict({"content": docs[8:]})}).save_to_disk(saved)
  assert list(corpus.iter_documents(f"datasets:{saved}@validation", text_field="content")) \
      == docs[8:]
  out = str(tmp_path / "out")
  prepare([f"datasets:{saved}"], "byte", out, text_field="content", heldout=0.0,
          progress=False)
  assert _decoded(out)["train"] == docs[:8]
  with pytest.raises(ValueError, match=r"no split 'test' in .*\['train', 'validation'\]"):
    list(corpus.iter_documents(f"datasets:{saved}@test", text_field="content"))


def test_bad_dataset_inputs_fail_in_one_line_before_any_output(tmp_path):
  folder = tmp_path / "corpus"
  folder.mkdir()
  (folder / "train.jsonl").write_text(json.dumps({"body": "x y"}) + "\n")
  out = tmp_path / "out"
  with pytest.raises(ValueError) as e:
    prepare([f"datasets:{folder}"], "byte", str(out), progress=False)
  assert "no column 'text'" in str(e.value) and "'body'" in str(e.value)
  with pytest.raises(ValueError) as e:
    prepare(["datasets:tiny-org/absent-corpus@train"], "byte", str(out), progress=False)
  msg = str(e.value)
  assert "\n" not in msg and "'tiny-org/absent-corpus'" in msg and "HF_HUB_OFFLINE" in msg
  assert not out.exists()
  assert hf_datasets.parse("datasets:wikitext:wikitext-2-raw-v1@test") == (
      "wikitext", "wikitext-2-raw-v1", "test")


def test_export_card_names_the_hub_datasets_of_a_prepared_run(tmp_path):
  """The card's `datasets` come from the prepared corpus's `datasets:` inputs that are Hub ids
  (a local folder is none)."""
  import ml_collections
  from loopjax.io.export import hub_datasets
  folder = tmp_path / "corpus"
  folder.mkdir()
  (folder / "train.jsonl").write_text(json.dumps({"text": "a b c"}) + "\n")
  out = tmp_path / "prepared"
  prepare([f"datasets:{folder}"], "byte", str(out), heldout=0.0, progress=False)
  run = lambda path: ml_collections.ConfigDict({"data": {"source": "prepared", "path": path}})
  assert hub_datasets(run(str(out))) == []
  m = json.loads((out / "manifest.json").read_text())
  m["inputs"] = [{"path": "datasets:Skylion007/openwebtext@train", "bytes": 0},
                 {"path": f"datasets:{folder}", "bytes": 0}]
  m["heldout_inputs"] = [{"path": "datasets:wikitext:wikitext-103-raw-v1@test", "bytes": 0}]
  (out / "manifest.json").write_text(json.dumps(m))
  assert hub_datasets(run(str(out))) == ["Skylion007/openwebtext", "wikitext"]
  assert hub_datasets(run(str(tmp_path / "elsewhere"))) == []
