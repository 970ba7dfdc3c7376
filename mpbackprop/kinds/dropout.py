"""``Dropout``: identity edges whose coefficient is the sample's mask ``m/(1−p)`` (a per-sample coefficient on
a fixed edge, as MaxPool's gates).

The mask is drawn only when the forward pass is given a generator: a seeded training-mode forward, whose
mask is recorded with the forward (``ForwardRecord.aux``) and used by the backward, which sends
``m_{i,s}/(1−p)·b_{i,s}`` on edge ``i → i``. Training draws one: ``Trainer(model, ..., seed=s)`` owns a
generator seeded with ``s`` (checkpointed in its ``state_dict``), ``InnerStep(..., generator=g)`` and
``train_step(..., generator=g)`` pass theirs to every step, ``net.forward(x, generator=g)`` draws directly.
Without one — evaluation (validation losses), and ``train_step``/``InnerStep`` left at
``generator=None`` — the block is the identity, as the module in ``eval()`` mode; compiling checks it
against the module in that mode. The mask is drawn as ``F.dropout`` draws it (``bernoulli_(1−p)`` on a
tensor of the input's shape, then divided by ``1−p``), so a generator seeded like the global RNG
reproduces the module's own mask (``Trainer(seed=s)`` trains as ``torch.manual_seed(s)`` + ``torch.optim``
when nothing else draws random numbers). Rules do not choose the mask and are not given it: a learned
rule sees, at these neurons, the masked ``z = a = x·m/(1−p)`` and ``b = R.node(M, …)``, and at the
neurons before the block the masked messages ``M = m/(1−p)·b``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .base import BlockGrad, BlockInput, FixedKind, ForwardContext, LayerEdges

__all__ = ["Dropout"]


class Dropout(FixedKind):
    """``nn.Dropout`` (``F.dropout`` is refused: its mask does not follow a module's mode, so compiling could
    not check it against the module)."""

    name = "dropout"
    id = 12
    colour = "#cccccc"
    modules = (nn.Dropout,)
    supported = "Dropout (seeded mask)"
    module_training = False

    def trace(self, builder: Any, node: Any, mod: Any) -> Any:
        ref = builder._ref(node, node.args[0])
        p, inplace = float(mod.p), bool(mod.inplace)
        if inplace:
            raise builder._refuse(node, "inplace=True; use inplace=False")
        if not 0.0 <= p < 1.0:
            raise builder._refuse(node, f"p={p}; use 0 <= p < 1")
        n = int(torch.tensor(ref.shape).prod())
        edges = LayerEdges(src=torch.arange(n), dst=torch.arange(n), coef=torch.ones(n, dtype=torch.float64))
        name = str(node.target) if node.op == "call_module" else node.name
        return builder._new_block(node, self.name, [ref], edges, {"p": p}, name=name)

    def forward(self, layer: Any, inputs: list[Tensor], w: Tensor | None, b: Tensor | None,
                ctx: ForwardContext) -> Tensor:
        x, p = inputs[0], layer.config["p"]
        if ctx.generator is None or p == 0.0:
            return x
        noise = torch.empty_like(x).bernoulli_(1 - p, generator=ctx.generator).div_(1 - p)
        if ctx.aux is not None:
            ctx.aux[layer.index] = noise.reshape(x.shape[0], -1)
        return x * noise

    def edge_coef(self, inp: BlockInput) -> Tensor:
        """``(E, 1, B)`` the recorded mask, or ``(E, 1, 1)`` ones (no mask drawn)."""
        if inp.aux is None:
            return super().edge_coef(inp)
        return inp.aux.t().to(inp.b.dtype).unsqueeze(1)

    def dense(self, inp: BlockInput) -> BlockGrad:
        return BlockGrad(messages=inp.b if inp.aux is None else inp.b * inp.aux.t().unsqueeze(1))
