"""`loopjax-lm-eval` (or `python -m loopjax.cli.lm_eval`): lm-evaluation-harness's own CLI with
the "loopjax" model registered (loopjax/evaluate/lm_eval_model.py); its arguments are lm-eval's."""

from __future__ import annotations

import sys


def main() -> None:
  import loopjax.evaluate.lm_eval_model  # noqa: F401  registers the "loopjax" model
  from lm_eval.__main__ import cli_evaluate
  cli_evaluate()


if __name__ == "__main__":
  sys.exit(main())
