"""``LayerNorm``: normalization of each row's trailing axes (:mod:`~mpbackprop.kinds.normalize`: all-pairs
edges within a row, statistics per sample), then its ``weight`` and ``bias`` as ``param`` nodes on an
:mod:`~mpbackprop.kinds.affine` block."""

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

__all__ = ["LayerNorm"]


class LayerNorm(Normalization):
    """``nn.LayerNorm``: the normalization block; the affine block follows when ``elementwise_affine``."""

    name = "layernorm"
    id = 8
    colour = "#8c8c8c"
    modules = (nn.LayerNorm,)
    supported = "LayerNorm"

    def trace(self, builder: Any, node: Any, mod: nn.LayerNorm) -> Any:
        ref = builder._ref(node, node.args[0])
        norm = tuple(mod.normalized_shape)
        if tuple(ref.shape[len(ref.shape) - len(norm):]) != norm:
            raise ShapeError(f"{builder.where(node)} normalizes axes {norm}, gets input of shape {ref.shape}")
        n = math.prod(norm)
        size = math.prod(ref.shape)
        config = {"normalized_shape": list(norm), "group": n, "eps": float(mod.eps)}
        out = builder._new_block(node, self.name, [ref], group_edges(size // n, n), config, name=str(node.target))
        if mod.weight is None and getattr(mod, "bias", None) is None:
            return out
        builder.block_nodes[out.block] = ""  # the module's output is the affine block's
        view = [1] * (len(ref.shape) - len(norm)) + list(norm)
        return affine_block(builder, node, out, mod, view)

    def estimate(self, node: Any, mod: nn.LayerNorm, size: int, inputs: int) -> tuple[int, int, int]:
        n = math.prod(mod.normalized_shape)
        affine = size if mod.weight is not None else 0
        return affine, affine, size * n

    def forward(self, layer: Any, inputs: list[Tensor], w: Tensor | None, b: Tensor | None,
                ctx: ForwardContext) -> Tensor:
        cfg = layer.config
        return F.layer_norm(inputs[0], cfg["normalized_shape"], None, None, cfg["eps"])
