"""Learning-rate schedules for `electra_fast.train.step.TrainStep(lr_schedule=...)`: functions of a 0-dim device step
tensor, evaluated on the device, so a captured step follows them with no host read."""
from __future__ import annotations

from typing import Callable

import torch

from electra_fast.checks import check_int


def warmup_linear_decay(steps: int, warmup: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The LR factor of the reference (linear warm-up over `warmup` steps times linear decay to 0 over `steps`) as
    a function of a 0-dim device step tensor (float64: the same numbers as the formula in Python floats)."""
    check_int(steps, "steps", low=1)
    check_int(warmup, "warmup", low=0)

    def factor(step: torch.Tensor) -> torch.Tensor:
        s = step.double()
        decay = (1.0 - s / steps).clamp(min=0.0)
        return decay * (s / warmup).clamp(max=1.0) if warmup > 0 else decay

    return factor


__all__ = ["warmup_linear_decay"]
