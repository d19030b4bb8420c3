"""Training from YAML recipes with the Hugging Face Trainer.

- :mod:`.recipe`: the schema (sections, dataset fields, overrides) and its checks, before any work.
- :mod:`.checkpoints`: atomic checkpoints, resume from the newest complete one, stop on a signal.
- :mod:`.trainer`: the run a recipe describes (output directory, data, model, Trainer, final save).
- :mod:`.callbacks`: callbacks that watch a run (a non-finite loss stops it, unsaved) or steer it
  (TTT-E2E's inner-lr warm-up).
"""

from .callbacks import Diverged, InnerLRWarmup, StopOnNonFiniteLoss
from .checkpoints import CheckpointingTrainer, StopOnSignal, TrainingInterrupted, newest_complete_checkpoint
from .recipe import DatasetSection, Recipe, RunOptions, apply_overrides, load_recipe, model_fields, parse_recipe
from .trainer import (build_trainer, check_output_dir, check_writable, configure_wandb, run, save_atomically,
                      split_documents, train)

__all__ = [
    "CheckpointingTrainer",
    "DatasetSection",
    "Diverged",
    "InnerLRWarmup",
    "Recipe",
    "RunOptions",
    "StopOnNonFiniteLoss",
    "StopOnSignal",
    "TrainingInterrupted",
    "apply_overrides",
    "build_trainer",
    "check_output_dir",
    "check_writable",
    "configure_wandb",
    "load_recipe",
    "model_fields",
    "newest_complete_checkpoint",
    "parse_recipe",
    "run",
    "save_atomically",
    "split_documents",
    "train",
]
