"""Training: configuration and recipes, the loop, checkpoints, metrics and plots, trained runs, evaluation of a
trained model, torchrun helpers."""

from .config import Config, bundled_recipes, config_to_dict, load_config
from .evaluation import evaluate_checkpoint
from .loop import compile_for_inference, configure_attention, configure_for_device, evaluate, retain_freed_memory, train
from .runs import export_trained, load_trained, resolve_weights_path, run_records

__all__ = [
    "Config", "bundled_recipes", "config_to_dict", "load_config", "evaluate_checkpoint", "compile_for_inference",
    "configure_attention", "configure_for_device", "evaluate", "retain_freed_memory", "train", "export_trained",
    "load_trained", "resolve_weights_path", "run_records",
]
