"""loopjax: looped masked diffusion language models (LoopMDM) in JAX/Flax."""

__version__ = "0.1.0"
