"""One training run in progress, advanced one inner step at a time.

:class:`InnerStep` is the inner training loop's single object (as learned_optimization keeps its
``TruncatedStep`` apart from the meta-gradient estimators): the compiled network, its parameters
``theta``, the backward rule and its per-network state, the update rule and its state, the step
count, the stated run length ``total_steps`` and where batches come from. :meth:`InnerStep.step`
calls :func:`~mpbackprop.engine.train_step` once and keeps what it returned. The
:class:`~mpbackprop.Trainer`, evaluation (:func:`~mpbackprop.evaluation.run_method`), the analysis
(:func:`~mpbackprop.evaluation.analysis.analyze`) and ``tools/bench.py`` all train through it, so they run the
same step with the same inputs.

Whether the step stays on the autograd graph of the rules' meta-parameters is the explicit
``differentiable`` flag (as ``torch.optim``'s ``differentiable=``), fixed when the object is made.

>>> run = InnerStep.start(net, net.values.clone(), Exact(), SGD(0.1), total_steps=100,
...                       batches=lambda: (x, y))
>>> for _ in range(100):
...     result = run.step()          # run.theta, run.opt_state, run.steps have moved on
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .backward import StepResult, train_step
from .losses import LossFn
from ..graph.network import CompiledNetwork
from ..rules.base import BackwardRule, UpdateHistory, UpdateRule

__all__ = ["InnerStep", "Batches"]

#: A batch source: each call returns the next ``(x, y)``.
Batches = Callable[[], tuple[Tensor, Tensor]]


@dataclass(eq=False)
class InnerStep:
    """A network being trained by a backward rule and an update rule.

    Attributes
    ----------
    net : CompiledNetwork
    theta : Tensor
        ``(P,)`` current parameters (replaced, never written in place, by :meth:`step`).
    rule, update : BackwardRule, UpdateRule
    rule_state : dict
        ``rule.init_state(net)`` (feedback weights, …).
    opt_state : dict
        The update rule's state after ``steps`` steps.
    steps : int
        Steps taken so far (the 0-based index of the next one).
    total_steps : int, optional
        The stated length of the run, told to the update rule (schedules need it).
    batches : callable, optional
        Where :meth:`step` takes its batch when it is not given one.
    loss : str or callable
        ``"cross_entropy"``, ``"mse"`` or ``f(output, target) -> scalar``.
    differentiable : bool
        Keep the new parameters on the autograd graph of the rules' meta-parameters.
    fused : bool
        Let the engine use its dense fast paths (``False``: DGL message passing everywhere).
    generator : torch.Generator, optional
        Draws every step's dropout masks (advanced in place, step after step); ``None``: no masks, dropout
        is the identity. A network without dropout never touches it.
    """

    net: CompiledNetwork
    theta: Tensor
    rule: BackwardRule
    update: UpdateRule
    rule_state: dict[str, Tensor]
    opt_state: dict[str, Tensor]
    steps: int = 0
    total_steps: int | None = None
    batches: Batches | None = None
    loss: str | LossFn = "cross_entropy"
    differentiable: bool = False
    fused: bool = True
    generator: torch.Generator | None = None

    @classmethod
    def start(cls, net: CompiledNetwork, theta: Tensor, rule: BackwardRule, update: UpdateRule, *,
              total_steps: int | None = None, batches: Batches | None = None, loss: str | LossFn = "cross_entropy",
              differentiable: bool = False, fused: bool = True,
              generator: torch.Generator | None = None) -> "InnerStep":
        """A run at step 0 from ``theta``: fresh rule state (first) and update state (second), on ``theta``'s
        device (the rules' own parameters must be there too: :mod:`mpbackprop.device`)."""
        rule_state = {k: v.to(theta.device) for k, v in rule.init_state(net).items()}
        return cls(net, theta, rule, update, rule_state, update.init_state(theta), 0, total_steps, batches, loss,
                   differentiable, fused, generator)

    @property
    def history(self) -> UpdateHistory:
        """What the backward rule is offered at the next step (the update's named statistics)."""
        return self.update.history(self.opt_state)

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """The next ``(x, y)`` from :attr:`batches`."""
        if self.batches is None:
            raise ValueError("this InnerStep has no batch source: pass x and y to step()")
        return self.batches()

    def step(self, x: Tensor | None = None, y: Tensor | None = None, *, loss: str | LossFn | None = None,
             trace: bool = False, keep_backward: bool = False) -> StepResult:
        """One training step on ``(x, y)`` (default: :meth:`next_batch`); advances ``theta``,
        ``opt_state`` and ``steps`` and returns :func:`~mpbackprop.engine.train_step`'s result.
        ``loss`` overrides :attr:`loss` for this step; ``trace`` and ``keep_backward`` are passed on."""
        if (x is None) != (y is None):
            raise TypeError("step() takes both x and y, or neither")
        if x is None or y is None:
            x, y = self.next_batch()
        x, y = x.to(self.theta.device), y.to(self.theta.device)  # a batch from the CPU (no copy there)
        result = train_step(self.net, self.theta, x, y, self.rule, self.update, self.rule_state, self.opt_state,
                            self.steps, loss=self.loss if loss is None else loss, differentiable=self.differentiable,
                            trace=trace, fused=self.fused, total_steps=self.total_steps, keep_backward=keep_backward,
                            generator=self.generator)
        self.theta, self.opt_state = result.theta, result.state
        self.steps += 1
        return result
