"""experiments/owt_scale.py: the ~1B and ~7B LoopMDM variants resolve to the intended shapes."""

import os

import pytest

from loopjax import flops
from loopjax.config.base import model_config
from loopjax.config.load import load_config

SCALE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments",
                     "owt_scale.py")


@pytest.mark.parametrize("arg,params,block", [("loopmdm_1b", (1.0e9, 1.1e9), (1, 4)),
                                              ("loopmdm_7b", (6.7e9, 7.2e9), (1, 6))])
def test_scale_variants_have_their_size_and_the_papers_block_share(arg, params, block):
  cfg = model_config(load_config(f"{SCALE}:{arg}"))
  assert params[0] < flops.param_counts(cfg)["total"] < params[1]
  assert (cfg.loop_start, cfg.loop_end) == block and cfg.max_loops == 12
  assert cfg.width // cfg.num_heads == 128 and cfg.dtype == "bfloat16"


def test_mdm_at_scale_has_no_loop_and_a_bad_size_is_named():
  assert not model_config(load_config(f"{SCALE}:mdm_7b")).looped
  with pytest.raises(ValueError, match="loopmdm_3b.*size one of 1b, 7b"):
    load_config(f"{SCALE}:loopmdm_3b")
