"""The run's configuration: the experiment file's keys and defaults (base), reading a file with its
overrides (load), the comparison variants (variants) and process-wide runtime settings (runtime)."""

from loopjax.config.base import base_config, model_config, validate
from loopjax.config.load import load_config, read_config, split_config_args

__all__ = ["base_config", "load_config", "model_config", "read_config", "split_config_args",
           "validate"]
