"""Expected failures: the CLI prints their message on one line and exits non-zero, no traceback.

ValueError and OSError are treated the same way (bad config, missing or unreadable files); the
classes here are the expected failures that are neither.
"""


class UserError(Exception):
  """A failure the user can fix; the message says what happened and what to do."""
