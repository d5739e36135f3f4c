"""Training: the typed recipe, the Accelerate loop, losses, checkpoints, validation."""

from .config import TrainConfig, load_config
from .loop import TrainResult, train
from .nonfinite import NonFiniteLossError

__all__ = ["NonFiniteLossError", "TrainConfig", "TrainResult", "load_config", "train"]
