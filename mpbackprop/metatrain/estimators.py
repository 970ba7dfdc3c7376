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

The ``2 × es_pairs`` perturbed copies of a task slot run through
:func:`~mpbackprop.metatrain.batched.unroll_copies`: together, as one batched unroll, where
:func:`~mpbackprop.metatrain.batched.supported` says so (the default exact backward and scheduled update),
else one after another.

An estimator returns a flat gradient vector (so that estimates from several workers can
be averaged with one all-reduce), the mean meta-loss and counters. Its persistent part
(``state_dict``) goes into checkpoints.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..rules import BackwardRule, UpdateRule
from ..tasks.registry import TaskFamily
from .config import MetaConfig
from .distributed import Workers
from .batched import perturbed, unroll_copies
from .inner import InnerState, UnrollResult, new_inner, sample_horizon, unroll

__all__ = ["Estimate", "Estimator", "TruncatedBackprop", "AntitheticES", "PersistentES", "make_estimator",
           "flat_params"]


@dataclass
class Estimate:
    grad: Tensor  # flat, same layout as flat_params
    meta_loss: float  # mean weighted log validation loss over tasks (nan when no weight this step)
    resets: int = 0  # inner runs reset because they diverged
    finished: int = 0  # inner runs that reached their horizon
    reduced: bool = False  # already combined over all workers (ES/PES exchange scalars themselves)
    info: dict[str, Any] = field(default_factory=dict)


def flat_params(modules: list[torch.nn.Module]) -> list[torch.nn.Parameter]:
    return [p for m in modules for p in m.parameters()]


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
    def _fresh(self, i: int, offset: bool = False) -> InnerState:
        """A new inner run for slot ``i``; with ``offset``, advanced (without gradients, by the current
        rule) to a random step of its horizon, so that the slots' runs are out of phase."""
        rng = self.rngs[i]
        spec = self.family.sample(rng, "train")
        horizon = sample_horizon(rng, *self.cfg.unroll)
        inner = new_inner(spec, self.update, horizon, self.cfg.val_examples)
        if offset:
            start = rng.randrange(horizon)
            c = self.cfg
            with torch.no_grad():
                res = unroll(self.rule, self.update, inner, start, "final", 0.0, c.val_examples, c.diverge_factor,
                             False, check_every=max(start // 4, 1))
            if res.diverged or inner.done:
                return self._fresh(i)
        return inner

    def _ensure(self) -> None:
        while len(self.inner) < len(self.slots):  # the first runs of the slots (later ones start at step 0)
            self.inner.append(self._fresh(len(self.inner), offset=self.cfg.start_offsets))

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
    """Antithetic ES over one truncation from a shared inner state.

    Distributed, only scalars travel: every worker draws the perturbations of *every* task slot
    from the slots' shared seeded streams (same order everywhere), evaluates ``L(φ±ε)`` for its
    own slots, and one all-reduce sums the per-pair coefficients ``(L⁺−L⁻)/2σ²`` (plus losses
    and reset flags); each worker then rebuilds the same gradient ``Σ coef·ε``.
    """

    name = "es"

    def __init__(self, cfg: MetaConfig, family: TaskFamily, rule: BackwardRule, update: UpdateRule,
                 slots: list[int] | None = None, workers: Workers | None = None) -> None:
        super().__init__(cfg, family, rule, update, slots)
        self.workers = workers or Workers()
        self.all_slots = list(range(self.workers.world_size * cfg.tasks_per_step)) if slots is not None \
            else list(self.slots)
        self.noise = {k: torch.Generator().manual_seed(cfg.seed * 100_003 + 12_345 + k) for k in self.all_slots}

    def _draw(self) -> dict[int, list[Tensor]]:
        """This step's perturbations of every slot (every worker draws all of them, in order)."""
        size = self._zeros().shape
        return {k: [torch.randn(size, generator=self.noise[k], dtype=torch.float64) * self.cfg.es_sigma
                    for _ in range(self.cfg.es_pairs)] for k in self.all_slots}

    def _copies(self, states: list[InnerState], eps: list[Tensor]) -> list[UnrollResult]:
        """Unroll ``states`` in place, ``states[2j]`` at ``φ + eps[j]`` and ``states[2j+1]`` at ``φ − eps[j]``
        (batched where :func:`~mpbackprop.metatrain.batched.supported`)."""
        c = self.cfg
        deltas = [sign * e for e in eps for sign in (1.0, -1.0)]
        with torch.no_grad():
            return unroll_copies(self.rule, self.update, self.params, states, deltas, c.truncation, c.objective,
                                 c.final_weight, c.val_examples, c.diverge_factor)

    def _combine(self, coef: Tensor, loss: Tensor, used: Tensor, flags: Tensor,
                 directions: dict[int, list[Tensor]]) -> tuple[Estimate, Tensor]:
        """Sum the per-slot scalars over workers and rebuild the gradient from ``directions``."""
        shapes = [t.shape for t in (coef, loss, used, flags)]
        packed = self.workers.sum(torch.cat([t.reshape(-1) for t in (coef, loss, used, flags)]))
        coef, loss, used, flags = [p.view(sh) for p, sh in zip(packed.split([sh.numel() for sh in shapes]), shapes)]
        grad = self._zeros()
        for row, k in enumerate(self.all_slots):
            for j, direction in enumerate(directions[k]):
                if used[row, j] > 0:
                    grad += coef[row, j] * direction
        n = float(used.sum())
        est = Estimate(grad / max(n, 1.0), float(loss.sum()) / n if n else float("nan"),
                       int(flags[:, 0].sum()), int(flags[:, 1].sum()), reduced=True)
        return est, flags

    def _scalars(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        k, p = len(self.all_slots), self.cfg.es_pairs
        z = torch.zeros(k, p, dtype=torch.float64)
        return z.clone(), z.clone(), z.clone(), torch.zeros(k, 2, dtype=torch.float64)

    def estimate(self) -> Estimate:
        self._ensure()
        sigma2 = self.cfg.es_sigma**2
        eps = self._draw()
        coef, loss, used, flags = self._scalars()
        for i, (inner, slot) in enumerate(zip(self.inner, self.slots)):
            row = self.all_slots.index(slot)
            results = self._copies([inner.copy() for _ in range(2 * len(eps[slot]))], eps[slot])
            for j in range(len(eps[slot])):
                lp, lm = [math.nan if r.diverged or r.weight == 0 else float(r.meta_loss) / r.weight
                          for r in results[2 * j:2 * j + 2]]
                if math.isfinite(lp) and math.isfinite(lm):
                    coef[row, j], loss[row, j], used[row, j] = (lp - lm) / (2 * sigma2), 0.5 * (lp + lm), 1.0
            with torch.no_grad():
                res = self._unroll(inner, differentiable=False)
            if res.diverged or inner.done:
                flags[row, 0 if res.diverged else 1] = 1.0
                self.inner[i] = self._fresh(i)
        est, _ = self._combine(coef, loss, used, flags, eps)
        return est

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "noise": [self.noise[k].get_state() for k in self.all_slots]}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        super().load_state_dict(d)
        for k, state in zip(self.all_slots, d["noise"]):
            self.noise[k].set_state(state)


class PersistentES(AntitheticES):
    """PES: per-pair persistent inner states and accumulated perturbations ``ξ``.

    Every worker keeps ``ξ`` of every slot (it knows every slot's perturbations and, through the
    all-reduced flags, when a slot's task restarts), so only scalars travel here too.
    """

    name = "pes"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pairs: list[list[tuple[InnerState, InnerState]]] = []
        self.xi = {k: [self._zeros() for _ in range(self.cfg.es_pairs)] for k in self.all_slots}

    def _new_pairs(self, inner: InnerState) -> list[tuple[InnerState, InnerState]]:
        return [(inner.copy(), inner.copy()) for _ in range(self.cfg.es_pairs)]

    def _ensure(self) -> None:
        super()._ensure()
        while len(self.pairs) < len(self.inner):
            self.pairs.append(self._new_pairs(self.inner[len(self.pairs)]))

    def estimate(self) -> Estimate:
        self._ensure()
        sigma2 = self.cfg.es_sigma**2
        eps = self._draw()
        for k in self.all_slots:
            self.xi[k] = [x + e for x, e in zip(self.xi[k], eps[k])]
        coef, loss, used, flags = self._scalars()
        for i, slot in enumerate(self.slots):
            row = self.all_slots.index(slot)
            results = self._copies([s for pair in self.pairs[i] for s in pair], eps[slot])
            reset = any(r.diverged for r in results)
            for j in range(len(self.pairs[i])):
                vals = [float(r.meta_loss) / r.weight if r.weight > 0 else math.nan for r in results[2 * j:2 * j + 2]]
                if all(math.isfinite(v) for v in vals):
                    coef[row, j], loss[row, j], used[row, j] = (vals[0] - vals[1]) / (2 * sigma2), \
                        0.5 * (vals[0] + vals[1]), 1.0
            done = self.pairs[i][0][0].done
            if reset or done:
                flags[row, 0 if reset else 1] = 1.0
                self.inner[i] = self._fresh(i)
                self.pairs[i] = self._new_pairs(self.inner[i])
        est, flags = self._combine(coef, loss, used, flags, self.xi)
        for row, k in enumerate(self.all_slots):  # restarted tasks start a new accumulation
            if flags[row].sum() > 0:
                self.xi[k] = [self._zeros() for _ in range(self.cfg.es_pairs)]
        return est

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(),
                "pairs": [[(p.to_dict(), m.to_dict()) for p, m in row] for row in self.pairs],
                "xi": [list(self.xi[k]) for k in self.all_slots]}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        super().load_state_dict(d)
        self.pairs = [[(InnerState.from_dict(p), InnerState.from_dict(m)) for p, m in row] for row in d["pairs"]]
        self.xi = {k: list(row) for k, row in zip(self.all_slots, d["xi"])}


def make_estimator(cfg: MetaConfig, family: TaskFamily, rule: BackwardRule, update: UpdateRule,
                   slots: list[int] | None = None, workers: Workers | None = None) -> Estimator:
    """The estimator ``cfg.estimator`` over task ``slots`` (default: ``0..tasks_per_step-1``)."""
    if cfg.estimator == "tbptt":
        return TruncatedBackprop(cfg, family, rule, update, slots)
    cls = AntitheticES if cfg.estimator == "es" else PersistentES
    return cls(cfg, family, rule, update, slots, workers)


def _as_tuple(x: Any) -> Any:
    """Python RNG states come back from ``torch.load`` as lists; ``setstate`` wants tuples."""
    if isinstance(x, list):
        return tuple(_as_tuple(v) for v in x)
    return x
