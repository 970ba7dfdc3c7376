"""Probe a hand-set, bounded per-tensor step controller on top of a scheduled rule, on *meta-validation* tasks.

    python tools/probe_controller.py NAME=BETA[:SHIFT[:BOUND[:TARGET]]] NAME=loss-set:S[:RREF[:WINDOW[:BOUND]]]
        NAME=loss-follow:S[:RREF[:CAP[:LOW]]] [NAME=...] [--rule default]
        [--suites heldout,conv,long] [--seeds 10] [--tasks 3] [--long-seeds 3] [--long-tasks 1] [--out results/probe]

A prototype, not part of the package: the question is whether a step size that reacts to the run's own
gradients can give the convnets (which want about twice the shipped step at T) and the MLPs (which want
about half) each their step, before anything is built into :class:`~mpbackprop.rules.ScheduledUpdate`.
Per weight tensor ``i`` the rule's step is multiplied by ``κ_i``, with

    log κ_i ← clip(log κ_i + β·(cos(g_t, m_{t−1}) − target), −log BOUND, log BOUND),   log κ_i = 0 at the start,

``cos`` the cosine between the tensor's gradient and its momentum (0.9) before this step: gradients that
keep their direction raise the step, gradients that turn against the momentum lower it (a bounded,
per-tensor form of hypergradient descent, Baydin et al., 2018). ``SHIFT`` is added to the rule's ``a``
(``-0.693``: half the peak rate). ``β = 0`` is the rule itself. The suites, seeds and tuned-Adam
baselines are those of ``tools/probe.py`` (validation split; Adam tuned per task and horizon, cached
under ``--out``/tuning). The controller runs on the rule's eager step (fused kernels off). Writes
``--out``/controller.json.

Two controllers read the training loss instead (``UpdateContext.loss``, the batch loss before the step), one
``κ`` for the whole network, ``L_0`` the first step's loss:

* ``loss-set`` sets ``κ`` once from how fast the loss fell: for the first ``K = min(WINDOW, max(T/5, 4))`` steps the
  rule steps with ``κ = 1`` at the reference horizon's rate (so the measurement does not depend on ``T``);
  at step ``K``, ``log κ = clip(S·(log r − log RREF), ±log BOUND)`` with ``r`` the mean loss of the last 4
  window steps over ``L_0``, held for the rest of the run (on meta-validation tasks, tuned Adam's rate at T
  grew with this ratio: a slow fall wants a larger step).
* ``loss-follow`` lets the step follow the loss, as a Polyak step does: ``κ_t = clip((L̂_t/(RREF·L_0))^S,
  1/LOW, CAP)`` with ``L̂_t`` the bias-corrected running mean (0.9) of the batch losses.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from mpbackprop import _json
from mpbackprop import evaluation as ev
from mpbackprop._io import atomic_write
from mpbackprop.rules import ScheduledUpdate, kernels
from mpbackprop.rules.base import UpdateContext

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import probe  # noqa: E402  (suites, baselines and report lines shared with the probe of rule variants)


class Controlled(ScheduledUpdate):
    """A :class:`ScheduledUpdate` whose per-tensor step is multiplied by the controller's ``κ``."""

    def __init__(self, *args, beta: float = 0.0, bound: float = 4.0, target: float = 0.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not (beta >= 0 and bound >= 1 and -1 <= target <= 1):
            raise ValueError(f"need beta >= 0, bound >= 1, -1 <= target <= 1; got {beta}, {bound}, {target}")
        self.beta, self.log_bound, self.target = float(beta), math.log(bound), float(target)
        self._kappa: torch.Tensor | None = None

    def step(self, ctx: UpdateContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        g, m_prev = ctx.signal[:, 0], ctx.state["m"][0]
        log_kappa = ctx.state.get("log_kappa", g.new_zeros(ctx.num_segments))
        if ctx.step > 0:
            def per_tensor(x: torch.Tensor) -> torch.Tensor:
                return g.new_zeros(ctx.num_segments).index_add_(0, ctx.segments, x)
            cos = per_tensor(g * m_prev) / (per_tensor(g * g).sqrt() * per_tensor(m_prev * m_prev).sqrt() + 1e-30)
            log_kappa = (log_kappa + self.beta * (cos - self.target)).clamp(-self.log_bound, self.log_bound)
        self._kappa = torch.exp(log_kappa)
        theta, state = super().step(ctx)
        return theta, {**state, "log_kappa": log_kappa}

    def _width_factors(self, ctx: UpdateContext, sizes: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        assert self._kappa is not None
        kappa = torch.repeat_interleave(self._kappa.to(like.dtype), torch.tensor(sizes, device=like.device),
                                        output_size=like.numel())
        width = super()._width_factors(ctx, sizes, like)
        return kappa if width is None else width * kappa


class _LossScaled(ScheduledUpdate):
    """A :class:`ScheduledUpdate` whose step size is multiplied by one ``κ`` for the network, which a
    subclass sets from the training loss before each step."""

    kind = ""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._kappa: torch.Tensor | float = 1.0

    def _loss(self, ctx: UpdateContext) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's loss ``(1,)`` in the parameters' dtype and the run's first loss ``L_0`` (kept in the state)."""
        if ctx.loss is None or ctx.total_steps is None:
            raise ValueError(f"the {self.kind} controller needs the step's loss and the run's length "
                             "(train_step passes both)")
        loss = ctx.loss.to(ctx.theta.dtype).reshape(1)
        return loss, ctx.state.get("l0", loss)

    def step_size(self, step: int, total_steps: int) -> torch.Tensor:
        return super().step_size(step, total_steps) * self._kappa


class LossSet(_LossScaled):
    """A :class:`ScheduledUpdate` whose step is scaled once, at the end of a short window, by the loss's fall."""

    kind = "loss-set"

    def __init__(self, *args, s: float = 0.0, rref: float = 0.3, window: int = 20, bound: float = 4.0,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not (rref > 0 and window >= 4 and bound >= 1):
            raise ValueError(f"need RREF > 0, WINDOW >= 4, BOUND >= 1; got {rref}, {window}, {bound}")
        self.s, self.rref, self.window, self.log_bound = float(s), float(rref), int(window), math.log(bound)
        self._in_window = False

    def step(self, ctx: UpdateContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, l0 = self._loss(ctx)
        assert ctx.total_steps is not None
        last = ctx.state.get("last", loss.new_zeros(4))
        log_kappa = ctx.state.get("log_kappa", loss.new_zeros(1))
        k = min(self.window, max(ctx.total_steps // 5, 4))
        if k - 4 <= ctx.step < k:
            last = last.clone()
            last[ctx.step - (k - 4)] = loss[0]
        elif ctx.step == k:
            ratio = (last.mean() / l0).clamp_min(1e-12)
            log_kappa = (self.s * (torch.log(ratio) - math.log(self.rref))).clamp(-self.log_bound, self.log_bound)
        self._in_window = ctx.step < k
        self._kappa = torch.exp(log_kappa)[0]
        theta, state = super().step(ctx)
        return theta, {**state, "l0": l0, "last": last, "log_kappa": log_kappa}

    def step_size(self, step: int, total_steps: int) -> torch.Tensor:
        if self._in_window:  # kappa 1 at the reference horizon's rate: the same measurement at every T
            return ScheduledUpdate.step_size(self, step, min(total_steps, self.horizon_ref))
        return super().step_size(step, total_steps)


class LossFollow(_LossScaled):
    """A :class:`ScheduledUpdate` whose step is scaled by the running training loss relative to the first."""

    kind = "loss-follow"

    def __init__(self, *args, s: float = 0.0, rref: float = 0.3, cap: float = 1.0, low: float = 16.0,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not (rref > 0 and cap >= 1 and low >= 1):
            raise ValueError(f"need RREF > 0, CAP >= 1, LOW >= 1; got {rref}, {cap}, {low}")
        self.s, self.rref, self.cap, self.low = float(s), float(rref), float(cap), float(low)

    def step(self, ctx: UpdateContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, l0 = self._loss(ctx)
        ema = 0.9 * ctx.state.get("ema", loss.new_zeros(1)) + 0.1 * loss
        mean = ema / (1 - 0.9 ** (ctx.step + 1))
        self._kappa = ((mean / (self.rref * l0)).clamp_min(1e-12) ** self.s).clamp(1 / self.low, self.cap)[0]
        theta, state = super().step(ctx)
        return theta, {**state, "l0": l0, "ema": ema}


#: loss controllers: kind → (class, its option names after S, their defaults)
_LOSS = {"loss-set": (LossSet, ("rref", "window", "bound"), (0.3, 20, 4.0)),
         "loss-follow": (LossFollow, ("rref", "cap", "low"), (0.3, 1.0, 16.0))}


def variant(text: str, rule: str) -> tuple[str, tuple]:
    """``NAME=BETA[:SHIFT[:BOUND[:TARGET]]]`` or ``NAME=loss-set:S[:...]`` / ``NAME=loss-follow:S[:...]`` →
    (name, (backward, controlled update)) from ``rule``'s file."""
    name, sep, spec = text.partition("=")
    fields = spec.split(":") if sep else []
    if fields and fields[0] in _LOSS:
        return name, _loss_variant(text, fields[0], fields[1:], rule)
    if not name or not 1 <= len(fields) <= 4:
        raise SystemExit(f"{text!r}: expected NAME=BETA[:SHIFT[:BOUND[:TARGET]]]")
    try:
        beta, shift, bound, target = (float(f) for f in fields + ["0", "4", "0"][len(fields) - 1:])
    except ValueError:
        raise SystemExit(f"{text!r}: BETA, SHIFT, BOUND and TARGET must be numbers") from None
    backward, controlled = _controlled(text, rule, Controlled, beta=beta, bound=bound, target=target)
    with torch.no_grad():
        controlled.log_lr_scale.add_(shift)
    return name, (backward, controlled)


def _controlled(text: str, rule: str, cls: type, **options) -> tuple:
    """(backward, ``cls`` built on ``rule``'s scheduled update with its meta-parameters and ``options``)."""
    backward, update = ev.resolve_rule(rule)[:2]
    if not isinstance(update, ScheduledUpdate):
        raise SystemExit(f"{rule}: the controller needs a rule with the scheduled update, got {update.name!r}")
    try:
        controlled = cls(**update.config(), **options)
    except ValueError as err:
        raise SystemExit(f"{text!r}: {err}") from None
    controlled.load_state_dict(update.state_dict())
    return backward, controlled


def _loss_variant(text: str, kind: str, fields: list[str], rule: str) -> tuple:
    cls, names, defaults = _LOSS[kind]
    if not 1 <= len(fields) <= 1 + len(names):
        raise SystemExit(f"{text!r}: expected NAME={kind}:S[:{':'.join(n.upper() for n in names)}]")
    try:
        values = [float(f) for f in fields] + list(defaults[len(fields) - 1:])
    except ValueError:
        raise SystemExit(f"{text!r}: the fields after {kind} must be numbers") from None
    options = dict(zip(("s", *names), values))
    if "window" in options:
        options["window"] = int(options["window"])
    return _controlled(text, rule, cls, **options)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--rule", default="default")
    probe.add_suite_options(ap, seeds=10, tasks=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rules = dict(variant(v, args.rule) for v in args.variants)
    kernels.set_mode("off")  # the controller scales the eager step's width factors
    try:
        suites = {s: probe.run_suite(s, rules, args) for s in args.suites.split(",")}
    finally:
        kernels.set_mode(None)
    doc = {"rule": args.rule, "variants": args.variants, "suites": suites}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    atomic_write(Path(args.out) / "controller.json", lambda p: Path(p).write_text(_json.dumps(doc, indent=1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
