"""The run's configuration: the experiment file's keys and defaults (base), reading a file with its
overrides (load), the comparison variants (variants), process-wide runtime settings (runtime) and
the one resolve step to a frozen run description (run)."""

from loopjax.config.base import base_config, model_config, validate
from loopjax.config.load import load_config, read_config, split_config_args
from loopjax.config.run import Run, from_config, read_config_json, resolve

__all__ = ["Run", "base_config", "from_config", "load_config", "model_config", "read_config",
           "read_config_json", "resolve", "split_config_args", "validate"]
