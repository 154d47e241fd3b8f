"""Configuration of a loopjax LoopMDM export for Hugging Face `transformers` (remote code).

The export's config.json describes the model in loopjax's own terms (`architecture`, `loop`,
`math`); this class reads its numbers from those entries, so the one file serves loopjax, the
NumPy reference and `AutoConfig.from_pretrained(export, trust_remote_code=True)`.
"""

from transformers import PretrainedConfig


class LoopMDMConfig(PretrainedConfig):
  """A looped masked diffusion denoiser: head layers, a weight-shared block run S times, tail.

  `architecture`, `loop` and `math` are the export's entries of the same names; every other
  config.json entry is kept as an attribute. `vocab_size` is the output vocabulary; the input
  vocabulary has one more id, `mask_id = vocab_size` ([MASK]). The weights' tables may be
  padded (architecture `vocab_multiple`): `padded_vocab` head columns, `embedding_rows` rows.
  """

  model_type = "loopmdm"

  def __init__(self, architecture=None, loop=None, math=None, vocab_size=None,
               mask_id=None, default_loops=None, **kwargs):
    arch, loop, math = dict(architecture or {}), dict(loop or {}), dict(math or {})
    vocab = int(vocab_size if vocab_size is not None else arch.get("vocab_size", 256))
    kwargs.setdefault("tie_word_embeddings", False)
    super().__init__(**kwargs)
    self.architecture, self.loop, self.math, self.vocab_size = arch, loop, math, vocab
    multiple = int(arch.get("vocab_multiple", 1))
    self.padded_vocab = -(-vocab // multiple) * multiple
    self.embedding_rows = -(-(vocab + 1) // multiple) * multiple
    self.width = int(arch.get("width", 256))
    self.num_layers = int(arch.get("num_layers", 4))
    self.num_heads = int(arch.get("num_heads", 4))
    self.mlp_dim = int(round(self.width * float(arch.get("mlp_ratio", 4.0))))
    self.mlp_type = arch.get("mlp_type", "gelu")
    self.cond_dim = int(arch.get("cond_dim", 128))
    self.max_position_embeddings = int(arch.get("max_length", 128))
    self.time_conditioning = bool(arch.get("time_conditioning", False))
    self.rope_base = float(math.get("rope", {}).get("base", arch.get("rope_base", 10000.0)))
    self.norm_eps = float(math.get("layer_norm", {}).get("eps", arch.get("norm_eps", 1e-6)))
    time = math.get("time_embedding", {})
    self.freq_dim = int(time.get("freq_dim", 256))
    self.max_period = float(time.get("max_period", 10000.0))
    self.looped = bool(loop.get("looped", arch.get("loop_end", 0) > arch.get("loop_start", 0)))
    self.loop_start, self.loop_end = (loop.get("block") or [arch.get("loop_start", 0),
                                                             arch.get("loop_end", 0)])
    self.max_train_loops = int(loop.get("max_train_loops", arch.get("max_loops", 1)))
    self.loop_inject = bool(loop.get("input_injection", arch.get("loop_inject", False)))
    self.loop_embedding = bool(loop.get("loop_embedding", arch.get("loop_embedding", False)))
    self.default_loops = int(default_loops or loop.get("default_loops", self.max_train_loops))
    self.mask_id = int(vocab if mask_id is None else mask_id)
