"""``BatchNorm1d`` / ``BatchNorm2d`` in training mode: normalization of each channel with the statistics of
the batch (:mod:`~mpbackprop.kinds.normalize`: all-pairs edges within a channel, means over the channel's
neurons *and the batch*), then ``weight`` and ``bias`` as ``param`` nodes on an
:mod:`~mpbackprop.kinds.affine` block.

How the batch coupling appears in the graph: the graph has one neuron per unit, not per sample, so the
coupling is not a set of edges; it is in what the normalization's edges carry — each edge ``j → i`` of a
channel brings the batch means of ``b_j`` and of ``x̂_j·b_j``, so the message a sample receives depends
on every sample of the batch, as ``∂ℓ/∂x`` does under batch statistics. A learned rule sees, at these
neurons, ``b = R.node(M, z = x̂, …)`` with that ``M``; it cannot change the coupling.

The compiled network always normalizes with the batch's statistics (training mode), whatever mode the
module is in; compiling checks it against the module run in training mode. Running statistics
(``running_mean``/``running_var``) are buffers, not parameters: ``Trainer`` does not update them, so a
model trained with it and then switched to ``eval()`` needs them re-estimated (e.g. a few forward passes
in training mode under ``torch.no_grad()``) or ``track_running_stats=False``.
"""

from __future__ import annotations

import math
from typing import Any

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import ShapeError
from .affine import affine_block
from .base import ForwardContext
from .normalize import Normalization, group_edges

__all__ = ["BatchNorm"]


class BatchNorm(Normalization):
    """``nn.BatchNorm1d`` / ``nn.BatchNorm2d``: the normalization block; the affine block follows when
    ``affine=True``."""

    name = "batchnorm"
    id = 11
    colour = "#a5a5a5"
    modules = (nn.BatchNorm1d, nn.BatchNorm2d)
    supported = "BatchNorm1d/2d (batch statistics)"
    batch_coupled = True
    module_training = True

    def trace(self, builder: Any, node: Any, mod: Any) -> Any:
        ref = builder._ref(node, node.args[0])
        if not ref.shape or ref.shape[0] != mod.num_features or len(ref.shape) != (3 if isinstance(
                mod, nn.BatchNorm2d) else len(ref.shape)) or len(ref.shape) > 3:
            raise ShapeError(f"{builder.where(node)} expects {mod.num_features} channels first, gets shape {ref.shape}")
        c = ref.shape[0]
        n = math.prod(ref.shape[1:])
        config = {"group": n, "eps": float(mod.eps)}
        out = builder._new_block(node, self.name, [ref], group_edges(c, n), config, name=str(node.target))
        if mod.weight is None and mod.bias is None:
            return out
        builder.block_nodes[out.block] = ""  # the module's output is the affine block's
        return affine_block(builder, node, out, mod, [c] + [1] * (len(ref.shape) - 1))

    def estimate(self, node: Any, mod: Any, size: int, inputs: int) -> tuple[int, int, int]:
        n = size // max(mod.num_features, 1)
        affine = size if mod.weight is not None else 0
        return affine, affine, size * n

    def forward(self, layer: Any, inputs: list[Tensor], w: Tensor | None, b: Tensor | None,
                ctx: ForwardContext) -> Tensor:
        return F.batch_norm(inputs[0], None, None, None, None, True, 0.0, layer.config["eps"])
