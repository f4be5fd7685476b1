"""Kept for the import path `electra_fast.step`: the train step lives in `electra_fast.train.step`."""
from electra_fast.train.step import DynamicLossScale, TrainStep, warmup_linear_decay

__all__ = ["DynamicLossScale", "TrainStep", "warmup_linear_decay"]
