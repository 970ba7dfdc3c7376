"""Meta-gradient estimators behind one interface.

* :class:`TruncatedBackprop` — backprop through ``K`` inner steps (the whole engine is
  differentiable), inner state carried and detached between truncations.
* :class:`AntitheticES` — antithetic evolution strategies on one truncation
  (Salimans et al., 2017): ``ĝ = Σ (L(φ+ε) − L(φ−ε)) ε / (2σ²P)``; the inner state
  advances with the unperturbed rule. Needs no backprop through the engine.
* :class:`PersistentES` — PES (Vicol et al., 2021, *Unbiased gradient estimation in
  unrolled computation graphs with persistent evolution strategies*): each antithetic
  pair keeps its own inner state and accumulates its perturbations ``ξ``, so the
  estimate is unbiased across truncations.

An estimator returns a flat gradient vector (so that estimates from several workers can
be averaged with one all-reduce), the mean meta-loss and counters. Its persistent part
(``state_dict``) goes into checkpoints.
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor

from ..rules import BackwardRule, UpdateRule
from ..tasks import TaskFamily
from .config import MetaConfig
from .inner import InnerState, new_inner, sample_horizon, unroll

__all__ = ["Estimate", "Estimator", "TruncatedBackprop", "AntitheticES", "PersistentES", "make_estimator",
           "flat_params"]


@dataclass
class Estimate:
    grad: Tensor  # flat, same layout as flat_params
    meta_loss: float  # mean weighted log validation loss over tasks (nan when no weight this step)
    resets: int = 0  # inner runs reset because they diverged
    finished: int = 0  # inner runs that reached their horizon
    info: dict[str, Any] = field(default_factory=dict)


def flat_params(modules: list[torch.nn.Module]) -> list[torch.nn.Parameter]:
    return [p for m in modules for p in m.parameters()]


@contextmanager
def perturbed(params: list[torch.nn.Parameter], eps: Tensor) -> Iterator[None]:
    """Temporarily set the flat meta-parameters to ``φ + eps`` (restored exactly afterwards)."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        k = 0
        for p in params:
            n = p.numel()
            p.add_(eps[k:k + n].view_as(p).to(p.dtype))
            k += n
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


class Estimator:
    """Base: owns the in-progress inner states of the tasks it averages over."""

    name = "base"

    def __init__(self, cfg: MetaConfig, family: TaskFamily, rule: BackwardRule, update: UpdateRule,
                 slots: list[int] | None = None) -> None:
        self.cfg, self.family, self.rule, self.update = cfg, family, rule, update
        self.params = flat_params([rule, update])
        # Each task slot has its own random streams, so a slot samples the same tasks whichever
        # process runs it: W workers with M slots each reproduce one process with W·M slots.
        self.slots = list(range(cfg.tasks_per_step)) if slots is None else list(slots)
        self.rngs = [random.Random(f"{cfg.seed}/slot{k}") for k in self.slots]
        self.inner: list[InnerState] = []

    # --------------------------------------------------------------- helpers
    def _fresh(self, i: int) -> InnerState:
        rng = self.rngs[i]
        spec = self.family.sample(rng, "train")
        horizon = sample_horizon(rng, *self.cfg.unroll)
        return new_inner(spec, self.update, horizon, self.cfg.val_examples)

    def _ensure(self) -> None:
        while len(self.inner) < len(self.slots):
            self.inner.append(self._fresh(len(self.inner)))

    def _unroll(self, inner: InnerState, differentiable: bool):
        c = self.cfg
        return unroll(self.rule, self.update, inner, c.truncation, c.objective, c.final_weight, c.val_examples,
                      c.diverge_factor, differentiable)

    def _zeros(self) -> Tensor:
        return torch.zeros(sum(p.numel() for p in self.params), dtype=torch.float64)

    def estimate(self) -> Estimate:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"slots": list(self.slots), "inner": [s.to_dict() for s in self.inner],
                "rngs": [r.getstate() for r in self.rngs]}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if list(d["slots"]) != self.slots:
            raise ValueError(f"checkpoint holds task slots {list(d['slots'])}, this worker runs {self.slots}")
        self.inner = [InnerState.from_dict(s) for s in d["inner"]]
        for r, state in zip(self.rngs, d["rngs"]):
            r.setstate(_as_tuple(state))


class TruncatedBackprop(Estimator):
    """Backprop through each truncation of ``K`` inner steps."""

    name = "tbptt"

    def estimate(self) -> Estimate:
        self._ensure()
        objective = torch.zeros((), dtype=torch.float64)
        losses, resets, finished = [], 0, 0
        for i, inner in enumerate(self.inner):
            res = self._unroll(inner, differentiable=True)
            if res.diverged:
                self.inner[i] = self._fresh(i)
                resets += 1
                continue
            if res.weight > 0:
                objective = objective + (res.meta_loss / res.weight).to(torch.float64) / len(self.inner)
                losses.append(float(res.meta_loss) / res.weight)
            if inner.done:
                finished += 1
        grad = self._zeros()
        if objective.requires_grad:
            grads = torch.autograd.grad(objective, self.params, allow_unused=True)
            grad = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).to(torch.float64)
                              for g, p in zip(grads, self.params)])
        self.inner = [s.detach() if not s.done else self._fresh(i) for i, s in enumerate(self.inner)]
        mean = sum(losses) / len(losses) if losses else float("nan")
        return Estimate(grad, mean, resets, finished)


class AntitheticES(Estimator):
    """Antithetic ES over one truncation from a shared inner state."""

    name = "es"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.noise = [torch.Generator().manual_seed(self.cfg.seed * 100_003 + 12_345 + k) for k in self.slots]

    def _eps(self, i: int) -> Tensor:
        return torch.randn(self._zeros().shape, generator=self.noise[i], dtype=torch.float64) * self.cfg.es_sigma

    def _pair_loss(self, inner: InnerState, eps: Tensor) -> tuple[float, float, bool]:
        out = []
        for sign in (1.0, -1.0):
            trial = inner.copy()
            with perturbed(self.params, sign * eps), torch.no_grad():
                res = self._unroll(trial, differentiable=False)
            if res.diverged or res.weight == 0:
                return math.nan, math.nan, res.diverged
            out.append(float(res.meta_loss) / res.weight)
        return out[0], out[1], False

    def estimate(self) -> Estimate:
        self._ensure()
        sigma2 = self.cfg.es_sigma**2
        grad = self._zeros()
        losses, resets, finished, used = [], 0, 0, 0
        for i, inner in enumerate(self.inner):
            for _ in range(self.cfg.es_pairs):
                eps = self._eps(i)
                lp, lm, _ = self._pair_loss(inner, eps)
                if math.isfinite(lp) and math.isfinite(lm):
                    grad += (lp - lm) / (2 * sigma2) * eps
                    losses.append(0.5 * (lp + lm))
                    used += 1
            with torch.no_grad():
                res = self._unroll(inner, differentiable=False)
            if res.diverged:
                self.inner[i] = self._fresh(i)
                resets += 1
            elif inner.done:
                finished += 1
                self.inner[i] = self._fresh(i)
        grad = grad / max(used, 1)
        mean = sum(losses) / len(losses) if losses else float("nan")
        return Estimate(grad, mean, resets, finished)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "noise": [g.get_state() for g in self.noise]}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        super().load_state_dict(d)
        for g, state in zip(self.noise, d["noise"]):
            g.set_state(state)


class PersistentES(AntitheticES):
    """PES: per-pair persistent inner states and accumulated perturbations."""

    name = "pes"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pairs: list[list[tuple[InnerState, InnerState]]] = []
        self.xi: list[list[Tensor]] = []

    def _new_pairs(self, inner: InnerState) -> tuple[list[tuple[InnerState, InnerState]], list[Tensor]]:
        return ([(inner.copy(), inner.copy()) for _ in range(self.cfg.es_pairs)],
                [self._zeros() for _ in range(self.cfg.es_pairs)])

    def _ensure(self) -> None:
        super()._ensure()
        while len(self.pairs) < len(self.inner):
            p, x = self._new_pairs(self.inner[len(self.pairs)])
            self.pairs.append(p)
            self.xi.append(x)

    def estimate(self) -> Estimate:
        self._ensure()
        sigma2 = self.cfg.es_sigma**2
        grad = self._zeros()
        losses, resets, finished, used = [], 0, 0, 0
        for i in range(len(self.inner)):
            reset = False
            for j, (plus, minus) in enumerate(self.pairs[i]):
                eps = self._eps(i)
                self.xi[i][j] = self.xi[i][j] + eps
                vals = []
                for state, sign in ((plus, 1.0), (minus, -1.0)):
                    with perturbed(self.params, sign * eps), torch.no_grad():
                        res = self._unroll(state, differentiable=False)
                    reset |= res.diverged
                    vals.append(float(res.meta_loss) / res.weight if res.weight > 0 else math.nan)
                if all(math.isfinite(v) for v in vals):
                    grad += (vals[0] - vals[1]) / (2 * sigma2) * self.xi[i][j]
                    losses.append(0.5 * (vals[0] + vals[1]))
                    used += 1
            done = self.pairs[i][0][0].done
            if reset or done:
                resets += int(reset)
                finished += int(done and not reset)
                self.inner[i] = self._fresh(i)
                self.pairs[i], self.xi[i] = self._new_pairs(self.inner[i])
        grad = grad / max(used, 1)
        mean = sum(losses) / len(losses) if losses else float("nan")
        return Estimate(grad, mean, resets, finished)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(),
                "pairs": [[(p.to_dict(), m.to_dict()) for p, m in row] for row in self.pairs],
                "xi": [list(row) for row in self.xi]}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        super().load_state_dict(d)
        self.pairs = [[(InnerState.from_dict(p), InnerState.from_dict(m)) for p, m in row] for row in d["pairs"]]
        self.xi = [list(row) for row in d["xi"]]


def make_estimator(cfg: MetaConfig, family: TaskFamily, rule: BackwardRule, update: UpdateRule,
                   slots: list[int] | None = None) -> Estimator:
    """The estimator ``cfg.estimator`` over task ``slots`` (default: ``0..tasks_per_step-1``)."""
    cls = {"tbptt": TruncatedBackprop, "es": AntitheticES, "pes": PersistentES}[cfg.estimator]
    return cls(cfg, family, rule, update, slots)


def _as_tuple(x: Any) -> Any:
    """Python RNG states come back from ``torch.load`` as lists; ``setstate`` wants tuples."""
    if isinstance(x, list):
        return tuple(_as_tuple(v) for v in x)
    return x
