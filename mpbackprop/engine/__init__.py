"""Training a compiled network: the backward pass as message passing (one train_step), one run step by step,
losses, the Trainer.

``backward`` here is the function (:func:`~mpbackprop.engine.backward.backward`); its module is
``mpbackprop.engine.backward`` (``from mpbackprop.engine.backward import ...`` reaches it).
"""

from .losses import LOSSES, LossFn, resolve_loss
from .backward import (BackwardResult, StepResult, backward, forward_and_seed, layer_context, layer_depth, signals,
                       train_step)
from .inner_step import Batches, InnerStep
from .trainer import Trainer

__all__ = [
    # backward
    "BackwardResult", "StepResult", "backward", "forward_and_seed", "layer_context", "layer_depth", "signals",
    "train_step",
    # inner_step, losses, trainer
    "Batches", "InnerStep", "LOSSES", "LossFn", "resolve_loss", "Trainer",
]
