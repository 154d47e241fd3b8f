"""lm-evaluation-harness task files shipped with loopjax (YAML, read by loopjax.evaluate.harness
through importlib.resources); no Python here."""
