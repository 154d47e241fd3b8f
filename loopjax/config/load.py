"""Reading an experiment: `path.py[:variant]`, then the `--config.a.b=value` overrides, then the
values the variant derives from the result (loopjax/config/variants.py).

Used by every command that takes `--config` (train, flops, memory) and by tests and tools, so
they all see the same resolved config: the one `loopjax train` writes to WORKDIR/config.json.
"""

from __future__ import annotations

import ast
import logging
import os
from typing import Sequence

from absl import flags
from ml_collections import config_flags

from loopjax.config.variants import resolve_variant

log = logging.getLogger("loopjax")


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
    raise ValueError(unknown_key_message(e, overrides)) from None
  return fv.config, dict(config_flags.get_override_values(fv["config"]))


def unknown_key_message(e: Exception, overrides: Sequence[str]) -> str:
  """One plain line for ml_collections' unknown-key error: the override that has the key and
  its suggestion ("Did you mean ..."), without the exception's repr."""
  text = str(e.args[0] if e.args else e)
  for _ in range(3):  # a KeyError's str is the repr of its message, sometimes nested
    if len(text) < 2 or text[0] not in "'\"" or text[-1] != text[0]:
      break
    try:
      text = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      break
  lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
  bad = lines[0].strip("'\"") if lines else "?"
  hint = " ".join(lines[1:])
  given = [o for o in overrides if bad in o.split("=", 1)[0].split(".")[1:]]
  where = f" in {given[0]}" if given else ""
  return (f'unknown config key "{bad}"{where}' + (f": {hint}" if hint else "")
          + " (every key and its default: loopjax/config/base.py base_config)")


def load_config(spec: str, overrides: Sequence[str] = ()):
  """The resolved config of `path.py[:variant]` with `--config.a.b=value` overrides: overrides
  first, then the variant's derived values (an overridden derived key keeps the override)."""
  config, given = read_config(spec, overrides)
  return eval_loops_alias(resolve_variant(config, given))


def eval_loops_alias(config):
  """Reads the deprecated `eval.loops` into `loops.eval`, the one key for the evaluation's S."""
  old = int(config.get("eval", {}).get("loops", 0) or 0)
  if old:
    if config.loops.eval and int(config.loops.eval) != old:
      raise ValueError(f"eval.loops={old} and loops.eval={config.loops.eval} disagree: set only "
                       "loops.eval (eval.loops is its deprecated name)")
    log.warning("eval.loops is deprecated: set loops.eval=%d instead", old)
    config.loops.eval, config.eval.loops = old, 0
  return config


def split_config_args(argv: Sequence[str], prefix: str = "--config"):
  """(spec, overrides, rest): PREFIX / PREFIX.x=v arguments apart from a command's own. The
  overrides come back as `--config.x=v` (what `read_config` takes) whatever the prefix."""
  spec, overrides, rest = None, [], []
  it = iter(argv)
  for a in it:
    if a == prefix:
      spec = next(it, None)
    elif a.startswith(prefix + "="):
      spec = a.split("=", 1)[1]
    elif a.startswith(prefix + "."):
      if "=" not in a:
        a = f"{a}={next(it, '')}"
      overrides.append("--config" + a[len(prefix):])
    else:
      rest.append(a)
  return spec, overrides, rest
