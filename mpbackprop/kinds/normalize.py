"""What LayerNorm and BatchNorm share: normalization over groups of neurons, ``x̂ = (x − μ_G)/σ_G``.

A normalization block's neurons come in contiguous groups ``G`` of ``n`` (LayerNorm: the normalized
trailing axes of one row; BatchNorm: one channel). Every neuron of a group influences every output of
its group through ``μ_G`` and ``σ_G``, so the block's fixed edges are all pairs within each group,
coefficient ``1/n`` (``n²`` edges per group). The exact vector–Jacobian product is

    ``M_i = (b_i − ⟨b⟩_G − x̂_i·⟨x̂ b⟩_G) / σ_G``,

the means ``⟨·⟩_G`` being messages summed over those edges: over the group within one sample for
LayerNorm; for BatchNorm also over the batch (its statistics couple the samples: each edge carries the
source's batch-mean of ``b`` and of ``x̂ b``, so every sample's message depends on the whole batch).
The rule does not choose these messages — a normalization has no parameters; its gain and shift are
the :mod:`~mpbackprop.kinds.affine` block after it — a learned rule sees, at these neurons,
``b = R.node(M, z = x̂, …)`` as at any parameter-free block.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._quiet import ops
from .base import BlockGrad, BlockInput, FixedKind, LayerEdges

__all__ = ["Normalization", "group_edges"]


def group_edges(groups: int, n: int) -> LayerEdges:
    """All pairs ``i → j`` within each of ``groups`` contiguous groups of ``n`` neurons, coefficient ``1/n``."""
    g, i, j = torch.meshgrid(torch.arange(groups), torch.arange(n), torch.arange(n), indexing="ij")
    return LayerEdges(src=(g * n + i).reshape(-1), dst=(g * n + j).reshape(-1),
                      coef=torch.full((groups * n * n,), 1.0 / n, dtype=torch.float64))


class Normalization(FixedKind):
    """Base of the normalization kinds; ``batch_coupled`` says whether statistics run over the batch."""

    batch_coupled: bool = False

    def _stats(self, layer: Any, a: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and ``1/σ`` per neuron ``(N, B)`` (or ``(N, 1)`` over the batch) of source activations ``a``."""
        n, eps = layer.config["group"], layer.config["eps"]
        x = a.reshape(-1, n, a.shape[-1])  # (G, n, B)
        dims = (1, 2) if self.batch_coupled else (1,)
        mean = x.mean(dims, keepdim=True)
        var = (x - mean).square().mean(dims, keepdim=True)
        rstd = torch.rsqrt(var + eps)
        size = (x.shape[0], n, 1 if self.batch_coupled else x.shape[-1])
        return mean.expand(size).reshape(-1, size[-1]), rstd.expand(size).reshape(-1, size[-1])

    def _batch(self, t: Tensor) -> Tensor:
        return t.mean(-1, keepdim=True) if self.batch_coupled else t

    def forward_graph(self, layer: Any, view: Any, a_src: Tensor, theta: Tensor) -> Tensor:
        coef = view.coef.to(a_src.dtype).unsqueeze(-1)
        mean = self._batch(ops.u_mul_e_sum(view.fwd, a_src.contiguous(), coef))
        centred = a_src - mean
        var = self._batch(ops.u_mul_e_sum(view.fwd, centred.square().contiguous(), coef))
        return centred * torch.rsqrt(var + layer.config["eps"])

    def reference(self, inp: BlockInput) -> BlockGrad:
        view, b = inp.view, inp.b
        _, rstd = self._stats(inp.layer, inp.a_src)
        xhat = inp.z.unsqueeze(1)  # (N, 1, B): the block's own pre-activation is x̂
        coef = view.coef.to(b.dtype).view(-1, 1, 1)
        mean_b = ops.u_mul_e_sum(view.bwd, self._batch(b).contiguous(), coef)
        mean_xb = ops.u_mul_e_sum(view.bwd, self._batch(xhat * b).contiguous(), coef)
        return BlockGrad(messages=rstd.unsqueeze(1) * (b - mean_b - xhat * mean_xb))

    def dense(self, inp: BlockInput) -> BlockGrad:
        n = inp.layer.config["group"]
        _, rstd = self._stats(inp.layer, inp.a_src)
        N, d, B = inp.b.shape
        bb = inp.b.view(-1, n, d, B)
        xh = inp.z.view(-1, n, 1, B)
        dims = (1, 3) if self.batch_coupled else (1,)
        m = bb - bb.mean(dims, keepdim=True) - xh * (xh * bb).mean(dims, keepdim=True)
        return BlockGrad(messages=rstd.unsqueeze(1) * m.view(N, d, B))
