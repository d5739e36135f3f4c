"""Training: the typed recipe, the Accelerate loop, losses, checkpoints, validation."""

from .config import TrainConfig, load_config
from .loop import NonFiniteLossError, TrainResult, train

__all__ = ["NonFiniteLossError", "TrainConfig", "TrainResult", "load_config", "train"]
