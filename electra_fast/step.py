"""Kept for the import path `electra_fast.step`: the train step lives in `electra_fast.train.step`, its schedule in
`electra_fast.train.schedules`."""
from electra_fast.train.schedules import warmup_linear_decay
from electra_fast.train.step import DynamicLossScale, TrainStep

__all__ = ["DynamicLossScale", "TrainStep", "warmup_linear_decay"]
