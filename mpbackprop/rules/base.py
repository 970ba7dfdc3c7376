"""The rule interface: how an error signal travels backwards, and how parameters move.

A *backward rule* fixes the hooks of one backward pass on the graph (method.md §2):

========================  =====================================================  ====================
hook                      what it computes                                       exact backprop
========================  =====================================================  ====================
``seed``                  backward input at the output, from ``∂ℓ/∂a_out``       ``M = ∂ℓ/∂a``
``coefficients``          per-weight message coefficient ``C(s_p)`` (linear)     ``C = w_p``
``message`` / ``reduce``  edge / node UDFs when the message is not linear         —
``node``                  ``b_i`` from the reduced messages ``M_i``              ``b = f'(z)·M``
========================  =====================================================  ====================

The engine (:mod:`mpbackprop.engine`) calls the hooks in the same order for every rule
and never asks which rule it runs. An *update rule* turns per-parameter signals into a
parameter step, like a ``torch.optim`` optimizer written functionally so that meta-training
can differentiate through it.

Shapes: the backward state ``b`` and reduced messages ``M`` of a block are
``(N, d, B)`` — neurons, state channels, batch (batch last so that DGL's ``u_dot_v``
sums over it); ``z``, ``a``, ``fprime`` are ``(N, B)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ..graph.layers import Layer

__all__ = ["BackwardRule", "UpdateRule", "NodeContext", "LayerContext", "UpdateContext", "UpdateHistory"]


@dataclass(frozen=True)
class UpdateHistory:
    """What the update rule offers the backward rule about the run so far, by name.

    Each update rule fills it from its own state (:meth:`UpdateRule.history`), so that a backward
    rule reads a statistic by its meaning rather than by a key that means different things in
    different optimizers (``"v"`` is Adam's second moment but SGD-momentum's velocity).

    Attributes
    ----------
    second_moment : Tensor or None
        Exponential moving average of the squared gradient-like signal, flat ``(P,)`` (or one
        layer's slice); ``None`` when the update rule keeps none (SGD, with or without momentum).
    """

    second_moment: Tensor | None = None

    def slice(self, start: int, stop: int) -> "UpdateHistory":
        """The statistics of parameters ``start:stop`` (one layer's weights)."""
        v = self.second_moment
        return UpdateHistory(None if v is None else v[start:stop])


@dataclass
class NodeContext:
    """What the neuron update of one block sees.

    Attributes
    ----------
    layer : Layer
        The block.
    M : Tensor
        ``(N, d, B)`` reduced messages (for the output block: the seed).
    z, a, fprime : Tensor
        ``(N, B)`` pre-activation, activation and ``f'(z)``.
    depth : float
        Block index / number of blocks, in ``(0, 1]``.
    is_output : bool
        Whether this is the output block.
    """

    layer: Layer
    M: Tensor
    z: Tensor
    a: Tensor
    fprime: Tensor
    depth: float
    is_output: bool


@dataclass
class LayerContext:
    """What the message of one weighted layer sees.

    Attributes
    ----------
    layer : Layer
        The weighted block.
    weight : Tensor
        ``(P_w,)`` current weight values (flat, this layer only).
    rule_state : dict
        The rule's per-network state (e.g. feedback weights), from :meth:`BackwardRule.init_state`.
    depth : float
        Block index / number of blocks.
    history : UpdateHistory
        Statistics the update rule keeps (:class:`UpdateHistory`, fields ``None`` where it keeps
        none), flat over this layer's weights, as they were before this step's update.
    """

    layer: Layer
    weight: Tensor
    rule_state: dict[str, Tensor]
    depth: float
    history: UpdateHistory = field(default_factory=UpdateHistory)


@dataclass
class UpdateContext:
    """What an update rule sees for one step.

    Attributes
    ----------
    theta : Tensor
        ``(P,)`` parameters.
    signal : Tensor
        ``(P, d)`` per-parameter signals; channel 0 is the gradient-like one.
    state : dict
        The update rule's state (from :meth:`UpdateRule.init_state`).
    step : int
        0-based step count.
    segments : Tensor
        ``(P,)`` index of the parameter tensor each parameter belongs to (per-tensor normalisation).
    num_segments : int
        Number of parameter tensors.
    sizes : tuple of int, optional
        Number of parameters of each tensor (tensors are consecutive runs of ``theta``).
    total_steps : int, optional
        The stated length of the run (like a cosine schedule's ``T_max``), when the caller knows it:
        rules whose step size follows the run's progress ``t / total_steps`` need it.
    fan_in : tuple of int, optional
        Fan-in of each tensor's weights (inputs per output unit: ``in`` of a Linear weight,
        ``in·kh·kw`` of a convolution's); ``0`` for biases.
    loss : Tensor, optional
        The training loss of this step's batch at ``theta`` (before the update; a detached scalar), when
        the caller has one: the engine's :func:`~mpbackprop.engine.train_step` passes it. Rules that read
        the run's loss curve need it.
    """

    theta: Tensor
    signal: Tensor
    state: dict[str, Tensor]
    step: int
    segments: Tensor
    num_segments: int
    sizes: tuple[int, ...] | None = None
    total_steps: int | None = None
    fan_in: tuple[int, ...] | None = None
    loss: Tensor | None = None


class BackwardRule(nn.Module):
    """Base class of backward rules. Subclasses override the hooks they change.

    The defaults implement exact backpropagation, so :class:`~mpbackprop.rules.Exact`
    is nearly empty and every other rule states only what it does differently.
    """

    #: Number of backward-state channels ``d``.
    state_dim: int = 1
    #: Short name used on the command line and in checkpoints.
    name: str = "base"

    def config(self) -> dict[str, Any]:
        """Constructor arguments, JSON-serialisable (saved with the rule)."""
        return {}

    def init_state(self, net: Any) -> dict[str, Tensor]:
        """Per-network constant state (e.g. feedback weights); called once per network."""
        return {}

    def seed(self, dloss_da: Tensor, ctx: NodeContext | None = None) -> Tensor:
        """Backward input of the output block from ``∂ℓ/∂a_out`` ``(N, B)`` → ``(N, d, B)``.

        The default puts the loss gradient in channel 0 and zeros elsewhere.
        """
        if self.state_dim == 1:
            return dloss_da.unsqueeze(1)
        pad = dloss_da.new_zeros(dloss_da.shape[0], self.state_dim - 1, dloss_da.shape[1])
        return torch.cat([dloss_da.unsqueeze(1), pad], dim=1)

    def coefficients(self, ctx: LayerContext) -> Tensor | None:
        """Linear message coefficients for the uses of ``ctx.layer``'s weights.

        Returns ``(P_w,)`` (one scalar per weight, all channels), ``(P_w, d)`` (diagonal)
        or ``(P_w, d, d)`` (full matrix), or ``None`` to use :meth:`message` as an edge UDF.
        """
        return ctx.weight

    def message(self, edges: Any) -> dict[str, Tensor]:
        """Edge UDF on the backward block: ``edges.src`` is the post-neuron ``j``,
        ``edges.dst`` the pre-neuron ``i``; must return ``{'m': (E, d, B)}``.

        Available fields: ``src['b']``, ``src['z']``, ``src['a']``, ``src['fprime']``,
        ``dst['z']``, ``dst['a']``, ``dst['fprime']``, ``data['w']`` (the weight of the use),
        ``data['s']`` (per-use features from :meth:`edge_features`, if any).
        """
        return {"m": edges.src["b"] * edges.data["w"].view(-1, 1, 1)}

    def reduce(self, nodes: Any) -> dict[str, Tensor]:
        """Node UDF reducing the mailbox ``nodes.mailbox['m']`` ``(N, deg, d, B)`` to ``{'M': ...}``."""
        return {"M": nodes.mailbox["m"].sum(1)}

    def node(self, ctx: NodeContext) -> Tensor:
        """Backward state ``b = f'(z)·M`` ``(N, d, B)``."""
        return ctx.fprime.unsqueeze(1) * ctx.M


class UpdateRule(nn.Module):
    """Base class of update rules (functional optimizers over the flat parameter vector)."""

    name: str = "update"

    def config(self) -> dict[str, Any]:
        """Constructor arguments, JSON-serialisable (saved with the rule)."""
        return {}

    def init_state(self, theta: Tensor) -> dict[str, Tensor]:
        """Optimizer state for parameters ``theta`` ``(P,)``."""
        return {}

    def step(self, ctx: UpdateContext) -> tuple[Tensor, dict[str, Tensor]]:
        """Return ``(new_theta, new_state)``; must not modify its inputs in place."""
        raise NotImplementedError

    def history(self, state: dict[str, Tensor]) -> UpdateHistory:
        """The named statistics of ``state`` offered to the backward rule (default: none)."""
        return UpdateHistory()
