"""Masked-diffusion math as pure functions of arrays: schedules, forward masking, the NELBO."""

from loopjax.diffusion.masking import mask_tokens, sample_times
from loopjax.diffusion.nelbo import (
    diffusion_loss,
    eval_time_grid,
    metrics_from_nelbo,
    nelbo_on_grid,
)
from loopjax.diffusion.schedules import SCHEDULES, Schedule, make_schedule

__all__ = [
    "SCHEDULES",
    "Schedule",
    "diffusion_loss",
    "eval_time_grid",
    "make_schedule",
    "mask_tokens",
    "metrics_from_nelbo",
    "nelbo_on_grid",
    "sample_times",
]
