"""Step-time benchmark: autograd vs the message-passing engine's rules, measured side by side.

    python tools/bench.py [--json] [--batch 128] [--repeats 20] [--threads 2] [--quick] [--device cpu|cuda]

Each case times one full training step (forward, backward, update) of
autograd+SGD, autograd+Adam, and the engine with ``exact``+SGD, ``fa``+SGD and
``learned`` — the packaged default rule (or ``--rule``), its backward and update rules —
on the same batch, interleaved so that machine noise hits all methods alike. Reported: median
milliseconds per step and ratios to autograd+SGD (and learned to autograd+Adam).

Scaling: ``scaling_exponent`` is the least-squares slope of log(exact step time) against
log(parameters) over the three MLPs; ``scaling_exponent_autograd`` is the same for autograd+SGD
(the reference: a fixed per-step cost flattens both); ``scaling_exponent_marginal`` subtracts
the step time of a tiny MLP (``mlp-4-4-10``, the fixed per-step cost) before taking the slope.

``--device cuda`` times every step on the GPU (each timed step ends with ``torch.cuda.synchronize``; the
compiled graph's DGL blocks stay on the CPU, and the cases all take the dense paths); the meta-training
probes run on the CPU only and are left out there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import mpbackprop as mp
from mpbackprop import _json as strict_json
from mpbackprop._io import replace_section
from mpbackprop.engine import InnerStep
from mpbackprop.device import DEVICES, DeviceError, place, synchronize
from mpbackprop.device import resolve as resolve_device
from mpbackprop.rules import SGD, Exact, FeedbackAlignment, kernels, load_rule, rule_path

class _SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.c1(x)))
        x = self.pool(torch.relu(self.c2(x)))
        return self.fc(torch.flatten(x, 1))


CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp-64-128-10": (lambda: nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)), (64,)),
    "mlp-64-256-256-10": (lambda: nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                                nn.Linear(256, 10)), (64,)),
    "mlp-784-512-512-10": (lambda: nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                                                 nn.Linear(512, 10)), (784,)),
    "convnet-1x8x8": (_SmallConvNet, (1, 8, 8)),
    "mlp-4-4-10": (lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 10)), (4,)),  # fixed cost
}
MLPS = ["mlp-64-128-10", "mlp-64-256-256-10", "mlp-784-512-512-10"]
TINY = "mlp-4-4-10"
BIG = "mlp-784-512-512-10"


def _autograd_step(model: nn.Module, opt: torch.optim.Optimizer, x, y) -> Callable[[], None]:
    def run() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        synchronize(x.device)
    return run


def _engine_step(net, rule, update, x, y, fused: str = "off") -> Callable[[], None]:
    device = x.device
    theta, rule, update = place(net, net.values.clone(), rule, update, device)
    inner = InnerStep.start(net, theta, rule, update, total_steps=1000)

    def run() -> None:
        kernels.set_mode(fused)
        try:
            inner.step(x, y)
            synchronize(device)
        finally:
            kernels.set_mode(None)
    return run


def bench_case(name: str, batch: int, repeats: int, rule: str = "default", fused: str = "on",
               device: str = "cpu") -> dict[str, Any]:
    dev = resolve_device(device)
    factory, shape = CASES[name]
    torch.manual_seed(0)
    model = factory()
    x = torch.randn(batch, *shape).to(dev)
    y = torch.randint(0, 10, (batch,)).to(dev)
    t0 = time.perf_counter()
    net = mp.compile(model, shape)
    compile_s = time.perf_counter() - t0
    _ = net.views  # build the per-layer blocks outside the timed region
    m_sgd, m_adam = factory().to(dev), factory().to(dev)
    runs: dict[str, Callable[[], None]] = {
        "autograd_sgd": _autograd_step(m_sgd, torch.optim.SGD(m_sgd.parameters(), lr=0.01), x, y),
        "autograd_adam": _autograd_step(m_adam, torch.optim.Adam(m_adam.parameters(), lr=1e-3), x, y),
        "exact": _engine_step(net, Exact(), SGD(0.01), x, y),
        "fa": _engine_step(net, FeedbackAlignment(), SGD(0.01), x, y),
        "learned": _engine_step(net, *load_rule(rule_path(rule))[:2], x, y, fused),
        "learned_eager": _engine_step(net, *load_rule(rule_path(rule))[:2], x, y, "off"),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    compiles = len(kernels.compile_log())
    for run in runs.values():  # warm-up (and compilation of the fused kernels)
        run()
    fused_compile_s = sum(float(e["seconds"]) for e in kernels.compile_log()[compiles:])  # type: ignore[arg-type]
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
        "fused_compile_s": round(fused_compile_s, 3),
        "ms_per_step": {k: round(v, 3) for k, v in ms.items()},
        "ratios": {
            "exact_vs_autograd": round(ms["exact"] / ms["autograd_sgd"], 3),
            "fa_vs_autograd": round(ms["fa"] / ms["autograd_sgd"], 3),
            "learned_vs_autograd": round(ms["learned"] / ms["autograd_sgd"], 3),
            "learned_vs_adam": round(ms["learned"] / ms["autograd_adam"], 3),
            "learned_eager_vs_adam": round(ms["learned_eager"] / ms["autograd_adam"], 3),
        },
    }


_META_PROBE = """
import json, resource, sys, time, torch
torch.set_num_threads(1)
from mpbackprop.metatrain import MetaConfig, MetaTrainer
cfg = MetaConfig(outer_steps=int(sys.argv[2]), eval_every=10**6, checkpoint_every=10**6)
trainer = MetaTrainer(cfg, sys.argv[1])
trainer.outer_step()  # warm-up: task construction, graph compilation
t = time.perf_counter()
for _ in range(int(sys.argv[2])):
    trainer.outer_step()
per_min = int(sys.argv[2]) / (time.perf_counter() - t) * 60
print(json.dumps({"outer_steps_per_min": per_min, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "truncation": cfg.truncation, "tasks_per_step": cfg.tasks_per_step}))
"""


def meta_training_probe(steps: int, rounds: int = 2) -> dict[str, Any]:
    """Outer steps (and tasks) per minute of the default meta-training and the process's peak RSS
    (one PES truncation of 20 steps on 4 default-family tasks per outer step), each in a fresh process:
    the default (the ES/PES copies of a task batched, ``mpbackprop/metatrain/batched.py``) and the copies
    one after another (``MPBACKPROP_BATCHED=0``, the code before batching), interleaved ``rounds`` times;
    medians."""
    import statistics
    import subprocess
    import tempfile

    runs: dict[str, list[dict[str, Any]]] = {"1": [], "0": []}
    for _ in range(rounds):
        for mode in runs:
            with tempfile.TemporaryDirectory() as tmp:
                out = subprocess.run([sys.executable, "-c", _META_PROBE, tmp, str(steps)], capture_output=True,
                                     text=True, check=True, env={**os.environ, "MPBACKPROP_BATCHED": mode})
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    fast, slow = (statistics.median(r["outer_steps_per_min"] for r in runs[m]) for m in ("1", "0"))
    first = runs["1"][0]
    return {"outer_steps_per_min": round(fast, 1), "sequential_outer_steps_per_min": round(slow, 1),
            "speedup": round(fast / slow, 2), "tasks_per_min": round(fast * first["tasks_per_step"], 1),
            "sequential_tasks_per_min": round(slow * first["tasks_per_step"], 1),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs["1"]), "truncation": first["truncation"],
            "tasks_per_step": first["tasks_per_step"], "rounds": rounds,
            "runs": {("batched" if m == "1" else "sequential"): [round(r["outer_steps_per_min"], 1) for r in v]
                     for m, v in runs.items()}}


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distributed_probe(steps: int) -> dict[str, Any]:
    """Outer steps (and tasks) per minute of the default meta-training with 1 and 2 processes
    (``torchrun --nproc-per-node 2``: each process runs its own tasks_per_step tasks)."""
    import subprocess
    import tempfile

    out: dict[str, Any] = {}
    for nproc in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = Path(tmp) / "cfg.json"
            cfg.write_text(json.dumps({"outer_steps": steps + 1, "eval_every": 10**6, "checkpoint_every": 10**6}))
            launch = ([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                       "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
                      if nproc == 2 else [sys.executable])
            subprocess.run([*launch, "-m", "mpbackprop", "meta-train", "--config", str(cfg), "--out", tmp,
                            "--no-progress"], capture_output=True, text=True, check=True, timeout=600,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"})
            rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()][2:]
            per_min = 60 * len(rows) / sum(r["seconds"] for r in rows)
            out[f"{nproc}_process"] = {"outer_steps_per_min": round(per_min, 1), "tasks_per_min": round(per_min * 4 * nproc, 1)}
    return out


def scaling_exponent(cases: list[dict[str, Any]], method: str = "exact", overhead_ms: float = 0.0) -> float:
    """Least-squares slope of log(step time − overhead) against log(parameter count) over the MLPs."""
    import math

    pts = [(math.log(c["params"]), math.log(max(c["ms_per_step"][method] - overhead_ms, 1e-6)))
           for c in cases if c["case"] in MLPS]
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--meta-steps", type=int, default=10, help="outer steps timed for the meta-training probe")
    ap.add_argument("--quick", action="store_true", help="smallest case, 3 repeats, no meta probe (smoke test)")
    ap.add_argument("--meta-only", action="store_true",
                    help="only the meta-training probe (batched against sequential copies; no README)")
    ap.add_argument("--readme", default=None, help="regenerate the performance section of this README")
    ap.add_argument("--rule", default="default", help="learned rule to time: 'default' (packaged), a .pt or a run dir")
    ap.add_argument("--device", choices=DEVICES, default="cpu",
                    help="where the steps run (cuda: the meta-training probes, CPU only, are left out)")
    ap.add_argument("--fused", choices=kernels.MODES, default="on",
                    help="fused kernels for 'learned' (on: compiled for every case; auto: as a run of 1000 steps would)")
    args = ap.parse_args(argv)
    try:
        resolve_device(args.device)
    except DeviceError as exc:
        ap.error(str(exc))  # one line, exit 2
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    try:
        return _main(args)
    finally:
        torch.set_flush_denormal(False)  # the default, for callers in the same process


def _main(args: argparse.Namespace) -> int:
    load = [round(x, 2) for x in os.getloadavg()]
    on_cpu = args.device == "cpu"
    if args.meta_only:
        if not on_cpu:
            print("the meta-training probe runs on the CPU only: use --device cpu with --meta-only", file=sys.stderr)
            return 2
        mt = {"load_average": load, **meta_training_probe(args.meta_steps)}
        mt["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        print(strict_json.dumps(mt, indent=2) if args.json else f"meta-training (default family): {mt}")
        return 0
    names = ["mlp-64-128-10"] if args.quick else list(CASES)
    repeats = 3 if args.quick else args.repeats
    cases = [bench_case(n, args.batch, repeats, args.rule, args.fused, args.device) for n in names]
    tiny = next((c for c in cases if c["case"] == TINY), None)
    cases = [c for c in cases if c["case"] != TINY]
    big = next((c for c in cases if c["case"] == BIG), cases[-1])
    result: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
                    "processor": platform.processor() or platform.machine(), "batch": args.batch,
                    "load_average": load, "fused": args.fused,
                    **({} if on_cpu else {"device": torch.cuda.get_device_name(resolve_device(args.device))})},
        "ratios": {"exact_vs_autograd": big["ratios"]["exact_vs_autograd"],
                   "learned_vs_adam": big["ratios"]["learned_vs_adam"]},
        "scaling_exponent": round(scaling_exponent(cases), 3) if len(cases) > 2 else None,
        "scaling_exponent_autograd": round(scaling_exponent(cases, "autograd_sgd"), 3) if len(cases) > 2 else None,
        "scaling_exponent_marginal": (round(scaling_exponent(cases, "exact", tiny["ms_per_step"]["exact"]), 3)
                                      if tiny and len(cases) > 2 else None),
        "fixed_step_ms": tiny["ms_per_step"] if tiny else None,
        "cases": cases,
    }
    if not args.quick and on_cpu:
        result["meta_training"] = meta_training_probe(args.meta_steps)
        result["distributed"] = distributed_probe(args.meta_steps)
    if args.json:
        print(strict_json.dumps(result, indent=2))
    else:
        for line in _text(result):
            print(line)
    if args.readme:
        _write_readme(Path(args.readme), result)
    return 0


def _text(result: dict[str, Any]) -> list[str]:
    lines = [f"{'case':<22}{'method':<16}{'ms/step':>10}{'x autograd+SGD':>16}"]
    for c in result["cases"]:
        base = c["ms_per_step"]["autograd_sgd"]
        for k, v in c["ms_per_step"].items():
            lines.append(f"{c['case']:<22}{k:<16}{v:>10.2f}{v / base:>16.2f}")
    lines.append(f"ratios on {BIG}: {result['ratios']}")
    lines.append(f"scaling exponent of exact step time vs parameters (MLPs): {result['scaling_exponent']} "
                 f"(autograd+SGD: {result['scaling_exponent_autograd']}; exact minus the fixed per-step cost: "
                 f"{result['scaling_exponent_marginal']})")
    if "meta_training" in result:
        lines.append(f"meta-training (default family): {result['meta_training']}")
    if "distributed" in result:
        lines.append(f"meta-training with 1 and 2 processes: {result['distributed']}")
    return lines


START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _fixed(result: dict[str, Any]) -> str:
    fixed = result.get("fixed_step_ms") or {}
    return f"{fixed['exact']:.2f} ms, autograd+SGD {fixed['autograd_sgd']:.2f} ms" if fixed else "n/a"


def _write_readme(path: Path, result: dict[str, Any]) -> None:
    m = result["machine"]
    body = [START, "", f"Generated by `python tools/bench.py --readme README.md` (batch {m['batch']}, float32, "
            f"{m['threads']} thread{'s' if m['threads'] != 1 else ''}, torch {m['torch']}, {m['processor']}"
            f"{', on ' + m['device'] if m.get('device') else ''}). Median ms per training step; "
            "ratio to autograd + SGD in brackets; `learned` is the packaged default rule, its backward and its "
            f"update (told a run length of 1000 steps) with fused kernels `{m.get('fused', 'on')}` (compile seconds in "
            "the last column), `learned eager` the same rule on its eager code. Load average (1, 5, 15 min) at the start: "
            f"{', '.join(str(x) for x in m.get('load_average', []))}.", "",
            "| case | params | autograd+SGD | autograd+Adam | exact | fa | learned | learned eager | compile s |",
            "|---|---|---|---|---|---|---|---|---|"]
    for c in result["cases"]:
        ms = c["ms_per_step"]
        base = ms["autograd_sgd"]
        cells = [f"{ms[k]:.2f} ({ms[k] / base:.2f}×)"
                 for k in ("autograd_sgd", "autograd_adam", "exact", "fa", "learned", "learned_eager")]
        body.append(f"| {c['case']} | {c['params']} | " + " | ".join(cells) + f" | {c['fused_compile_s']:.1f} |")
    r = result["ratios"]
    small = next((c for c in result["cases"] if c["case"] == MLPS[0]), None)
    small_txt = (f"; on {MLPS[0]}: **{small['ratios']['learned_vs_adam']:.2f}×** (target ≤ 2×)" if small else "")
    body += ["", f"- `exact` / autograd+SGD on {BIG}: **{r['exact_vs_autograd']:.2f}×** (target ≤ 1.5×); "
             f"`learned` / autograd+Adam: **{r['learned_vs_adam']:.2f}×** (target ≤ 1.5×){small_txt}.",
             f"- Scaling exponent of `exact` step time against parameter count over the MLPs: "
             f"**{result['scaling_exponent']}** (target 0.8–1.2; autograd+SGD: {result['scaling_exponent_autograd']}). "
             f"Less the fixed per-step cost (the step time of `{TINY}`, exact {_fixed(result)}): "
             f"**{result['scaling_exponent_marginal']}**."]
    if "meta_training" in result:
        mt = result["meta_training"]
        body.append(f"- Default meta-training: **{mt['outer_steps_per_min']:.0f} outer steps/min** "
                    f"({mt['tasks_per_step']} tasks × {mt['truncation']} inner steps each; "
                    f"{mt['tasks_per_min']:.0f} tasks/min), against {mt['sequential_outer_steps_per_min']:.0f} with "
                    f"the ES/PES copies run one after another (`MPBACKPROP_BATCHED=0`): **{mt['speedup']:.2f}×**; "
                    f"peak RSS **{mt['peak_rss_mb']:.0f} MB** (target ≤ 2 GB).")
    if "distributed" in result:
        d1, d2 = result["distributed"]["1_process"], result["distributed"]["2_process"]
        body.append(f"- Distributed meta-training (`torchrun --nproc-per-node 2`): {d1['tasks_per_min']:.0f} → "
                    f"{d2['tasks_per_min']:.0f} tasks/min ({d1['outer_steps_per_min']:.0f} → "
                    f"{d2['outer_steps_per_min']:.0f} outer steps/min, each averaging 4 tasks per process).")
    body += ["", END]
    path.write_text(replace_section(path.read_text(), START, END, body, "Performance"))


if __name__ == "__main__":
    sys.exit(main())
