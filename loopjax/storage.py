"""Where a run's files live: a local folder or a cloud URL (`gs://bucket/...`), through one API.

Every file a run reads or writes outside the checkpoint arrays (config.json, metrics.jsonl,
lock.json, TensorBoard events, exports, the data manifest) goes through this module, which uses
etils `epath`. Orbax writes checkpoint metadata through epath too and the arrays through
tensorstore, whose GCS driver speaks to the bucket itself. So a `gs://` path is never turned into
a local `./gs:/...` folder.

Backend: for `gs://` epath uses tf.io.gfile when tensorflow is importable, else fsspec's `gcsfs`.
loopjax fixes the choice to fsspec/gcsfs (EPATH_USE_TF=false unless the environment sets it), so
the client is the same with or without tensorflow installed: `pip install 'loopjax[gcs]'`.

Object stores have no append, no rename and no O_EXCL, so:
- a whole-file write is one object upload, which is atomic (readers see the old or the new object);
  local files are written to a temporary sibling and renamed;
- an append-only log (metrics.jsonl) keeps its text in memory and re-uploads the object on flush;
- an exclusive create (the workdir lock) is an upload with GCS's `ifGenerationMatch=0`
  precondition (gcsfs's mode "xb"), refused when the object exists.

Credentials: gcsfs and tensorstore find Google's application-default credentials (gcloud, a
service account, or the VM's metadata server) as on any GCS client.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile

os.environ.setdefault("EPATH_USE_TF", "false")  # before epath picks a backend (see above)

from etils import epath  # noqa: E402

from loopjax.errors import UserError  # noqa: E402

# URL scheme -> (Python module of its fsspec client, the pip requirement that provides it).
_CLIENTS = {"gs": ("gcsfs", "loopjax[gcs]"), "gcs": ("gcsfs", "loopjax[gcs]"),
            "s3": ("s3fs", "s3fs"), "az": ("adlfs", "adlfs")}


class MissingStorageClientError(UserError):
  """A cloud path was given but the library that reaches it is not installed."""


def scheme(path) -> str | None:
  path = os.fspath(path)
  return path.split("://", 1)[0] if "://" in path else None


def is_remote(path) -> bool:
  return scheme(path) is not None


def check_client(path) -> None:
  """Raises MissingStorageClientError naming the package to install when `path` is a URL whose
  client library is missing (called before a run builds anything)."""
  s = scheme(path)
  if s is None:
    return
  if s not in _CLIENTS:
    raise UserError(f"{path}: unsupported storage scheme {s}:// (use a local path or gs://)")
  module, requirement = _CLIENTS[s]
  try:
    __import__(module)
  except ImportError:
    raise MissingStorageClientError(
        f"{path} needs the Python package `{module}` to reach {s}:// storage, which is not "
        f"installed: pip install '{requirement}'") from None


def resolve(path) -> str:
  """A path as every process should write it: URLs as given (no trailing slash), local paths
  absolute with ~ expanded."""
  path = os.fspath(path)
  if is_remote(path):
    return path.rstrip("/")
  return os.path.abspath(os.path.expanduser(path))


def Path(path) -> epath.Path:  # noqa: N802  (a constructor)
  check_client(path)
  return epath.Path(resolve(path))


def _fresh(path) -> epath.Path:
  """Path(path), with fsspec's cached listings of it dropped: other processes write the same
  bucket (a resumed run, a poller, process 0 of a job), so a query must ask the store."""
  p = Path(path)
  if is_remote(path):
    from etils.epath import backend
    if p._backend is backend.fsspec_backend:  # noqa: SLF001  (the fsspec instance epath uses)
      backend.fsspec_backend.fs(resolve(path)).invalidate_cache()
  return p


def join(path, *parts) -> str:
  return "/".join([os.fspath(path).rstrip("/"), *parts]) if is_remote(path) \
      else os.path.join(path, *parts)


def basename(path) -> str:
  return os.path.basename(os.fspath(path).rstrip("/"))


def dirname(path) -> str:
  return os.path.dirname(os.fspath(path).rstrip("/"))


def exists(path) -> bool:
  return _fresh(path).exists()


def isdir(path) -> bool:
  return _fresh(path).is_dir()


def isfile(path) -> bool:
  p = _fresh(path)
  return p.exists() and not p.is_dir()


def listdir(path) -> list[str]:
  """Names in a folder ([] when it does not exist)."""
  p = _fresh(path)
  return sorted(c.name for c in p.iterdir()) if p.is_dir() else []


def makedirs(path) -> None:
  """Creates a local folder; a no-op for object stores, whose "folders" are name prefixes."""
  if not is_remote(path):
    os.makedirs(resolve(path), exist_ok=True)


def read_text(path) -> str:
  return Path(path).read_text(encoding="utf-8")


def read_bytes(path) -> bytes:
  return Path(path).read_bytes()


def write_text(path, text: str) -> None:
  """Writes the whole file at once: complete or absent, never torn (see module docstring)."""
  write_bytes(path, text.encode("utf-8"))


def write_bytes(path, data: bytes) -> None:
  if is_remote(path):
    Path(path).write_bytes(data)
    return
  path = resolve(path)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def copy_file(src, dst) -> None:
  """Copies one file, written at `dst` whole (local or remote on either side)."""
  write_bytes(dst, read_bytes(src))


def _fs(path):
  """The fsspec filesystem epath uses for a remote path."""
  from etils.epath import backend
  check_client(path)
  return backend.fsspec_backend.fs(resolve(path))


def download(src, local: str) -> None:
  """Copies the file `src` (local or remote) to the local path `local`, streamed (not held in
  memory) to a temporary sibling that is renamed when complete."""
  tmp = f"{local}.part{os.getpid()}"
  try:
    if is_remote(src):
      _fs(src).get_file(resolve(src), tmp)
    else:
      shutil.copyfile(resolve(src), tmp)
    os.replace(tmp, local)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def upload(local: str, dst) -> None:
  """Copies the local file `local` to `dst` (local or remote), streamed; a remote object is one
  upload, so readers see it whole or not at all."""
  if is_remote(dst):
    _fs(dst).put_file(local, resolve(dst))
  else:
    download(local, resolve(dst))


def remove(path) -> None:
  """Removes a file; FileNotFoundError when it is not there."""
  if not is_remote(path):
    os.remove(resolve(path))
    return
  p = _fresh(path)
  if not p.exists():
    raise FileNotFoundError(path)
  p.unlink()


def rmtree(path) -> None:
  p = _fresh(path)
  if p.exists():
    p.rmtree()


def rename(src, dst) -> None:
  """Moves a file or folder (remote: copy then delete, not atomic; only for setting things
  aside, never for publishing)."""
  Path(src).rename(Path(dst))


def mtime(path) -> float:
  """Modification time in seconds since the epoch; FileNotFoundError when absent."""
  if not is_remote(path):
    return os.stat(resolve(path)).st_mtime
  p = _fresh(path)
  if not p.exists():
    raise FileNotFoundError(path)
  return float(p.stat().mtime)


def create_exclusive(path, text: str) -> bool:
  """Creates `path` holding `text` only if it does not exist; False when it exists."""
  if not is_remote(path):
    try:
      fd = os.open(resolve(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    return True
  if exists(path):
    return False
  from etils.epath import backend
  try:
    # gcsfs's "xb" uploads with ifGenerationMatch=0: of two runs that both saw no lock, GCS
    # accepts one. (The check above answers alone where a store ignores the precondition.)
    with backend.fsspec_backend.fs(resolve(path)).open(resolve(path), "xb") as f:
      f.write(text.encode("utf-8"))
  except FileExistsError:
    return False
  return True


def touch(path) -> None:
  """Refreshes a file's modification time (remote: re-uploads its content)."""
  if not is_remote(path):
    os.utime(resolve(path))
    return
  p = Path(path)
  p.write_bytes(p.read_bytes())


class AppendLog:
  """A text file that only grows by whole lines (metrics.jsonl). Locally an append-mode file;
  on an object store the text so far is kept in memory and the object is re-uploaded whole at
  every flush (objects cannot be appended to)."""

  def __init__(self, path: str, initial: str | None = None):
    self.path = resolve(path)
    self.remote = is_remote(path)
    if self.remote:
      self._text = io.StringIO()
      self._text.write(initial if initial is not None else
                       (read_text(path) if exists(path) else ""))
    else:
      self._f = open(self.path, "a", encoding="utf-8")

  def write(self, text: str) -> None:
    (self._text if self.remote else self._f).write(text)

  def flush(self) -> None:
    if self.remote:
      Path(self.path).write_text(self._text.getvalue(), encoding="utf-8")
    else:
      self._f.flush()

  def close(self) -> None:
    if self.remote:
      self.flush()
    else:
      self._f.close()


class _EventFile:
  """tensorboardX's record-writer interface over one remote event file (re-uploaded whole on
  flush, like tensorboardX's own GCS writer, but through the same client as everything else)."""

  def __init__(self, path: str):
    self.path, self.buffer, self.dirty = path, io.BytesIO(), True

  def write(self, data: bytes) -> None:
    self.buffer.write(data)
    self.dirty = True

  def flush(self) -> None:
    if self.dirty:
      Path(self.path).write_bytes(self.buffer.getvalue())
      self.dirty = False

  def close(self) -> None:
    self.flush()


class _EventFileFactory:
  def open(self, path):
    return _EventFile(path)

  def directory_check(self, path):
    check_client(path)


def summary_writer(logdir: str):
  """A tensorboardX SummaryWriter for a local or remote folder. Remote event files are written
  through epath (one client for the run), replacing tensorboardX's own gs:// writer, which needs
  google-cloud-storage and its default credentials."""
  from tensorboardX import SummaryWriter, record_writer
  s = scheme(logdir)
  if s is not None:
    check_client(logdir)
    record_writer.register_writer_factory(s, _EventFileFactory())
  return SummaryWriter(resolve(logdir))
