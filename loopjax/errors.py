"""Expected failures: the CLI prints their message on one line and exits non-zero, no traceback.

ValueError and OSError are treated the same way (bad config, missing or unreadable files); the
classes here are the expected failures that are neither.
"""

import signal


class UserError(Exception):
  """A failure the user can fix; the message says what happened and what to do."""


class Interrupted(KeyboardInterrupt):
  """A stop signal (SIGINT, SIGTERM) that ends a command before it has anything to save; the
  CLI prints its message on one line and exits with `exit_code` (128 + the signal number).

  A KeyboardInterrupt, so that no `except Exception` on the way out swallows it."""

  def __init__(self, signum: int, where: str = ""):
    super().__init__(f"interrupted by {signal.Signals(signum).name}"
                     + (f" {where}" if where else ""))
    self.signum, self.exit_code = signum, 128 + signum


def raise_interrupted(signum, _frame):
  """A signal handler: raises Interrupted (SIGTERM then unwinds like Ctrl-C)."""
  raise Interrupted(signum)
