"""The inner problem: a task trained by the rule, one truncation at a time.

An :class:`InnerState` is one task in progress — its parameters, optimizer state, step
count, sampled horizon ``T`` and batch-order generator — carried across truncations and
saved in checkpoints. :func:`unroll` runs up to ``K`` steps of it and returns the
weighted meta-loss ``Σ_t w_t·log L_valid(θ_t)`` (differentiable in the rule's
meta-parameters when asked).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..engine.inner_step import InnerStep
from ..rules import BackwardRule, UpdateRule
from ..tasks.registry import ON_FORGET, Task, TaskSpec

__all__ = ["InnerState", "new_inner", "unroll", "step_weight", "UnrollResult"]


@dataclass
class InnerState:
    spec: TaskSpec
    theta: Tensor
    opt_state: dict[str, Tensor]
    step: int
    horizon: int
    gen: torch.Generator
    initial_loss: float

    @property
    def done(self) -> bool:
        return self.step >= self.horizon

    def detach(self) -> "InnerState":
        return InnerState(self.spec, self.theta.detach(), {k: v.detach() for k, v in self.opt_state.items()},
                          self.step, self.horizon, self.gen, self.initial_loss)

    def copy(self) -> "InnerState":
        gen = torch.Generator()
        gen.set_state(self.gen.get_state())
        return InnerState(self.spec, self.theta.detach().clone(),
                          {k: v.detach().clone() for k, v in self.opt_state.items()},
                          self.step, self.horizon, gen, self.initial_loss)

    def to_dict(self) -> dict[str, Any]:
        return {"spec": self.spec.to_json(), "theta": self.theta.detach(),
                "opt_state": {k: v.detach() for k, v in self.opt_state.items()}, "step": self.step,
                "horizon": self.horizon, "gen": self.gen.get_state(), "initial_loss": self.initial_loss}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InnerState":
        gen = torch.Generator()
        gen.set_state(d["gen"])
        return cls(TaskSpec.from_json(d["spec"]), d["theta"], dict(d["opt_state"]), int(d["step"]),
                   int(d["horizon"]), gen, float(d["initial_loss"]))


_TASKS: dict[TaskSpec, Task] = {}
ON_FORGET.append(_TASKS.clear)  # a task file reloaded with new content: its tasks are built again


def get_task(spec: TaskSpec) -> Task:
    """Task objects are cached: data and compiled graphs are shared between inner states."""
    task = _TASKS.get(spec)
    if task is None:
        if len(_TASKS) > 256:
            _TASKS.clear()
        task = _TASKS[spec] = Task(spec)
    return task


def sample_horizon(rng: random.Random, lo: int, hi: int) -> int:
    """Log-uniform integer in ``[lo, hi]``."""
    if lo == hi:
        return lo
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def new_inner(spec: TaskSpec, update: UpdateRule, horizon: int, val_examples: int) -> InnerState:
    task = get_task(spec)
    theta = task.theta0.clone()
    with torch.no_grad():
        loss, _ = task.evaluate(theta, val_examples)
    return InnerState(spec, theta, update.init_state(theta), 0, horizon, task.batch_generator(),
                      float(loss))


def step_weight(t: int, horizon: int, objective: str, final_weight: float) -> float:
    """Weight of the validation loss after inner step ``t`` (0-based) of an unroll of ``horizon`` steps."""
    last = 1.0 if t == horizon - 1 else 0.0
    if objective == "mean":
        return 1.0 / horizon
    if objective == "final":
        return last
    return (1.0 - final_weight) / horizon + final_weight * last


@dataclass
class UnrollResult:
    meta_loss: Tensor  # weighted sum of log validation losses over the steps run
    weight: float  # sum of the weights used
    diverged: bool
    last_val_loss: float
    steps: int


def unroll(rule: BackwardRule, update: UpdateRule, inner: InnerState, steps: int, objective: str,
           final_weight: float, val_examples: int, diverge_factor: float, differentiable: bool,
           check_every: int = 1) -> UnrollResult:
    """Advance ``inner`` in place by up to ``steps`` inner steps (stops at its horizon).

    The validation loss is computed after every step whose objective weight is not zero, and every
    ``check_every`` steps otherwise (to stop a diverging run); the update rule is told the run's
    length (``total_steps = inner.horizon``).
    """
    task = get_task(inner.spec)
    run = InnerStep(task.net, inner.theta, rule, update, rule.init_state(task.net), inner.opt_state, inner.step,
                    total_steps=inner.horizon, batches=lambda: task.batch(inner.gen), loss=task.loss,
                    differentiable=differentiable)
    total = torch.zeros((), dtype=inner.theta.dtype)
    wsum = 0.0
    diverged = False
    last = float("nan")
    done = 0
    for _ in range(steps):
        if inner.done:
            break
        w = step_weight(inner.step, inner.horizon, objective, final_weight)
        run.step()
        inner.theta, inner.opt_state, inner.step = run.theta, run.opt_state, run.steps
        done += 1
        if not w and inner.step % check_every and not inner.done:
            continue
        val, _ = task.evaluate(inner.theta, val_examples)
        last = float(val)
        if not math.isfinite(last) or last > diverge_factor * max(inner.initial_loss, 1e-3):
            diverged = True
            break
        if w:
            total = total + w * torch.log(val)
            wsum += w
    return UnrollResult(total, wsum, diverged, last, done)
