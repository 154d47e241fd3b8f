"""Reading an experiment: `path.py[:variant]`, then the `--config.a.b=value` overrides, then the
values the variant derives from the result (loopjax/train/variants.py).

Used by every command that takes `--config` (train, flops, memory) and by tests and tools, so
they all see the same resolved config: the one `loopjax train` writes to WORKDIR/config.json.
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import flags
from ml_collections import config_flags

from loopjax.train.variants import resolve_variant


def read_config(spec: str, overrides: Sequence[str] = ()):
  """(config, {key: value}): the file's config with the overrides applied (unknown key: error),
  before the variant is resolved, and the overridden keys ("train.steps") with their values."""
  path = spec.split(":", 1)[0]
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} not found (expected path.py[:variant])")
  fv = flags.FlagValues()
  argv = ["loopjax", f"--config={spec}", *overrides]
  # ml_collections defines one override flag per `--config.x` it finds in sys_argv.
  config_flags.DEFINE_config_file("config", None, "experiment file", flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  try:
    fv(argv)
  except flags.Error as e:
    raise ValueError(f"bad config or override: {e}") from None
  except (KeyError, AttributeError) as e:
    why = str(e.args[0] if e.args else e).replace("\n", "; ")  # KeyError's str is its repr
    raise ValueError(f"unknown config key in overrides {list(overrides)}: {why}") from None
  return fv.config, dict(config_flags.get_override_values(fv["config"]))


def load_config(spec: str, overrides: Sequence[str] = ()):
  """The resolved config of `path.py[:variant]` with `--config.a.b=value` overrides: overrides
  first, then the variant's derived values (an overridden derived key keeps the override)."""
  config, given = read_config(spec, overrides)
  return resolve_variant(config, given)


def split_config_args(argv: Sequence[str]):
  """(spec, overrides, rest): --config / --config.x=v arguments apart from a command's own."""
  spec, overrides, rest = None, [], []
  it = iter(argv)
  for a in it:
    if a == "--config":
      spec = next(it, None)
    elif a.startswith("--config="):
      spec = a.split("=", 1)[1]
    elif a.startswith("--config."):
      if "=" not in a:
        a = f"{a}={next(it, '')}"
      overrides.append(a)
    else:
      rest.append(a)
  return spec, overrides, rest
