import json, math, sys
from pathlib import Path
import torch
from mpbackprop import evaluation as ev
from mpbackprop.evaluation import protocol as P
from mpbackprop.rules import Exact
suite, out = sys.argv[1], Path(sys.argv[2]); paths = sys.argv[3].split(",")
mult = int(sys.argv[4]) if len(sys.argv) > 4 else 1
torch.set_num_threads(1)
pooled = {}
for spec, steps in ev.suite_tasks(suite, "digits-mlp", 3, 100 * mult, split="valid"):
    adam = P.tune_lr(spec, "adam", steps, 2, None, out / "tuning")
    af = [P.run_method(spec, "adam", steps, P.REPORT_SEED_BASE + s, None, adam["lr"]).loss[-1] for s in range(10)]
    target = sum(af) / len(af)
    for path in paths:
        b, u, _ = ev.resolve_rule(path)
        for mode, rule in (("learned", (b, u)), ("exact", (Exact(), u))):
            cs = [P.run_method(spec, "learned", steps, P.REPORT_SEED_BASE + s, rule) for s in range(10)]
            fin = [c.loss[-1] for c in cs]
            mc = [sum(c.loss[k] for c in cs) / len(cs) for k in range(steps)]
            reach = P.steps_to_reach(mc, target); sp = steps / reach if reach else 0.0
            d = [a - b for a, b in zip(fin, af)]
            pooled.setdefault((path, mode), ([], []))[0].extend(d); pooled[(path, mode)][1].append(sp)
            print(spec.name, steps, path, mode, f"loss {sum(fin)/10:.4f} adam {target:.4f} d {P.ci95(d)[0]:+.4f} speedup {sp:.2f} best-at {mc.index(min(mc))+1}", flush=True)
for (path, mode), (d, sp) in pooled.items():
    g = math.exp(sum(math.log(max(s, 1e-9)) for s in sp) / len(sp))
    print("POOLED", path, mode, "d %+.4f [%+.4f,%+.4f]" % P.ci95(d), "speedup geo %.2f" % g, [round(s, 2) for s in sp])
