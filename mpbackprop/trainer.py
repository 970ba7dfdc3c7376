"""A ``torch.optim``-style training API for plain PyTorch users.

>>> trainer = mpbackprop.Trainer(model, rule="fa", update=mpbackprop.rules.Adam(lr=1e-2))
>>> for x, y in batches:
...     loss = trainer.step(x, y)          # parameters of `model` are updated in place

The module is compiled on the first step (from the batch's shape). Its parameters then
become views into one flat parameter vector, so the engine's functional updates land in
the module without copies and the module stays usable as it was. Parameters with
``requires_grad=False`` are frozen, as a ``torch.optim`` optimizer skips them: every step
leaves them (and their update state) unchanged, bit for bit, with every rule and update; the
flag is read again at each step, so freezing or unfreezing between steps takes effect.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.nn as nn
from torch import Tensor

from .engine import train_step
from .losses import LossFn, resolve_loss
from .network import CompiledNetwork, compile
from .rules import BackwardRule, UpdateRule, load_rule, make_backward, make_update, rule_path

__all__ = ["Trainer"]


class Trainer:
    """Train ``model`` with a message-passing backward rule and an update rule.

    Parameters
    ----------
    model : nn.Module
        A supported network (see ``mpbackprop compile``).
    rule : str, BackwardRule or path
        ``"exact"``, ``"fa"``, ``"learned"``, a rule object, a saved rule file (``.pt`` from
        meta-training) or ``"default"`` (the packaged meta-trained rule); a saved rule brings
        its own update rule unless ``update`` is given.
    update : str or UpdateRule, optional
        ``"sgd"``, ``"adam"``, ``"learned"`` or an object; default Adam(lr=1e-3).
    loss : str or callable
        ``"cross_entropy"`` (default), ``"mse"``, or ``f(output, target) -> scalar``.
    total_steps : int, optional
        The length of the training run, as for a cosine schedule's ``T_max``: update rules with a
        schedule (the ``scheduled`` learned update) need it; past it they keep their final step size.
    """

    def __init__(self, model: nn.Module, rule: str | os.PathLike | BackwardRule = "exact",
                 update: str | UpdateRule | None = None, loss: str | LossFn = "cross_entropy",
                 total_steps: int | None = None) -> None:
        if total_steps is not None and (isinstance(total_steps, bool) or int(total_steps) != total_steps
                                        or total_steps < 1):
            raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
        self.model = model
        self.total_steps = None if total_steps is None else int(total_steps)
        saved_update: UpdateRule | None = None
        if isinstance(rule, BackwardRule):
            self.rule = rule
        elif isinstance(rule, os.PathLike) or str(rule).endswith(".pt") or str(rule) == "default":
            self.rule, saved_update, self.rule_meta = load_rule(rule_path(rule))
        else:
            self.rule = make_backward(str(rule))
        if isinstance(update, UpdateRule):
            self.update = update
        elif update is not None:
            self.update = make_update(update)
        else:
            self.update = saved_update or make_update("adam", lr=1e-3)
        self.loss = resolve_loss(loss)
        self.net: CompiledNetwork | None = None
        self.theta: Tensor | None = None
        self.rule_state: dict[str, Tensor] = {}
        self.opt_state: dict[str, Tensor] = {}
        self.steps = 0

    def _bind(self, x: Tensor) -> None:
        net = compile(self.model, x)
        theta = net.read_from(self.model).clone()
        for p in net.tensors:  # module parameters become views of theta
            self.model.get_parameter(p.path).data = theta[p.offset:p.stop].view(p.shape)
        self.net, self.theta = net, theta
        self.rule_state = self.rule.init_state(net)
        self.opt_state = self.update.init_state(theta)

    def _sync_frozen(self) -> None:
        """Mark the network's tensors frozen exactly where the module's ``requires_grad`` is False."""
        assert self.net is not None
        changed = {}
        for p in self.net.tensors:
            frozen = not self.model.get_parameter(p.path).requires_grad
            if frozen != p.frozen:
                changed[p.path] = frozen
        if changed:
            self.net.set_frozen(changed)

    def step(self, *args: Any, trace: bool = False) -> float:
        """``step(x, y)`` or ``step(loss_fn, x, y)``: one training step; returns the loss."""
        if len(args) == 3 and callable(args[0]):
            loss_fn: Callable = args[0]
            x, y = args[1], args[2]
        elif len(args) == 2:
            loss_fn, (x, y) = self.loss, args
        else:
            raise TypeError("use step(x, y) or step(loss_fn, x, y)")
        if self.net is None:
            self._bind(x)
        assert self.net is not None and self.theta is not None
        self._sync_frozen()
        result = train_step(self.net, self.theta, x, y, self.rule, self.update, self.rule_state, self.opt_state,
                            self.steps, loss=loss_fn, trace=trace, total_steps=self.total_steps)
        with torch.no_grad():
            self.theta.copy_(result.theta)
        self.opt_state = result.state
        self.steps += 1
        return float(result.loss)
