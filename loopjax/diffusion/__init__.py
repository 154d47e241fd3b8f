"""Masked-diffusion math as pure functions of arrays: schedules, forward masking, the NELBO."""

from loopjax.diffusion.masking import mask_tokens, sample_times
from loopjax.diffusion.nelbo import (
    chunked_token_nll,
    diffusion_loss,
    eval_time_grid,
    metrics_from_nelbo,
    nelbo_on_grid,
    nelbo_terms,
    token_nll,
)
from loopjax.diffusion.schedules import SCHEDULES, Schedule, make_schedule

__all__ = [
    "SCHEDULES",
    "Schedule",
    "chunked_token_nll",
    "diffusion_loss",
    "eval_time_grid",
    "make_schedule",
    "mask_tokens",
    "metrics_from_nelbo",
    "nelbo_on_grid",
    "nelbo_terms",
    "sample_times",
    "token_nll",
]
