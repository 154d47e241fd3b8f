"""Reading a run folder's logs in tests."""

import json
import os


def logged_rows(workdir) -> list:
  """The rows of metrics.jsonl in order (each the means of the steps since the previous row)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def logged_losses(workdir) -> dict:
  """step -> loss from metrics.jsonl, the last logged value for each step."""
  return {row["step"]: row["loss"] for row in logged_rows(workdir)}
