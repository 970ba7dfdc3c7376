"""Step-time benchmark: autograd vs the message-passing engine's rules, measured side by side.

    python tools/bench.py [--json] [--batch 128] [--repeats 20] [--threads 2] [--quick]

Each case times one full training step (forward, backward, update) of
autograd+SGD, autograd+Adam, and the engine with ``exact``+SGD, ``fa``+SGD and
``learned`` backward + learned update, on the same batch, interleaved so that machine
noise hits all methods alike. Reported: median milliseconds per step and ratios to
autograd+SGD (and learned to autograd+Adam).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import mpbackprop as mp
from mpbackprop.engine import train_step
from mpbackprop.rules import SGD, Exact, FeedbackAlignment, LearnedBackward, LearnedUpdate

CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp-64-256-256-10": (lambda: nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                                nn.Linear(256, 10)), (64,)),
    "mlp-784-512-512-10": (lambda: nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                                                 nn.Linear(512, 10)), (784,)),
}


def _autograd_step(model: nn.Module, opt: torch.optim.Optimizer, x, y) -> Callable[[], None]:
    def run() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return run


def _engine_step(net, rule, update, x, y) -> Callable[[], None]:
    theta = net.values.clone()
    rs = rule.init_state(net)
    state = {"s": update.init_state(theta), "t": theta, "k": 0}

    def run() -> None:
        r = train_step(net, state["t"], x, y, rule, update, rs, state["s"], state["k"])
        state["t"], state["s"], state["k"] = r.theta, r.state, state["k"] + 1
    return run


def bench_case(name: str, batch: int, repeats: int) -> dict[str, Any]:
    factory, shape = CASES[name]
    torch.manual_seed(0)
    model = factory()
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    t0 = time.perf_counter()
    net = mp.compile(model, shape)
    compile_s = time.perf_counter() - t0
    _ = net.views  # build the per-layer blocks outside the timed region
    m_sgd, m_adam = factory(), factory()
    runs: dict[str, Callable[[], None]] = {
        "autograd_sgd": _autograd_step(m_sgd, torch.optim.SGD(m_sgd.parameters(), lr=0.01), x, y),
        "autograd_adam": _autograd_step(m_adam, torch.optim.Adam(m_adam.parameters(), lr=1e-3), x, y),
        "exact": _engine_step(net, Exact(), SGD(0.01), x, y),
        "fa": _engine_step(net, FeedbackAlignment(), SGD(0.01), x, y),
        "learned": _engine_step(net, LearnedBackward(state_dim=2), LearnedUpdate(signal_dim=2), x, y),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for run in runs.values():  # warm-up
        run()
    for _ in range(repeats):
        for key, run in runs.items():
            t = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - t)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    return {
        "case": name,
        "batch": batch,
        "params": net.num_params,
        "uses": sum(v.num_edges for v in net.views[1:] if v is not None),
        "compile_s": round(compile_s, 3),
        "ms_per_step": {k: round(v, 3) for k, v in ms.items()},
        "ratios": {
            "exact_vs_autograd": round(ms["exact"] / ms["autograd_sgd"], 3),
            "fa_vs_autograd": round(ms["fa"] / ms["autograd_sgd"], 3),
            "learned_vs_autograd": round(ms["learned"] / ms["autograd_sgd"], 3),
            "learned_vs_adam": round(ms["learned"] / ms["autograd_adam"], 3),
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="smallest case, 3 repeats (smoke test)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = ["mlp-64-256-256-10"] if args.quick else list(CASES)
    repeats = 3 if args.quick else args.repeats
    cases = [bench_case(n, args.batch, repeats) for n in names]
    big = cases[-1]
    result = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
                    "processor": platform.processor() or platform.machine()},
        "ratios": big["ratios"],
        "cases": cases,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{'case':<22}{'method':<16}{'ms/step':>10}{'× autograd+SGD':>16}")
    for c in cases:
        base = c["ms_per_step"]["autograd_sgd"]
        for k, v in c["ms_per_step"].items():
            print(f"{c['case']:<22}{k:<16}{v:>10.2f}{v / base:>16.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
