"""Shared pytest settings: markers."""


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "xla_behaviour: checks how XLA compiles or counts a program (cost analysis, "
      "loop lowering), not loopjax's own logic; may change with a jax/XLA upgrade without a "
      "loopjax bug (deselect with -m 'not xla_behaviour')")
