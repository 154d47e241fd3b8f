"""Reading a run folder's logs in tests."""

import json
import os


def logged_losses(workdir) -> dict:
  """step -> loss from metrics.jsonl, the last logged value for each step."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      out[row["step"]] = row["loss"]
  return out
