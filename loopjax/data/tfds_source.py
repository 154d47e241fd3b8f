"""Prepared TFDS datasets as random-access document sources (no TensorFlow at run time).

`tfds.data_source` reads ArrayRecord (or Parquet) files that `download_and_prepare` wrote
earlier. Nothing is downloaded unless `download=True`; when the prepared files are missing we
fail at once (no network retries) and say how to prepare them.
"""

from __future__ import annotations

import os

_RANDOM_ACCESS_FORMATS = ("array_record", "parquet")


def _prepare_hint(name: str, data_dir: str | None) -> str:
  d = data_dir or "~/tensorflow_datasets"
  return (f"prepare it once, on a machine with internet access, in a random-access format:\n"
          f"  tfds build {name} --data_dir={d} --file_format=array_record\n"
          f"or\n  python -m tensorflow_datasets.scripts.download_and_prepare "
          f"--datasets={name} --data_dir={d} --file_format=array_record\n"
          f"then copy {d}/{name} to this machine (or set data.download=True to let "
          "TFDS download here).")


def open_tfds_source(name: str, *, split: str, data_dir: str | None = None,
                     download: bool = False):
  """`tfds.data_source(name, split=split, data_dir=data_dir, download=download)`, checked."""
  import tensorflow_datasets as tfds  # lazy: importing TFDS costs ~1 s

  data_dir = os.path.expanduser(data_dir) if data_dir else None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f"TFDS has no dataset named {name!r} (check data.name)") from None
  if not download and not builder.is_prepared():
    raise FileNotFoundError(
        f"TFDS dataset {name!r} is not prepared under data_dir "
        f"{data_dir or '(TFDS default)'}: expected the files in {builder.data_dir}. "
        f"Downloading is off (data.download=False), so {_prepare_hint(name, data_dir)}")
  if builder.is_prepared():
    fmt = str(getattr(builder.info, "file_format", "") or "").lower()
    if fmt and not any(f in fmt for f in _RANDOM_ACCESS_FORMATS):
      raise ValueError(
          f"TFDS dataset {name!r} in {builder.data_dir} is stored as {fmt}, which has no "
          f"random access; re-{_prepare_hint(name, data_dir)}")
    splits = list(builder.info.splits.keys())
    if split.split("[")[0] not in splits:
      raise ValueError(f"TFDS dataset {name!r} has no split {split!r}; it has {splits}")
  return tfds.data_source(name, split=split, data_dir=data_dir, download=download)


class TfdsDocuments:
  """Sequence view of a TFDS source: item i is the UTF-8 string field `text_field`."""

  def __init__(self, source, text_field: str = "text", name: str = "tfds"):
    self._source, self._field, self._name = source, text_field, name

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> str:
    record = self._source[index]
    if self._field not in record:
      raise ValueError(f"TFDS {self._name!r} records have no field {self._field!r} "
                       f"(fields: {sorted(record)}); set data.text_field")
    value = record[self._field]
    if isinstance(value, bytes):
      value = value.decode("utf-8")
    return str(value)
