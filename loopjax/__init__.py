"""loopjax: looped masked diffusion language models (LoopMDM) in JAX/Flax.

    import loopjax
    m = loopjax.load(RUN_OR_EXPORT_DIR)   # see loopjax/api.py
    print(m.sample(2, loops=4))
"""

__version__ = "0.1.0"

_API = ("load", "Model")


def __getattr__(name):
  # The API (and JAX with it) is imported on first use, so `import loopjax` stays cheap.
  if name in _API:
    from loopjax import api
    return getattr(api, name)
  raise AttributeError(f"module 'loopjax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_API))
