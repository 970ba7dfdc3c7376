"""Probe: an orthogonalised-momentum (Muon-like) direction with a cosine schedule, per-task oracle peak rate."""
import json, math, sys
from pathlib import Path
import torch
from torch import Tensor
from mpbackprop import evaluation as ev
from mpbackprop.evaluation import protocol as P
from mpbackprop.rules import Exact
from mpbackprop.rules.base import UpdateRule, UpdateContext
from mpbackprop.rules.scheduled import cosine_schedule

def orthogonalise(x: Tensor, iters: int = 5) -> Tensor:
    """Approximate U V^T of x = U S V^T by a quintic Newton-Schulz iteration (Muon's coefficients)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = x.shape[0] > x.shape[1]
    y = x.t() if tall else x
    y = y / (y.norm() + 1e-7)
    for _ in range(iters):
        s = y @ y.t()
        y = a * y + (b * s + c * s @ s) @ y
    return y.t() if tall else y

class Muon(UpdateRule):
    name = "muon-probe"
    def __init__(self, peak, floor=0.1, wd=0.0, beta=0.95, nesterov=True, scale="rms", b=0.0, iters=5):
        super().__init__()
        self.peak, self.floor, self.wd, self.beta, self.nesterov, self.scale, self.b, self.iters = peak, floor, wd, beta, nesterov, scale, b, iters
    def init_state(self, theta):
        return {"m": torch.zeros_like(theta), "m1": torch.zeros_like(theta), "v": torch.zeros_like(theta)}
    def step(self, ctx: UpdateContext):
        g, theta = ctx.signal[:, 0], ctx.theta
        t = ctx.step + 1
        m = self.beta * ctx.state["m"] + (1 - self.beta) * g
        m1 = 0.9 * ctx.state["m1"] + 0.1 * g
        v = 0.999 * ctx.state["v"] + 0.001 * g * g
        adam = (m1 / (1 - 0.9**t)) / (torch.sqrt(v / (1 - 0.999**t)) + 1e-8)
        u = g * (1 - self.beta) + self.beta * m if self.nesterov else m
        tau = min(ctx.step / ctx.total_steps, 1.0)
        eta = self.peak * (ctx.total_steps / 100) ** (-self.b) * float(cosine_schedule(tau, self.floor))
        parts, off = [], 0
        for size, fan in zip(ctx.sizes, ctx.fan_in):
            sl = slice(off, off + size); off += size
            if fan > 0 and size // fan > 1 and fan > 1:
                out = size // fan
                o = orthogonalise(u[sl].view(out, fan), self.iters)
                if self.scale == "rms":
                    o = o * (0.2 * math.sqrt(max(out, fan)))
                elif self.scale == "spectral":
                    o = o * math.sqrt(max(1.0, out / fan))
                d = o.reshape(-1) + self.wd * theta[sl]
            else:
                d = adam[sl] + (self.wd * theta[sl] if fan > 0 else 0.0)
            parts.append(d)
        return theta - eta * torch.cat(parts), {"m": m, "m1": m1, "v": v}

VARIANTS = {
    "muon": dict(), "muon-wd": dict(wd=0.1), "muon-const": dict(floor=0.999), "muon-nonest": dict(nesterov=False),
    "muon-b9": dict(beta=0.9), "muon-spec": dict(scale="spectral"),
}

if __name__ == "__main__":
    suite, ntasks, nseeds, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    names = sys.argv[5].split(",")
    family = sys.argv[6] if len(sys.argv) > 6 else "digits-mlp"
    grid_lo, grid_hi = -12, -1
    torch.set_num_threads(1)
    def build(name, peak): return (Exact(), Muon(peak, **VARIANTS[name]))
    def score(spec, steps, rule):
        vals = []
        for s in range(2):
            l = P.run_method(spec, "learned", steps, P.TUNING_SEED_BASE + s, rule).loss[-1]
            vals.append(math.log(l) if math.isfinite(l) and l > 0 else 50.0)
        return sum(vals) / 2
    tasks = ev.suite_tasks(suite, family, ntasks, 100, split="valid")
    res = {"suite": suite, "tasks": []}
    for spec, steps in tasks:
        adam = P.tune_lr(spec, "adam", steps, 2, None, out / "tuning")
        adam_c = [P.run_method(spec, "adam", steps, P.REPORT_SEED_BASE + s, None, adam["lr"]) for s in range(nseeds)]
        af = [c.loss[-1] for c in adam_c]; target = sum(af) / len(af)
        row = {"task": spec.name, "steps": steps, "adam_lr": adam["lr"], "adam": target, "variants": {}}
        for name in names:
            grid = {}
            for e in [x / 4 for x in range(grid_lo, grid_hi)]:
                grid[e] = score(spec, steps, build(name, 10**e))
            best = min(grid, key=grid.get)
            cs = [P.run_method(spec, "learned", steps, P.REPORT_SEED_BASE + s, build(name, 10**best)) for s in range(nseeds)]
            fin = [c.loss[-1] for c in cs]
            mc = [sum(c.loss[k] for c in cs) / len(cs) for k in range(steps)]
            reach = P.steps_to_reach(mc, target)
            d = [a - b for a, b in zip(fin, af)]
            dm, dlo, dhi = P.ci95(d)
            sp = steps / reach if reach else 0.0
            row["variants"][name] = {"peak": 10**best, "grid": {f"{10**k:.3g}": v for k, v in grid.items()},
                                     "loss": sum(fin) / len(fin), "diffs": d, "speedup": sp}
            print(spec.name, steps, name, f"peak {10**best:.3g} adam {adam['lr']:.3g} loss {sum(fin)/len(fin):.4f} adam {target:.4f} "
                  f"d {dm:+.4f} [{dlo:+.4f},{dhi:+.4f}] speedup {sp:.2f}", flush=True)
        res["tasks"].append(row)
        (out / f"muon-{suite}-{family}.json").write_text(json.dumps(res, indent=1))
    for name in names:
        d = [x for r in res["tasks"] for x in r["variants"][name]["diffs"]]
        sp = [r["variants"][name]["speedup"] for r in res["tasks"]]
        g = math.exp(sum(math.log(max(s, 1e-9)) for s in sp) / len(sp))
        print("POOLED", suite, name, "d %+.4f [%+.4f,%+.4f]" % P.ci95(d), "speedup geo %.2f" % g, flush=True)
