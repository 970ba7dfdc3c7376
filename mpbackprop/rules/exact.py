"""Exact backpropagation as a message-passing rule: ``m_k = w_p·b_j``, ``b_i = f'(z_i)·M_i``.

The per-parameter signal it produces equals ``torch.autograd.grad`` of the loss; this is
the engine's correctness anchor (tests compare in float64 to 1e-10).
"""

from __future__ import annotations

from .base import BackwardRule

__all__ = ["Exact"]


class Exact(BackwardRule):
    """Exact backprop. All hooks are the :class:`BackwardRule` defaults."""

    name = "exact"
    state_dim = 1

    def __repr__(self) -> str:
        return "Exact()"
