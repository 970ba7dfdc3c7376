"""Hand-designed update rules, written functionally: SGD (with momentum) and Adam.

They read channel 0 of the per-parameter signal (the gradient for exact backprop) and
return new parameters without touching their inputs, so the same code serves plain
training and differentiable unrolls.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import UpdateContext, UpdateHistory, UpdateRule

__all__ = ["SGD", "Adam"]


class SGD(UpdateRule):
    """``v ← μ·v + g``; ``θ ← θ − lr·v`` (PyTorch's convention; ``μ = 0`` is plain SGD)."""

    name = "sgd"

    def __init__(self, lr: float = 0.1, momentum: float = 0.0) -> None:
        super().__init__()
        if lr <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"SGD needs lr > 0 and 0 <= momentum < 1, got lr={lr}, momentum={momentum}")
        self.lr = float(lr)
        self.momentum = float(momentum)

    def config(self) -> dict[str, float]:
        return {"lr": self.lr, "momentum": self.momentum}

    def init_state(self, theta: Tensor) -> dict[str, Tensor]:
        return {"v": torch.zeros_like(theta)} if self.momentum else {}

    def step(self, ctx: UpdateContext) -> tuple[Tensor, dict[str, Tensor]]:
        g = ctx.signal[:, 0]
        if not self.momentum:
            return ctx.theta - self.lr * g, {}
        v = self.momentum * ctx.state["v"] + g
        return ctx.theta - self.lr * v, {"v": v}

    def __repr__(self) -> str:
        return f"SGD(lr={self.lr:g}, momentum={self.momentum:g})"


class Adam(UpdateRule):
    """Adam (Kingma & Ba, 2015) with bias correction, as ``torch.optim.Adam`` computes it."""

    name = "adam"

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"Adam needs lr > 0, got {lr}")
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)

    def config(self) -> dict[str, object]:
        return {"lr": self.lr, "betas": list(self.betas), "eps": self.eps}

    def init_state(self, theta: Tensor) -> dict[str, Tensor]:
        return {"m": torch.zeros_like(theta), "v": torch.zeros_like(theta)}

    def step(self, ctx: UpdateContext) -> tuple[Tensor, dict[str, Tensor]]:
        b1, b2 = self.betas
        g = ctx.signal[:, 0]
        m = b1 * ctx.state["m"] + (1 - b1) * g
        v = b2 * ctx.state["v"] + (1 - b2) * g * g
        t = ctx.step + 1
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        return ctx.theta - self.lr * m_hat / (v_hat.sqrt() + self.eps), {"m": m, "v": v}

    def history(self, state: dict[str, Tensor]) -> UpdateHistory:
        return UpdateHistory(second_moment=state["v"])

    def __repr__(self) -> str:
        return f"Adam(lr={self.lr:g}, betas={self.betas}, eps={self.eps:g})"
