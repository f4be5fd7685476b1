"""Training: configuration and schedules, the loop, the captured train step, optimizers, distributed, evaluation."""
from electra_fast.train.loop import TrainConfig, train

__all__ = ["TrainConfig", "train"]
