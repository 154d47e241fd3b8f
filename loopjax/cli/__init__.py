"""Every argparse parser of loopjax, and the `loopjax` command (`main`).

Importing this package imports neither jax nor the library: each subcommand's module is imported
when it runs, and `python -m loopjax.cli.xla_flags` runs on hosts without jax.
"""

from loopjax.cli.main import main

__all__ = ["main"]
