"""Training: typed configs, the trainer loop, atomic checkpoints, torchrun support."""

from nirdml.training.checkpoint import load_checkpoint, save_checkpoint
from nirdml.training.config import Config
from nirdml.training.trainer import Interrupted, Trainer, train

__all__ = ["Config", "Interrupted", "Trainer", "load_checkpoint", "save_checkpoint", "train"]
