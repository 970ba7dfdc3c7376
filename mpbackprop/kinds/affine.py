"""``affine``: a learned gain and shift per element or channel, ``z_j = γ_{p(j)}·a_j + β_{p(j)}`` — the
parameters of ``LayerNorm`` and ``BatchNorm`` (the block after their normalization).

Each neuron is one use of its gain (``in_L``/``out_L`` edges ``j → γ_p → j``) and one bias edge, so
``γ`` and ``β`` are ordinary ``param`` nodes: rules compute their signals and messages as for any weight
(exact: ``m = γ_p·b_j``; feedback alignment: a fixed random ``B_p`` in place of ``γ_p``; learned: ``C(s_p)``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .base import DIAGONAL, SCALAR, BlockGrad, BlockInput, ForwardContext, LayerEdges, WeightedKind

__all__ = ["Affine", "affine_block"]


def _param_index(shape: tuple[int, ...], param_view: list[int]) -> Tensor:
    """``(N,)``: the flat parameter index of each neuron of a block of per-sample ``shape``."""
    return torch.arange(math.prod(param_view)).view(param_view).expand(shape).reshape(-1)


def affine_block(builder: Any, node: Any, ref: Any, mod: Any, param_view: list[int]) -> Any:
    """Add the affine block of ``mod`` (its ``weight`` and ``bias``) on top of ``ref``; ``param_view`` is the
    parameters' shape broadcast against the per-sample shape (``(C, 1, 1)`` per channel)."""
    p = _param_index(tuple(ref.shape), param_view)
    n = p.numel()
    edges = LayerEdges(src=torch.arange(n), dst=torch.arange(n), param=p)
    if getattr(mod, "bias", None) is not None:
        edges.bias_dst, edges.bias_param = torch.arange(n), p.clone()
    return builder._new_block(node, Affine.name, [ref], edges, {"param_view": list(param_view)}, module=mod,
                              name=str(node.target))


class Affine(WeightedKind):
    """Per-element or per-channel gain and shift (created by the normalization kinds)."""

    name = "affine"
    id = 9
    colour = "#937860"

    def forward(self, layer: Any, inputs: list[Tensor], w: Tensor | None, b: Tensor | None,
                ctx: ForwardContext) -> Tensor:
        view = layer.config["param_view"]
        out = inputs[0] * w.view(view)  # type: ignore[union-attr]
        return out + b.view(view) if b is not None else out

    def accepts_dense(self, inp: BlockInput) -> bool:
        return super().accepts_dense(inp) and (inp.coef is None or inp.coef.form in (SCALAR, DIAGONAL))

    def dense(self, inp: BlockInput) -> BlockGrad:
        """Sums over the batch and the broadcast axes (a reduction to the parameters' shape); messages
        ``C_{p(j)}·b_j`` element-wise."""
        layer, b, batch = inp.layer, inp.b, inp.batch
        view, shape, d = layer.config["param_view"], layer.shape, b.shape[1]
        axes = [k for k, (v, s) in enumerate(zip(view, shape)) if v == 1 and s != 1]

        def reduce(per_neuron: Tensor) -> Tensor:  # (N, d) -> (P, d)
            x = per_neuron.view(*shape, d)
            return (x.sum(axes) if axes else x).reshape(-1, d) / batch

        out = BlockGrad(weight=reduce((inp.a_src.unsqueeze(1) * b).sum(-1)))
        if layer.bias is not None:
            out.bias = reduce(b.sum(-1))
        if inp.want_messages and inp.coef is not None:
            c = inp.coef.value[_param_index(tuple(shape), view)]
            out.messages = (c.view(-1, 1, 1) if inp.coef.form == SCALAR else c.unsqueeze(-1)) * b
        return out
