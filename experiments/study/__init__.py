"""The LoopMDM study on text: held-out NELBO at equal training FLOPs and the FLOP multiplier.

  loopjax study --workdir DIR [--preset cpu|gpu|tiny] [--corpus FOLDER]

presets.py: the sizes; corpus.py: the text and its fixed held-out set; measure.py: the FLOP
multiplier, gaps and slopes; scoring.py: held-out NELBO of checkpoints and inference settings;
runner.py: training and the whole study; report.py: verdicts, tables and plots.
"""

from experiments.study.presets import PRESETS


def run(workdir: str, *, preset: str = "cpu", corpus: str | None = None, log=print) -> dict:
  """The whole study into `workdir` (see runner.run_study)."""
  from experiments.study.runner import run_study  # jax and the trainer load only when it runs
  return run_study(workdir, preset=preset, corpus=corpus, log=log)


__all__ = ["PRESETS", "run"]
