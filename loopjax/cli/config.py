"""How `train`, `flops` and `memory` document `--config FILE[:VARIANT]` and its overrides."""

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
