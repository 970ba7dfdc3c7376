import math, sys
from pathlib import Path
import torch
from mpbackprop import evaluation as ev
from mpbackprop.evaluation import protocol as P
torch.set_num_threads(1)
out = Path("/tmp/oracle"); paths = sys.argv[1].split(","); suite = sys.argv[2] if len(sys.argv) > 2 else "heldout"
pooled = {}
for spec, steps in ev.suite_tasks(suite, "digits-mlp", 3, 100, split="valid"):
    adam = P.tune_lr(spec, "adam", steps, 2, None, out / "tuning")
    af = [P.run_method(spec, "adam", steps, P.REPORT_SEED_BASE + s, None, adam["lr"]).loss[-1] for s in range(10)]
    target = sum(af) / 10
    for path in paths:
        rule = ev.resolve_rule(path)[:2]
        lr = P.tune_lr(spec, "learned_backward_adam", steps, 2, rule, None)["lr"]
        cs = [P.run_method(spec, "learned_backward_adam", steps, P.REPORT_SEED_BASE + s, rule, lr) for s in range(10)]
        fin = [c.loss[-1] for c in cs]
        mc = [sum(c.loss[k] for c in cs) / 10 for k in range(steps)]
        reach = P.steps_to_reach(mc, target); sp = steps / reach if reach else 0.0
        d = [a - b for a, b in zip(fin, af)]
        pooled.setdefault(path, ([], []))[0].extend(d); pooled[path][1].append(sp)
        print(spec.name, path, f"lr {lr:.3g} (adam {adam['lr']:.3g}) d {P.ci95(d)[0]:+.4f} speedup {sp:.2f}", flush=True)
for path, (d, sp) in pooled.items():
    print("POOLED", path, "d %+.4f [%+.4f,%+.4f]" % P.ci95(d), [round(s, 2) for s in sp])
