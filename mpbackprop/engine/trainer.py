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

As a ``torch.optim`` optimizer, a trainer is checkpointed with :meth:`Trainer.state_dict` beside the
model's own ``state_dict()``; restoring both (:meth:`Trainer.load_state_dict`, before or after the first
step) and feeding the same batches continues the run exactly, bit for bit:

>>> torch.save({"model": model.state_dict(), "trainer": trainer.state_dict()}, "ckpt.pt")
>>> ckpt = torch.load("ckpt.pt", weights_only=True)
>>> model.load_state_dict(ckpt["model"]); trainer.load_state_dict(ckpt["trainer"])
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
from torch import Tensor

from ..device import place, resolve
from .inner_step import InnerStep
from .losses import LossFn, resolve_loss
from ..graph.network import CompiledNetwork, compile
from ..rules import BackwardRule, UpdateRule, load_rule, make_backward, make_update, rule_path

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
    schedule : callable, optional
        ``schedule(step) -> float``, a multiplier of the step the update rule takes at the 0-based
        ``step`` (as ``LambdaLR``'s ``lr_lambda`` multiplies a learning rate): it composes with any update,
        learned ones included, and leaves the update's state (moments) as the update made it. Not part
        of :meth:`state_dict` (a function, as ``LambdaLR``'s is not); the step count it reads is.
    seed : int, optional
        Seeds the dropout masks of training. When the compiled network has a ``Dropout`` block the trainer
        owns a ``torch.Generator`` (on the run's device), made at the first step and seeded with ``seed``,
        which draws every step's masks (as ``F.dropout`` draws them, so a model trained by ``torch.optim``
        after ``torch.manual_seed(seed)`` sees the same masks when nothing else draws random numbers); its
        state is part of :meth:`state_dict`. ``seed=None`` takes the generator's seed from the global RNG
        at the first step (one draw, so ``torch.manual_seed`` beforehand makes the run reproducible, and two
        trainers made one after the other draw different masks). Without ``Dropout`` the seed is unused and
        nothing is drawn. Evaluating the compiled network (``net(x)``, no generator) draws no masks.
    device : str or torch.device
        Where the run's tensors live: ``"cpu"`` (default) or ``"cuda"`` (``"cuda:N"``). The module is
        compiled on the CPU at the first step, then its parameters and buffers, the rules' parameters
        and states move there; batches are moved there at each step. The DGL reference path runs on the
        CPU only: a network and rule that need it on CUDA are refused (:mod:`mpbackprop.device`).
    """

    def __init__(self, model: nn.Module, rule: str | os.PathLike | BackwardRule = "exact",
                 update: str | UpdateRule | None = None, loss: str | LossFn = "cross_entropy",
                 total_steps: int | None = None, schedule: Callable[[int], float] | None = None,
                 seed: int | None = None, device: str | torch.device = "cpu") -> None:
        if total_steps is not None and (isinstance(total_steps, bool) or int(total_steps) != total_steps
                                        or total_steps < 1):
            raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
        if seed is not None and (isinstance(seed, bool) or int(seed) != seed):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        self.device = resolve(device)
        self.model = model
        self.seed = None if seed is None else int(seed)
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
        self.inner: InnerStep | None = None  # the run, from the first step on
        self._steps = 0  # the step count before the first step (a loaded state_dict's)
        self.schedule = schedule
        self._pending: dict[str, Any] | None = None  # loaded state waiting for the first step

    # the run's parts (None / empty before the first step)
    @property
    def net(self) -> CompiledNetwork | None:
        return None if self.inner is None else self.inner.net

    @property
    def theta(self) -> Tensor | None:
        return None if self.inner is None else self.inner.theta

    @property
    def rule_state(self) -> dict[str, Tensor]:
        return {} if self.inner is None else self.inner.rule_state

    @property
    def opt_state(self) -> dict[str, Tensor]:
        return {} if self.inner is None else self.inner.opt_state

    @property
    def generator(self) -> torch.Generator | None:
        """The generator of the dropout masks (``None``: before the first step, or no ``Dropout``)."""
        return None if self.inner is None else self.inner.generator

    @property
    def steps(self) -> int:
        return self._steps if self.inner is None else self.inner.steps

    @steps.setter
    def steps(self, value: int) -> None:
        if self.inner is None:
            self._steps = value
        else:
            self.inner.steps = value

    def _bind(self, x: Tensor) -> None:
        net = compile(self.model, x)
        theta = net.read_from(self.model).clone()
        theta, _, _ = place(net, theta, self.rule, self.update, self.device)  # checked before anything moves
        if self.device.type != "cpu":
            self.model.to(self.device)  # buffers; the parameters become views of theta below
        for p in net.tensors:  # module parameters become views of theta
            self.model.get_parameter(p.path).data = theta[p.offset:p.stop].view(p.shape)
        generator = None
        if any(layer.kind == "dropout" for layer in net.layers):
            generator = torch.Generator(device=theta.device)
            if self._pending is None or self._pending["generator"] is None:  # else the loaded state replaces it
                seed = self.seed
                if seed is None:  # one draw from the global RNG
                    seed = int(torch.empty((), dtype=torch.int64).random_())
                generator.manual_seed(seed)
        self.inner = InnerStep.start(net, theta, self.rule, self.update, total_steps=self.total_steps, loss=self.loss,
                                     generator=generator)
        self.inner.steps = self._steps
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._restore(pending["rule_state"], pending["update_state"], pending["generator"])

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
        if self.inner is None:
            self._bind(x)
        inner = self.inner
        assert inner is not None
        self._sync_frozen()
        theta, step = inner.theta, inner.steps  # the module's parameters are views of theta
        # rule, update and run length may be changed between steps, as an optimizer's param_groups
        inner.rule, inner.update, inner.total_steps = self.rule, self.update, self.total_steps
        result = inner.step(x, y, loss=loss_fn, trace=trace)
        new_theta = result.theta
        if self.schedule is not None:
            factor = float(self.schedule(step))
            new_theta = theta + factor * (new_theta - theta)
        with torch.no_grad():
            theta.copy_(new_theta)
        inner.theta = theta  # the step lands in the module's storage
        return float(result.loss)

    # ------------------------------------------------------------------ checkpoints (torch.optim's convention)
    def state_dict(self) -> dict[str, Any]:
        """Everything the run's next steps depend on besides the model's parameters and the data.

        ``steps`` and ``total_steps``; ``rule`` and ``update`` — name, configuration and learned weights
        of each rule (the analogue of an optimizer's ``param_groups``); ``rule_state`` — the backward
        rule's per-network state (feedback matrices; empty for exact backprop); ``update_state`` — the
        update's moments; ``generator`` — the state (``get_state()``) of the dropout masks' generator, ``None``
        without ``Dropout``. The states are empty, and ``generator`` ``None``, before the first step. Tensors are copies; the dict
        holds only tensors, numbers, strings, lists and dicts, so ``torch.load(weights_only=True)`` reads it.
        """
        def rule_entry(r: nn.Module) -> dict[str, Any]:
            return {"name": r.name, "config": r.config(),
                    "weights": {k: v.detach().clone() for k, v in r.state_dict().items()}}

        if self._pending is not None:  # loaded, not yet bound: hand back what was loaded
            rule_state, update_state = self._pending["rule_state"], self._pending["update_state"]
            generator = self._pending["generator"]
        else:
            rule_state, update_state = self.rule_state, self.opt_state
            generator = None if self.generator is None else self.generator.get_state()
        return {"steps": self.steps, "total_steps": self.total_steps,
                "rule": rule_entry(self.rule), "update": rule_entry(self.update),
                "rule_state": {k: v.detach().clone() for k, v in rule_state.items()},
                "update_state": {k: v.detach().clone() for k, v in update_state.items()},
                "generator": None if generator is None else generator.clone()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (load the model's ``state_dict()`` too: the parameters
        live there). The rules must be the same kind with the same configuration; their learned weights,
        the step count, ``total_steps`` and the states are taken from ``state_dict``. Raises
        ``ValueError`` naming what does not match. The dropout generator's state is restored too (a
        ``state_dict`` without one — saved before the first step, or by an older version — keeps this
        trainer's own generator)."""
        missing = {"steps", "total_steps", "rule", "update", "rule_state", "update_state"} - set(state_dict)
        if missing:
            raise ValueError(f"not a Trainer state_dict: missing {', '.join(sorted(missing))}")
        for key, rule in (("rule", self.rule), ("update", self.update)):
            saved = state_dict[key]
            if saved["name"] != rule.name or saved["config"] != rule.config():
                raise ValueError(f"the state_dict's {key} is {saved['name']} {saved['config']}, this trainer's is "
                                 f"{rule.name} {rule.config()}")
        steps, total = state_dict["steps"], state_dict["total_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        generator = state_dict.get("generator")
        if generator is not None:
            if not isinstance(generator, Tensor) or generator.dtype != torch.uint8:
                raise ValueError(f"the state_dict's generator must be a uint8 tensor (Generator.get_state()) or "
                                 f"None, got {type(generator).__name__}")
            generator = generator.clone()
        for key, rule in (("rule", self.rule), ("update", self.update)):
            rule.load_state_dict(state_dict[key]["weights"])
        self.steps, self.total_steps = steps, total
        rule_state = {k: v.detach().clone() for k, v in state_dict["rule_state"].items()}
        update_state = {k: v.detach().clone() for k, v in state_dict["update_state"].items()}
        if self.net is None:
            self._pending = {"rule_state": rule_state, "update_state": update_state, "generator": generator}
        else:
            self._restore(rule_state, update_state, generator)

    def _restore(self, rule_state: dict[str, Tensor], update_state: dict[str, Tensor],
                 generator: Tensor | None = None) -> None:
        """Put saved states in place of the fresh ones, which fix the keys and shapes they must have
        (empty saved states — saved before any step — keep the fresh ones; so does a ``None`` generator)."""
        for what, saved, fresh in (("rule_state", rule_state, self.rule_state),
                                   ("update_state", update_state, self.opt_state)):
            if not saved:
                continue
            if set(saved) != set(fresh) or any(saved[k].shape != fresh[k].shape for k in fresh):
                shapes = {k: tuple(v.shape) for k, v in saved.items()}
                raise ValueError(f"the state_dict's {what} {shapes} does not fit this model "
                                 f"({ {k: tuple(v.shape) for k, v in fresh.items()} })")
        assert self.inner is not None
        if generator is not None and self.inner.generator is None:
            raise ValueError("the state_dict's generator (dropout masks) does not fit this model: it has no Dropout")
        if generator is not None:
            assert self.inner.generator is not None
            self.inner.generator.set_state(generator)
        dev = self.inner.theta.device
        self.inner.rule_state = {k: v.to(dev) for k, v in rule_state.items()} or self.inner.rule_state
        self.inner.opt_state = {k: v.to(dev) for k, v in update_state.items()} or self.inner.opt_state
