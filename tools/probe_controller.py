"""Probe a hand-set, bounded per-tensor step controller on top of a scheduled rule, on *meta-validation* tasks.

    python tools/probe_controller.py NAME=BETA[:SHIFT[:BOUND[:TARGET]]] [NAME=...] [--rule default]
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


def variant(text: str, rule: str) -> tuple[str, tuple]:
    """``NAME=BETA[:SHIFT[:BOUND[:TARGET]]]`` → (name, (backward, controlled update)) from ``rule``'s file."""
    name, sep, spec = text.partition("=")
    fields = spec.split(":") if sep else []
    if not name or not 1 <= len(fields) <= 4:
        raise SystemExit(f"{text!r}: expected NAME=BETA[:SHIFT[:BOUND[:TARGET]]]")
    try:
        beta, shift, bound, target = (float(f) for f in fields + ["0", "4", "0"][len(fields) - 1:])
    except ValueError:
        raise SystemExit(f"{text!r}: BETA, SHIFT, BOUND and TARGET must be numbers") from None
    backward, update = ev.resolve_rule(rule)[:2]
    if not isinstance(update, ScheduledUpdate):
        raise SystemExit(f"{rule}: the controller needs a rule with the scheduled update, got {update.name!r}")
    controlled = Controlled(**update.config(), beta=beta, bound=bound, target=target)
    controlled.load_state_dict(update.state_dict())
    with torch.no_grad():
        controlled.log_lr_scale.add_(shift)
    return name, (backward, controlled)


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
