"""Training: YAML config, instruction dataset, DSSL glue, checkpoints and the Accelerate loop."""

from vmad.train.config import TrainConfig, load_train_config
from vmad.train.trainer import Trainer, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "Trainer", "load_train_config", "train"]
