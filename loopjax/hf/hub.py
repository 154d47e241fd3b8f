"""Hugging Face Hub names, through `huggingface_hub`: files of a model repository resolved from
the local cache first (`HF_HOME` / `HF_HUB_CACHE`), downloaded only when the Hub is reachable and
`HF_HUB_OFFLINE` is not set, and an export folder uploaded as a model repository.

A name is a Hub id when it is not an existing local path and reads as one (`gpt2`,
`openai-community/gpt2`): local paths stay first-class. Every failure is one line that names the
id and the file and says how to get it (`hf download ID FILE` on a machine with network, the same
`HF_HOME` here, or a local path).
"""

from __future__ import annotations

import os
import re

from loopjax.errors import UserError

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def is_repo_id(name: str) -> bool:
  """True for a name that is no local path and has the form of a Hub repository id."""
  name = (name or "").strip()
  if not name or os.path.exists(os.path.expanduser(name)) or name.startswith((".", "~", "/")):
    return False
  return bool(_REPO_ID.match(name)) and ".." not in name and not name.endswith(
      (".json", ".model", ".txt"))


def offline() -> bool:
  """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub reads it."""
  import huggingface_hub
  return bool(huggingface_hub.is_offline_mode())


def cache_dir() -> str:
  from huggingface_hub import constants
  return constants.HF_HUB_CACHE


def _how(repo_id: str, filename: str | None) -> str:
  return (f"run `hf download {repo_id}{f' {filename}' if filename else ''}` on a machine with "
          "network (the same HF_HOME as here) or give a local path")


def missing(what: str, repo_id: str, filename: str, why: str = "",
            whole_repo: bool = False) -> UserError:
  """The one-line error for a Hub file that is not in the cache and cannot be downloaded."""
  if offline():
    reason = "HF_HUB_OFFLINE is set"
  else:
    reason = f"the Hub could not be reached{f' ({why})' if why else ''}"
  return UserError(f"{what} {repo_id!r}: {filename} is not in the Hugging Face cache "
                   f"({cache_dir()}) and {reason}; "
                   f"{_how(repo_id, None if whole_repo else filename)}")


def hub_file(repo_id: str, filename: str, *, what: str, revision: str | None = None,
             whole_repo: bool = False, absent_ok: str | None = None) -> str | None:
  """The local path of `filename` of the model repository `repo_id` (the cache first).
  whole_repo: the caller needs more files than this one (the error's `hf download` names none).
  absent_ok: another file of the repository; None is returned instead of an error when the
  repository has no `filename` (online) or, offline, when that other file is cached.

  Raises UserError (one line) when the repository or file does not exist or the file is not
  cached while the Hub is unreachable or HF_HUB_OFFLINE is set.
  """
  from huggingface_hub import errors, hf_hub_download, try_to_load_from_cache
  try:
    return hf_hub_download(repo_id, filename, revision=revision)
  except errors.LocalEntryNotFoundError as e:
    if absent_ok and isinstance(try_to_load_from_cache(repo_id, absent_ok, revision=revision),
                                str):
      return None
    raise missing(what, repo_id, filename, _first_line(e), whole_repo) from None
  except errors.OfflineModeIsEnabled:
    raise missing(what, repo_id, filename, whole_repo=whole_repo) from None
  except errors.GatedRepoError:
    raise UserError(f"{what} {repo_id!r}: a gated repository; accept its terms on the Hub and "
                    "log in (`hf auth login` or HF_TOKEN)") from None
  except errors.RepositoryNotFoundError:
    raise UserError(f"{what} {repo_id!r}: no such model repository on the Hub (or a private "
                    "one: log in with `hf auth login` or set HF_TOKEN)") from None
  except errors.RevisionNotFoundError:
    raise UserError(f"{what} {repo_id!r}: revision {revision!r} does not exist") from None
  except errors.RemoteEntryNotFoundError:
    if absent_ok:
      return None
    raise UserError(f"{what} {repo_id!r}: the repository has no {filename}") from None
  except (errors.HfHubHTTPError, OSError) as e:
    raise missing(what, repo_id, filename, _first_line(e), whole_repo) from None


def converted_tokenizer(repo_id: str) -> str:
  """A tokenizer.json for a repository that has none (vocab.json + merges.txt, a SentencePiece
  model, ...): its tokenizer loaded by transformers, whose fast backend is saved under
  HF_HOME/loopjax/tokenizers/ORG--NAME/. Returns the file's path."""
  from huggingface_hub import constants
  try:
    import transformers
  except ImportError:
    raise UserError(f"tokenizer {repo_id!r}: the repository has no tokenizer.json, and reading "
                    "its other tokenizer files needs transformers: pip install loopjax[torch]"
                    ) from None
  try:
    tok = transformers.AutoTokenizer.from_pretrained(repo_id)
  except (OSError, ValueError, TypeError) as e:
    raise UserError(f"tokenizer {repo_id!r}: no tokenizer.json and transformers cannot read its "
                    f"tokenizer files ({_first_line(e)}); {_how(repo_id, None)}") from None
  backend = getattr(tok, "backend_tokenizer", None)
  if backend is None:
    raise UserError(f"tokenizer {repo_id!r}: no tokenizer.json and its tokenizer has no "
                    "`tokenizers` form; save one with the tokenizers library and give hf:PATH")
  folder = os.path.join(constants.HF_HOME, "loopjax", "tokenizers", repo_id.replace("/", "--"))
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, "tokenizer.json")
  backend.save(f"{path}.tmp-{os.getpid()}")
  os.replace(f"{path}.tmp-{os.getpid()}", path)  # whole or absent for a concurrent reader
  return path


def snapshot_revision(path: str) -> str | None:
  """The commit hash of a cached file's snapshot folder (…/snapshots/HASH/FILE), if any."""
  parts = os.path.normpath(path).split(os.sep)
  if "snapshots" in parts[:-1]:
    i = len(parts) - 1 - parts[::-1].index("snapshots")
    return parts[i + 1] if i + 1 < len(parts) - 1 else None
  return None


def _first_line(e: Exception) -> str:
  lines = str(e).strip().splitlines()
  return (lines[0] if lines else type(e).__name__)[:200]


def check_push(repo_id: str) -> None:
  """Fails fast (before any export work) on a malformed id, offline mode or no token."""
  from huggingface_hub import get_token
  from huggingface_hub.errors import HFValidationError
  from huggingface_hub.utils import validate_repo_id
  try:
    validate_repo_id(repo_id)
  except HFValidationError as e:
    raise UserError(f"--push-to-hub {repo_id!r}: not a repository id ({_first_line(e)}); "
                    "use NAME or ORG/NAME") from None
  if offline():
    raise UserError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set; unset it to upload, or "
                    "drop --push-to-hub and upload the --out folder later with `hf upload`")
  if not get_token():
    raise UserError(f"--push-to-hub {repo_id}: no Hugging Face token; log in with "
                    "`hf auth login` or set HF_TOKEN")


def push_folder(folder: str, repo_id: str, *, private: bool | None = None,
                revision: str | None = None, commit_message: str = "loopjax export") -> str:
  """Creates the model repository `repo_id` if needed and uploads `folder` as one commit;
  returns the commit URL."""
  from huggingface_hub import HfApi
  from huggingface_hub.errors import HfHubHTTPError
  api = HfApi()
  try:
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model",
                             revision=revision, commit_message=commit_message)
  except (HfHubHTTPError, OSError, ValueError) as e:  # ValueError: the Hub rejected the card
    raise UserError(f"--push-to-hub {repo_id}: the upload failed ({_first_line(e)})") from None
  return str(getattr(info, "commit_url", info))
