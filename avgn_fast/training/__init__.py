"""Training AVGN: losses, the training loop and evaluation."""

from avgn_fast.training.losses import LossWeights, avgn_losses, saliency_ranking_loss
from avgn_fast.training.trainer import (
    EvalResult,
    FolderSource,
    TensorSource,
    TrainResult,
    TrainSettings,
    evaluate,
    fit,
    mean_average_precision,
    train_model,
)

__all__ = [
    "EvalResult",
    "FolderSource",
    "LossWeights",
    "TensorSource",
    "TrainResult",
    "TrainSettings",
    "avgn_losses",
    "evaluate",
    "fit",
    "mean_average_precision",
    "saliency_ranking_loss",
    "train_model",
]
