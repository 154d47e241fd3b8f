"""A Hugging Face Hub cache written by tests: a local folder placed where huggingface_hub looks
for a downloaded repository (HF_HUB_CACHE/models--ORG--NAME/{refs/main, snapshots/COMMIT/...}),
so that a Hub id resolves offline, as after `hf download`."""

import hashlib
import os
import shutil


def cache_repo(cache_dir, repo_id: str, folder) -> str:
  """Copies `folder`'s files into the cache as the snapshot of `repo_id`'s main branch;
  returns the snapshot's commit hash."""
  base = os.path.join(str(cache_dir), "models--" + repo_id.replace("/", "--"))
  commit = hashlib.sha1(repo_id.encode()).hexdigest()
  os.makedirs(os.path.join(base, "refs"), exist_ok=True)
  with open(os.path.join(base, "refs", "main"), "w") as f:
    f.write(commit)
  shutil.copytree(str(folder), os.path.join(base, "snapshots", commit), dirs_exist_ok=True)
  return commit


def use_cache(monkeypatch, cache_dir) -> None:
  """Points huggingface_hub (and transformers, which asks it) at `cache_dir`, offline. Its
  constants are read from the environment at import, so they are set directly too."""
  from huggingface_hub import constants
  monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
