"""Training: configuration (`config`) and schedules, the loop, the captured train step, optimizers, distributed,
evaluation."""
from electra_fast.train.config import TrainConfig
from electra_fast.train.loop import train

__all__ = ["TrainConfig", "train"]
