"""Oracle: per-task tuned peak rate of the scheduled update (Adam direction), vs tuned constant Adam."""
import json, math, sys, copy
from pathlib import Path
import torch
from mpbackprop import evaluation as ev
from mpbackprop.evaluation import protocol as P
from mpbackprop.rules import Exact
from mpbackprop.rules.io import make_update

suite = sys.argv[1]; ntasks = int(sys.argv[2]); nseeds = int(sys.argv[3]); out = Path(sys.argv[4])
names = sys.argv[5].split(",")
torch.set_num_threads(1)
b0, u0, _ = ev.resolve_rule("default")

def build(name, peak, steps):
    cfg = dict(u0.config())
    over = {}
    if "nocorr" in name: cfg["correction"] = 0.0
    u = make_update(u0.name, **cfg); u.load_state_dict(u0.state_dict(), strict=False)
    with torch.no_grad():
        # peak at this horizon: lr*e^a*(T/100)^-b
        b = float(torch.tanh(u.horizon_raw))
        u.log_lr_scale.fill_(math.log(peak / u.lr) + b * math.log(steps / u.horizon_ref))
        if "f0" in name: u.floor_logit.fill_(-7.0)
        if "const" in name: u.floor_logit.fill_(9.0)
        if "nowd" in name and u.weight_decay: u.log_wd.fill_(math.log(1e-6))
        if "p0" in name: u.width_raw.fill_(0.0)
    return (b0 if "lb" in name else Exact(), u)

def curve(spec, steps, seed, rule):
    return P.run_method(spec, "learned", steps, seed, rule)

def score(spec, steps, rule):
    vals = []
    for s in range(2):
        c = curve(spec, steps, P.TUNING_SEED_BASE + s, rule)
        l = c.loss[-1]; vals.append(math.log(l) if math.isfinite(l) and l > 0 else 50.0)
    return sum(vals) / len(vals)

tasks = ev.suite_tasks(suite, "digits-mlp", ntasks, 100, split="valid")
res = {"suite": suite, "tasks": []}
for spec, steps in tasks:
    adam = P.tune_lr(spec, "adam", steps, 2, None, out / "tuning")
    adam_c = [P.run_method(spec, "adam", steps, P.REPORT_SEED_BASE + s, None, adam["lr"]) for s in range(nseeds)]
    af = [c.loss[-1] for c in adam_c]; target = sum(af) / len(af)
    row = {"task": spec.name, "adam_lr": adam["lr"], "adam": target, "variants": {}}
    for name in names:
        grid = {}
        for e in [x / 4 for x in range(-12, -1)]:  # 1e-3 .. 0.56
            grid[e] = score(spec, steps, build(name, 10**e, steps))
        best = min(grid, key=grid.get)
        rule = build(name, 10**best, steps)
        cs = [curve(spec, steps, P.REPORT_SEED_BASE + s, rule) for s in range(nseeds)]
        fin = [c.loss[-1] for c in cs]
        mc = [sum(c.loss[k] for c in cs) / len(cs) for k in range(steps)]
        reach = P.steps_to_reach(mc, target)
        d = [a - b for a, b in zip(fin, af)]
        dm, dlo, dhi = P.ci95(d)
        row["variants"][name] = {"peak": 10**best, "grid": {f"{10**k:.3g}": v for k, v in grid.items()},
                                 "loss": sum(fin) / len(fin), "diff": [dm, dlo, dhi], "diffs": d,
                                 "speedup": steps / reach if reach else 0.0}
        print(spec.name, name, f"peak {10**best:.3g} adam {adam['lr']:.3g} loss {sum(fin)/len(fin):.4f} adam {target:.4f} "
              f"d {dm:+.4f} [{dlo:+.4f},{dhi:+.4f}] speedup {row['variants'][name]['speedup']:.2f}", flush=True)
    res["tasks"].append(row)
    (out / f"oracle-{suite}.json").write_text(json.dumps(res, indent=1))
# pooled
for name in names:
    d = [x for r in res["tasks"] for x in r["variants"][name]["diffs"]]
    sp = [r["variants"][name]["speedup"] for r in res["tasks"]]
    g = math.exp(sum(math.log(max(s, 1e-9)) for s in sp) / len(sp))
    print("POOLED", suite, name, "d %+.4f [%+.4f,%+.4f]" % P.ci95(d), "speedup geo %.2f" % g, flush=True)
