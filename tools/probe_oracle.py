"""Update directions at their per-task best ("oracle") peak rate against tuned constant Adam, on *meta-validation* tasks.

    python tools/probe_oracle.py DIRECTION [DIRECTION ...] [--suite heldout] [--family digits-mlp]
        [--tasks 3] [--seeds 10] [--steps 100] [--grid -12 -2] [--tuning-seeds 2] [--rule default]
        [--out results/probe]

How much of the gap to tuned Adam is the *direction* of an update, and how much its step size? Each
direction is given, on every task, the peak rate that suits that task best, which no rule knows in advance:
an upper bound on what a better step size could give the direction. Directions:

* ``adam`` — the rule's :class:`~mpbackprop.rules.ScheduledUpdate` (``--rule``, the shipped rule by default) with
  its learned correction switched off: Adam's direction on the rule's cosine schedule (floor kept), width
  factor and weight decay, exact backprop.
* ``rule`` — the same with its learned correction on, and the rule's own backward.
* ``muon`` — orthogonalised Nesterov momentum (:func:`orthogonalise`, Muon, Jordan et al., 2024) for weight
  matrices, scaled to an RMS of 0.2·sqrt(max(out, in)) per entry; Adam for biases and other vectors; cosine
  schedule with floor 0.1 (:class:`Muon`).
* any of these with per-tensor step factors, ``BASE:KEY=FACTOR[,KEY=FACTOR...]`` (:class:`Scaled`): ``head`` the
  output layer's weight, ``conv`` convolution kernels, ``bias`` every bias (multiplying a tensor's other
  factor), e.g. ``adam:head=3`` or ``adam:conv=3,bias=3``.

The tasks are :func:`mpbackprop.evaluation.suite_tasks` of ``--suite`` on the **validation** split. Per task,
Adam's constant rate is tuned as :func:`~mpbackprop.evaluation.tune_lr` does (cached under ``--out``/tuning, shared
with ``tools/probe.py``); each direction's peak is the point ``10^(k/4)``, ``k`` from ``--grid LO HI`` (quarter
decades, both ends included; 1e-3 to 0.56 by default), of least mean :func:`~mpbackprop.evaluation.protocol.log_score`
(log final validation loss, 50 for a diverged run) over the tuning seeds. At that peak it runs the report seeds,
and the tool prints per task and direction the mean final loss, the paired difference to tuned Adam with its 95%
interval, and the speedup (``T`` over the steps for the direction's mean curve to reach Adam's mean final loss;
0 when never); then, per direction, a ``POOLED`` line: the interval over all tasks' paired differences and the
geometric mean of the speedups (0 when a task never reached Adam's loss). Writes
``--out``/probe-oracle-SUITE-FAMILY.json (strict JSON; rewritten after every task).

The one-off scripts under ``results/probe/oracle/`` (``oracle.py``, ``muon.py``, ``convk.py``) produced the
committed logs there; this tool computes their quantities (``nocorr`` there is ``adam`` here, ``lb`` is ``rule``,
convk's ``(K, H, B)`` is ``adam:conv=K,head=H,bias=B``).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from mpbackprop import _json
from mpbackprop import evaluation as ev
from mpbackprop._io import atomic_write
from mpbackprop.evaluation.protocol import REPORT_SEED_BASE, TUNING_SEED_BASE, ci95, geomean, log_score, speedup
from mpbackprop.metatrain.inner import get_task
from mpbackprop.rules import Exact, ScheduledUpdate
from mpbackprop.rules.base import UpdateContext, UpdateHistory, UpdateRule
from mpbackprop.rules.io import make_update
from mpbackprop.rules.scheduled import cosine_schedule

ROOT = Path(__file__).resolve().parents[1]
DIRECTIONS = ("adam", "rule", "muon")
#: Per-tensor factor keys of a direction (see :func:`tensor_factors`).
FACTOR_KEYS = ("conv", "head", "bias")
#: Muon's quintic Newton–Schulz coefficients (Jordan et al., 2024).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

Rules = tuple[Any, UpdateRule]


# ---------------------------------------------------------------------------------------- the directions
def orthogonalise(x: Tensor, iters: int = 5) -> Tensor:
    """Approximately ``U V^T`` of ``x = U S V^T`` ``(out, in)``, by Muon's quintic Newton–Schulz iteration.

    ``x`` is scaled to unit Frobenius norm (every singular value at most 1), then ``iters`` times
    ``y ← a·y + (b·s + c·s²)·y`` with ``s = y yᵀ`` on the wide orientation (a tall ``x`` is transposed and back).
    The coefficients trade exactness for speed: after 5 steps the singular values lie in about [0.7, 1.2],
    not at 1, which is all the direction needs.
    """
    a, b, c = NS_COEFFICIENTS
    tall = x.shape[0] > x.shape[1]
    y = x.t() if tall else x
    y = y / (y.norm() + 1e-7)
    for _ in range(iters):
        s = y @ y.t()
        y = a * y + (b * s + c * s @ s) @ y
    return y.t() if tall else y


class Muon(UpdateRule):
    """Orthogonalised Nesterov momentum for weight matrices, Adam for vectors, on a cosine schedule.

    A weight tensor with more than one output and more than one input per output (a Linear weight; a
    convolution's kernel as ``(out, in·kh·kw)``) steps along :func:`orthogonalise` of its Nesterov momentum
    (``beta``), times ``0.2·sqrt(max(out, in))`` (an entry RMS like Adam's); biases and other vectors take
    Adam's step (0.9, 0.999, bias-corrected). The step size is ``peak·s(t/T)`` with the cosine schedule
    :func:`~mpbackprop.rules.scheduled.cosine_schedule` down to ``floor``. No weight decay.
    """

    name = "muon"

    def __init__(self, peak: float, floor: float = 0.1, beta: float = 0.95, iters: int = 5) -> None:
        super().__init__()
        if not (peak > 0 and math.isfinite(peak)) or not 0 <= floor <= 1 or not 0 <= beta < 1 or iters < 1:
            raise ValueError(f"need peak > 0, 0 <= floor <= 1, 0 <= beta < 1, iters >= 1; "
                             f"got {peak}, {floor}, {beta}, {iters}")
        self.peak, self.floor, self.beta, self.iters = float(peak), float(floor), float(beta), int(iters)

    def config(self) -> dict[str, Any]:
        return {"peak": self.peak, "floor": self.floor, "beta": self.beta, "iters": self.iters}

    def init_state(self, theta: Tensor) -> dict[str, Tensor]:
        return {"m": torch.zeros_like(theta), "m1": torch.zeros_like(theta), "v": torch.zeros_like(theta)}

    def step(self, ctx: UpdateContext) -> tuple[Tensor, dict[str, Tensor]]:
        if ctx.sizes is None or ctx.fan_in is None or ctx.total_steps is None:
            raise ValueError("the 'muon' update needs the tensors' sizes and fan-ins and the run's length")
        g, theta = ctx.signal[:, 0], ctx.theta
        t = ctx.step + 1
        m = self.beta * ctx.state["m"] + (1 - self.beta) * g
        m1 = 0.9 * ctx.state["m1"] + 0.1 * g
        v = 0.999 * ctx.state["v"] + 0.001 * g * g
        adam = (m1 / (1 - 0.9**t)) / (torch.sqrt(v / (1 - 0.999**t)) + 1e-8)
        nesterov = g * (1 - self.beta) + self.beta * m
        eta = self.peak * float(cosine_schedule(min(ctx.step / ctx.total_steps, 1.0), self.floor))
        parts, offset = [], 0
        for size, fan in zip(ctx.sizes, ctx.fan_in):
            part = slice(offset, offset + size)
            offset += size
            if fan > 1 and size // fan > 1:
                out = size // fan
                ortho = orthogonalise(nesterov[part].view(out, fan), self.iters)
                parts.append((ortho * (0.2 * math.sqrt(max(out, fan)))).reshape(-1))
            else:
                parts.append(adam[part])
        return theta - eta * torch.cat(parts), {"m": m, "m1": m1, "v": v}


class Scaled(UpdateRule):
    """``inner``'s update with each tensor's step multiplied by its factor: ``θ − k_i·(θ − θ_inner)``.

    A tensor whose factor is 1 gets ``inner``'s new parameters exactly. ``factors`` has one entry per
    parameter tensor (:func:`tensor_factors`).
    """

    name = "scaled"

    def __init__(self, inner: UpdateRule, factors: list[float]) -> None:
        super().__init__()
        if not all(f > 0 and math.isfinite(f) for f in factors):
            raise ValueError(f"step factors must be finite and > 0, got {factors}")
        self.inner, self.factors = inner, [float(f) for f in factors]

    def config(self) -> dict[str, Any]:
        return {"inner": self.inner.name, "factors": self.factors}

    def init_state(self, theta: Tensor) -> dict[str, Tensor]:
        return self.inner.init_state(theta)

    def history(self, state: dict[str, Tensor]) -> UpdateHistory:
        return self.inner.history(state)

    def step(self, ctx: UpdateContext) -> tuple[Tensor, dict[str, Tensor]]:
        if ctx.sizes is None or len(ctx.sizes) != len(self.factors):
            raise ValueError(f"{len(self.factors)} step factors for tensors of sizes {ctx.sizes}")
        new, state = self.inner.step(ctx)
        k = torch.repeat_interleave(torch.tensor(self.factors, dtype=new.dtype, device=new.device),
                                    torch.tensor(ctx.sizes, device=new.device), output_size=new.numel())
        return torch.where(k == 1, new, ctx.theta - k * (ctx.theta - new)), state


def tensor_factors(tensors: list[Any], conv: float = 1.0, head: float = 1.0, bias: float = 1.0) -> list[float]:
    """Per-tensor step factors of a network's ``tensors`` (``net.tensors``): ``conv`` for convolution kernels
    (more than two dimensions), else ``head`` for the last weight tensor (the output layer), else 1; times
    ``bias`` for biases."""
    weights = [i for i, p in enumerate(tensors) if p.role == "weight"]
    last = max(weights) if weights else -1
    return [(conv if len(p.shape) > 2 else head if i == last else 1.0) * (bias if p.role == "bias" else 1.0)
            for i, p in enumerate(tensors)]


@dataclass
class Direction:
    """A direction to compare: its base (one of :data:`DIRECTIONS`) and per-tensor step factors."""

    text: str
    base: str
    factors: dict[str, float] = field(default_factory=dict)


def parse_direction(text: str) -> Direction:
    """``BASE[:KEY=FACTOR,...]`` → :class:`Direction`; ValueError naming the valid choices otherwise."""
    base, _, rest = text.partition(":")
    if base not in DIRECTIONS:
        raise ValueError(f"unknown direction {base!r} in {text!r}; choose from {', '.join(DIRECTIONS)} "
                         f"(optionally BASE:KEY=FACTOR,... with KEY in {', '.join(FACTOR_KEYS)})")
    factors = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if key not in FACTOR_KEYS or not eq:
            raise ValueError(f"bad step factor {item!r} in {text!r}; write KEY=FACTOR with KEY in "
                             f"{', '.join(FACTOR_KEYS)}")
        try:
            factors[key] = float(value)
        except ValueError:
            raise ValueError(f"bad step factor {item!r} in {text!r}: {value!r} is not a number") from None
        if not (factors[key] > 0 and math.isfinite(factors[key])):
            raise ValueError(f"bad step factor {item!r} in {text!r}: a factor must be finite and > 0")
    return Direction(text, base, factors)


def scheduled_at_peak(update: ScheduledUpdate, peak: float, steps: int, correction: bool = True) -> ScheduledUpdate:
    """A copy of the scheduled ``update`` whose peak step size at horizon ``steps`` is ``peak`` (its ``a`` set
    to ``log(peak/lr) + b·log(steps/T_0)``), with its learned correction on or off; schedule floor, width
    factor and weight decay as they were."""
    config = dict(update.config())
    if not correction:
        config["correction"] = 0.0
    rebuilt = make_update(update.name, **config)
    rebuilt.load_state_dict(update.state_dict(), strict=False)
    with torch.no_grad():
        b = float(rebuilt.horizon_exponent())
        rebuilt.log_lr_scale.fill_(math.log(peak / rebuilt.lr) + b * math.log(steps / rebuilt.horizon_ref))
    return rebuilt


def build(direction: Direction, source: Rules, spec: Any, peak: float, steps: int) -> Rules:
    """The ``(backward, update)`` of ``direction`` at ``peak`` for a run of ``steps`` steps on ``spec``
    (``source``: the rule ``adam`` and ``rule`` are made from)."""
    backward, update = source
    if direction.base == "muon":
        rule: Rules = (Exact(), Muon(peak))
    else:
        corrected = direction.base == "rule"
        rule = (backward if corrected else Exact(), scheduled_at_peak(update, peak, steps, corrected))
    if direction.factors:
        rule = (rule[0], Scaled(rule[1], tensor_factors(get_task(spec).net.tensors, **direction.factors)))
    return rule


# ---------------------------------------------------------------------------------------- the protocol
def grid_exponents(lo: int, hi: int) -> list[float]:
    """Exponents of 10 of the peak grid: ``k/4`` for ``k = lo..hi`` (both included)."""
    return [k / 4 for k in range(lo, hi + 1)]


def peak_grid(spec: Any, steps: int, make: Callable[[float], Rules], exponents: list[float],
              tuning_seeds: int = 2) -> tuple[float, list[dict[str, float]]]:
    """The exponent of the best peak (first of the least mean :func:`log_score` over the tuning seeds) and
    every grid point's ``{"exponent", "peak", "score"}``; ``make(peak)`` gives the rules at a peak."""
    rows = []
    for e in exponents:
        rule = make(10.0**e)
        scores = [log_score(ev.run_method(spec, "learned", steps, TUNING_SEED_BASE + s, rule).loss[-1])
                  for s in range(tuning_seeds)]
        rows.append({"exponent": e, "peak": 10.0**e, "score": sum(scores) / len(scores)})
    best = min(rows, key=lambda r: r["score"])
    return best["exponent"], rows


def compare(curves: list[Any], adam_losses: list[float], steps: int) -> dict[str, Any]:
    """Final losses of ``curves`` against tuned Adam's on the same seeds: mean, paired differences (95%
    interval), steps for the mean curve to reach Adam's mean final loss, and the speedup."""
    losses = [c.loss[-1] for c in curves]
    diffs = [a - b for a, b in zip(losses, adam_losses)]
    mean, lo, hi = ci95(diffs)
    reach, sp = speedup(curves, sum(adam_losses) / len(adam_losses), steps)
    return {"losses": losses, "loss": sum(losses) / len(losses), "diffs": diffs, "diff": {"mean": mean, "ci": [lo, hi]},
            "steps_to_reach": reach, "speedup": sp}


def pool(rows: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, Any]]:
    """Per direction over tasks: the 95% interval of all paired differences, and the geometric mean of the
    per-task speedups (0 when one is 0)."""
    out = {}
    for name in names:
        diffs = [d for r in rows for d in r["directions"][name]["diffs"]]
        speedups = [r["directions"][name]["speedup"] for r in rows]
        mean, lo, hi = ci95(diffs)
        out[name] = {"diff": {"mean": mean, "ci": [lo, hi]}, "speedup": geomean(speedups), "speedups": speedups}
    return out


def run_task(spec: Any, steps: int, directions: list[Direction], source: Rules, args: argparse.Namespace,
             say: Callable[[str], None] = print) -> dict[str, Any]:
    """One task: tuned Adam on the report seeds, then each direction at its best peak on the grid."""
    (adam,) = ev.evaluate([(spec, steps)], None, seeds=args.seeds, methods=("adam",), tuning_seeds=args.tuning_seeds,
                          cache=Path(args.out) / "tuning")
    adam_losses = [c.loss[-1] for c in adam.curves["adam"]]
    target = sum(adam_losses) / len(adam_losses)
    row: dict[str, Any] = {"task": spec.name, "steps": steps, "adam_lr": adam.lrs["adam"], "adam_losses": adam_losses,
                           "adam": target, "directions": {}}
    for direction in directions:
        def make(peak: float, direction: Direction = direction) -> Rules:
            return build(direction, source, spec, peak, steps)

        best, grid = peak_grid(spec, steps, make, grid_exponents(*args.grid), args.tuning_seeds)
        rule = make(10.0**best)
        curves = [ev.run_method(spec, "learned", steps, REPORT_SEED_BASE + s, rule) for s in range(args.seeds)]
        entry = {"peak": 10.0**best, "exponent": best, "grid": grid, **compare(curves, adam_losses, steps)}
        row["directions"][direction.text] = entry
        d = entry["diff"]
        say(f"{spec.name} {steps} {direction.text} peak {entry['peak']:.3g} adam {adam.lrs['adam']:.3g} "
            f"loss {entry['loss']:.4f} adam {target:.4f} d {d['mean']:+.4f} [{d['ci'][0]:+.4f},{d['ci'][1]:+.4f}] "
            f"speedup {entry['speedup']:.2f}")
    return row


def direction_arg(text: str) -> Direction:
    try:
        return parse_direction(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("directions", nargs="+", type=direction_arg, metavar="DIRECTION",
                    help=f"{', '.join(DIRECTIONS)}, optionally BASE:KEY=FACTOR,... (KEY: {', '.join(FACTOR_KEYS)})")
    ap.add_argument("--suite", default="heldout", choices=ev.SUITES)
    ap.add_argument("--family", default="digits-mlp")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=10, help="report seeds")
    ap.add_argument("--tuning-seeds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=100, help="horizon T (the suite may scale it)")
    ap.add_argument("--grid", type=int, nargs=2, default=[-12, -2], metavar=("LO", "HI"),
                    help="peak grid 10^(k/4), k = LO..HI")
    ap.add_argument("--rule", default="default", help="the rule adam and rule are made from")
    ap.add_argument("--out", default=str(ROOT / "results" / "probe"))
    args = ap.parse_args(argv)
    names = [d.text for d in args.directions]
    if len(set(names)) != len(names):
        ap.error(f"a direction is named twice: {' '.join(names)}")
    if args.grid[0] > args.grid[1] or min(args.tasks, args.seeds, args.tuning_seeds, args.steps) < 1:
        ap.error("need --grid LO <= HI and --tasks, --seeds, --tuning-seeds, --steps >= 1")
    backward, update = ev.resolve_rule(args.rule)[:2]
    if not isinstance(update, ScheduledUpdate) and any(d.base != "muon" for d in args.directions):
        ap.error(f"--rule {args.rule}: its update is {update.name!r}, not a scheduled update")
    torch.set_num_threads(1)
    tasks = ev.suite_tasks(args.suite, args.family, args.tasks, args.steps, split="valid")
    path = Path(args.out) / f"probe-oracle-{args.suite}-{args.family}.json"
    doc: dict[str, Any] = {"suite": args.suite, "family": args.family, "rule": args.rule, "directions": names,
                           "seeds": args.seeds, "tuning_seeds": args.tuning_seeds,
                           "grid": grid_exponents(*args.grid), "tasks": []}
    for spec, steps in tasks:
        doc["tasks"].append(run_task(spec, steps, args.directions, (backward, update), args,
                                     lambda line: print(line, flush=True)))
        doc["pooled"] = pool(doc["tasks"], names)
        atomic_write(path, lambda p: Path(p).write_text(_json.dumps(doc, indent=1)))
    for name, p in doc["pooled"].items():
        d = p["diff"]
        print(f"POOLED {args.suite} {name} d {d['mean']:+.4f} [{d['ci'][0]:+.4f},{d['ci'][1]:+.4f}] "
              f"speedup geo {p['speedup']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
