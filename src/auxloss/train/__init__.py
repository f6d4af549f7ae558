"""The training loop, callbacks and logs."""
from auxloss.train.callbacks import Callback
from auxloss.train.trainer import FitResult, Trainer

__all__ = ["Callback", "FitResult", "Trainer"]
