"""How `train`, `flops` and `memory` document and read `--config FILE[:VARIANT]` and its
overrides."""

CONFIG_HELP = ("experiment file, optionally with a variant after a colon: e.g. "
               "experiments/sudoku.py:loopmdm (required)")

OVERRIDES_EPILOG = """\
config overrides:
  --config.SECTION.KEY=VALUE   set one key of the experiment's config (repeatable); an unknown key
                               is an error. Sections: model, loops, data, diffusion, train, mesh,
                               eval, variant. The variant's derived values (e.g. FLOP-matched
                               train.steps) are computed after the overrides.

example:
  loopjax train --config experiments/sudoku.py:loopmdm --workdir runs/sudoku \\
      --config.train.steps=2000 --config.train.batch_size=64 --config.loops.train=uniform:1:8
"""


def parse_config_command(parser, argv):
  """(spec, overrides, args) of a command that takes `--config`: the experiment and its
  `--config.KEY=VALUE` overrides split off `argv`, the rest parsed by `parser`; a missing
  `--config` is the parser's one-line error."""
  from loopjax.config.load import split_config_args  # jax: only when a command runs
  spec, overrides, rest = split_config_args(argv)
  args = parser.parse_args(rest)
  if spec is None:
    parser.error("--config experiments/NAME.py[:VARIANT] is required")
  return spec, overrides, args
