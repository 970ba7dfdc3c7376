"""Probe: per-task oracle peak of v7 (no correction) with conv-kernel steps multiplied by K."""
import json, math, sys
from pathlib import Path
import torch
from mpbackprop import evaluation as ev
from mpbackprop.evaluation import protocol as P
from mpbackprop.rules import Exact
from mpbackprop.rules.base import UpdateRule
from mpbackprop.rules.io import make_update
from mpbackprop.metatrain.inner import get_task

b0, u0, _ = ev.resolve_rule("default")

class Scaled(UpdateRule):
    name = "scaled-probe"
    def __init__(self, inner, factors):
        super().__init__(); self.inner = inner; self.factors = factors
    def init_state(self, theta): return self.inner.init_state(theta)
    def history(self, state): return self.inner.history(state)
    def step(self, ctx):
        new, st = self.inner.step(ctx)
        k = torch.repeat_interleave(torch.tensor(self.factors, dtype=new.dtype), torch.tensor(ctx.sizes))
        return ctx.theta - k * (ctx.theta - new), st

def build(spec, peak, steps, kconv, khead=1.0, kbias=1.0):
    cfg = dict(u0.config()); cfg["correction"] = 0.0
    u = make_update(u0.name, **cfg); u.load_state_dict(u0.state_dict(), strict=False)
    with torch.no_grad():
        b = float(torch.tanh(u.horizon_raw))
        u.log_lr_scale.fill_(math.log(peak / u.lr) + b * math.log(steps / u.horizon_ref))
    tensors = get_task(spec).net.tensors
    last_w = max(i for i, p in enumerate(tensors) if p.role == "weight")
    f = [(kconv if len(p.shape) > 2 else khead if i == last_w else 1.0) * (kbias if p.role == "bias" else 1.0)
         for i, p in enumerate(tensors)]
    return (Exact(), Scaled(u, f))

if __name__ == "__main__":
    suite, ntasks, nseeds, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    settings = [tuple(float(x) for x in s.split(":")) for s in sys.argv[5].split(",")]
    torch.set_num_threads(1)
    def score(spec, steps, rule):
        vals = []
        for s in range(2):
            l = P.run_method(spec, "learned", steps, P.TUNING_SEED_BASE + s, rule).loss[-1]
            vals.append(math.log(l) if math.isfinite(l) and l > 0 else 50.0)
        return sum(vals) / 2
    res = {"tasks": []}
    for spec, steps in ev.suite_tasks(suite, "digits-mlp", ntasks, 100, split="valid"):
        adam = P.tune_lr(spec, "adam", steps, 2, None, out / "tuning")
        af = [P.run_method(spec, "adam", steps, P.REPORT_SEED_BASE + s, None, adam["lr"]).loss[-1] for s in range(nseeds)]
        target = sum(af) / len(af)
        row = {"task": spec.name, "adam": target, "variants": {}}
        for st in settings:
            grid = {e: score(spec, steps, build(spec, 10**e, steps, *st)) for e in [x / 4 for x in range(-12, -1)]}
            best = min(grid, key=grid.get)
            cs = [P.run_method(spec, "learned", steps, P.REPORT_SEED_BASE + s, build(spec, 10**best, steps, *st)) for s in range(nseeds)]
            fin = [c.loss[-1] for c in cs]
            mc = [sum(c.loss[k] for c in cs) / len(cs) for k in range(steps)]
            reach = P.steps_to_reach(mc, target); sp = steps / reach if reach else 0.0
            d = [a - b for a, b in zip(fin, af)]
            row["variants"][str(st)] = {"peak": 10**best, "diffs": d, "speedup": sp, "grid": grid}
            print(spec.name, st, f"peak {10**best:.3g} d {P.ci95(d)[0]:+.4f} speedup {sp:.2f}", flush=True)
        res["tasks"].append(row)
        (out / f"convk-{suite}-{sys.argv[5]}.json").write_text(json.dumps(res, indent=1, default=str))
    for st in settings:
        d = [x for r in res["tasks"] for x in r["variants"][str(st)]["diffs"]]
        sp = [r["variants"][str(st)]["speedup"] for r in res["tasks"]]
        g = math.exp(sum(math.log(max(s, 1e-9)) for s in sp) / len(sp))
        print("POOLED", suite, st, "d %+.4f [%+.4f,%+.4f]" % P.ci95(d), "speedup geo %.2f" % g, flush=True)
