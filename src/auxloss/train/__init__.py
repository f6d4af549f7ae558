"""The training loop, its settings, callbacks and logs."""
from auxloss.train.callbacks import Callback
from auxloss.train.options import TrainOptions
from auxloss.train.trainer import FitResult, Trainer

__all__ = ["Callback", "FitResult", "TrainOptions", "Trainer"]
