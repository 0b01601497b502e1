"""Training: configuration and recipes, the loop, checkpoints, metrics and plots, torchrun helpers."""

from .config import Config, bundled_recipes, load_config
from .loop import evaluate, train

__all__ = ["Config", "bundled_recipes", "load_config", "evaluate", "train"]
