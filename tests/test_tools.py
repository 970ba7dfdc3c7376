"""Smoke tests of the benchmark and report tools (behaviour, not timing)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_quick_json_and_readme_section(tmp_path, capsys):
    bench = _load("bench")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n")
    assert bench.main(["--quick", "--json", "--threads", "1", "--readme", str(readme)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["ratios"]) == {"exact_vs_autograd", "learned_vs_adam"}
    case = doc["cases"][0]
    assert set(case["ms_per_step"]) == {"autograd_sgd", "autograd_adam", "exact", "fa", "learned", "learned_eager"}
    assert all(v > 0 for v in case["ms_per_step"].values())
    text = readme.read_text()
    assert "<!-- bench:start -->" in text and "mlp-64-128-10" in text
    bench._write_readme(readme, doc)  # regenerating replaces the section instead of appending
    assert readme.read_text().count("<!-- bench:start -->") == 1
    doc["meta_training"] = {"outer_steps_per_min": 100.0, "sequential_outer_steps_per_min": 40.0, "speedup": 2.5,
                            "tasks_per_min": 400.0, "peak_rss_mb": 600.0, "truncation": 20, "tasks_per_step": 4}
    bench._write_readme(readme, doc)  # the meta-training line: batched against sequential copies
    line = next(x for x in readme.read_text().splitlines() if x.startswith("- Default meta-training"))
    assert "**100 outer steps/min**" in line and "400 tasks/min" in line and "against 40" in line and "2.50×" in line


def test_scaling_exponent_fits_a_power_law():
    bench = _load("bench")
    cases = [{"case": n, "params": p, "ms_per_step": {"exact": 0.001 * p ** 1.1}}
             for n, p in zip(bench.MLPS, (1e4, 1e5, 1e6))]
    assert abs(bench.scaling_exponent(cases) - 1.1) < 1e-9


def test_marginal_scaling_exponent_removes_the_fixed_step_cost():
    bench = _load("bench")
    cases = [{"case": n, "params": p, "ms_per_step": {"exact": 0.5 + 1e-5 * p}}
             for n, p in zip(bench.MLPS, (1e4, 1e5, 1e6))]
    assert bench.scaling_exponent(cases) < 0.8  # a fixed cost flattens the raw slope
    assert abs(bench.scaling_exponent(cases, overhead_ms=0.5) - 1.0) < 1e-9


def test_seeds_refuses_runs_of_different_families_without_a_common_validation_family(tmp_path, capsys):
    import pytest

    seeds = _load("seeds")
    runs = []
    for name, family in (("a", "augmented"), ("b", "augmented-depth")):
        run = tmp_path / name
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"family": family, "unroll": [10, 20]}))
        runs.append(str(run))
    with pytest.raises(SystemExit) as exit_info:
        seeds.main([runs[0], "--compare", runs[1], "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "different families (augmented, augmented-depth)" in err and "--valid-family" in err


def test_recipes_table_caching_and_refusal(tmp_path, monkeypatch):
    import argparse

    import pytest

    recipes = _load("recipes")
    with pytest.raises(argparse.ArgumentTypeError, match="NAME=RUN"):
        recipes.parse_recipe("no-name")
    with pytest.raises(argparse.ArgumentTypeError, match="not a meta-training run directory"):
        recipes.parse_recipe(f"v1={tmp_path}")
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"rule")
    (run / "config.json").write_text("{}")
    assert recipes.parse_recipe(f"v1={run}") == ("v1", [run])
    calls = []
    monkeypatch.setattr(recipes, "score_run", lambda r, f, n: calls.append((r, f)) or {"fresh": True})
    old = {"step": 3, "rule_sha256": recipes._digest(run / "best.pt"), "score": -1.0}
    previous = {"valid_tasks": 6, "recipes": {"v1": {str(run): {"augmented": old}}}}
    assert recipes.cached_score(previous, run, "augmented", 6) is old and not calls
    assert recipes.cached_score(previous, run, "augmented", 4) == {"fresh": True}  # other tasks
    (run / "best.pt").write_bytes(b"another rule")
    assert recipes.cached_score(previous, run, "augmented", 6) == {"fresh": True}  # another best.pt
    assert len(calls) == 2
    row = {"step": 3, "valid_log_loss_T": -1.0, "valid_log_loss_10T": -2.0, "valid_log_loss_25T": -3.0, "score": -2.0}
    doc = {"recipes": {"v1": {str(run): {"augmented": row}}}, "means": {"v1": {"augmented": -2.0}}}
    lines = recipes.table(doc, ["augmented"])
    assert lines[2] == "| v1 | `run` (3) | -1.000 / -2.000 / -3.000 | -2.0000 |"
    assert lines[3] == "| v1 | mean over 1 seeds | | **-2.0000** |"  # empty T / 10T / 25T cell
    # --keep: earlier recipes stay when scored on the same tasks, never when the tasks differ
    stored = {"families": ["augmented"], "valid_tasks": 6, **doc}
    assert recipes.kept_recipes(stored, ["augmented"], 6, {"v2"}) == (doc["recipes"], doc["means"])
    assert recipes.kept_recipes(stored, ["augmented"], 6, {"v1"}) == ({}, {})  # named again: re-scored
    assert recipes.kept_recipes(stored, ["augmented"], 4, {"v2"}) == ({}, {})
    assert recipes.kept_recipes(stored, ["augmented", "augmented-depth"], 6, {"v2"}) == ({}, {})


def test_probe_variants_and_validation_split(tmp_path, capsys):
    import pytest

    from mpbackprop import evaluation as ev

    probe = _load("probe")
    name, (_, update) = probe.variant("big=default:log_lr_scale=0.7")
    _, (_, base) = probe.variant("base=default")
    assert name == "big"
    assert abs(float(dict(update.named_parameters())["log_lr_scale"]) - 0.7) < 1e-6
    assert abs(float(dict(base.named_parameters())["log_lr_scale"]) - 0.7) > 1e-3
    _, (_, wd) = probe.variant("wd=default:weight_decay=true,log_wd=-2.3")
    assert wd.weight_decay and abs(float(wd.log_wd) + 2.3) < 1e-6
    assert float(wd.log_lr_scale) == float(base.log_lr_scale)  # meta-parameters carried over
    with pytest.raises(SystemExit, match="neither an option"):
        probe.variant("x=default:nonsense=1")
    valid = ev.suite_tasks("heldout", "digits-mlp", 2, 100, split="valid")
    held = ev.suite_tasks("heldout", "digits-mlp", 2, 100)
    assert {s.name for s, _ in valid}.isdisjoint({s.name for s, _ in held})
    assert probe.main(["v=default", "--suites", "heldout", "--seeds", "2", "--tasks", "1", "--steps", "5",
                       "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "probe.json").read_text())
    assert set(doc["suites"]["heldout"]["v"]["methods"]) == {"learned", "adam"}
    assert "heldout  v" in capsys.readouterr().out


def test_seeds_report_names_the_flags_that_change_it(tmp_path):
    import argparse

    seeds = _load("seeds")
    run = tmp_path / "pes-s2"
    run.mkdir()
    plain = argparse.Namespace(compare="", valid_family=None, out=str(seeds.ROOT / "results" / "seeds"))
    assert seeds._extra_flags(plain) == ""
    asked = argparse.Namespace(compare=f"default,{run}", valid_family="augmented-depth",
                               out=str(tmp_path / "seeds-v7"))
    assert seeds._extra_flags(asked) == " --compare default,pes-s2 --valid-family augmented-depth --out seeds-v7"


def _controller_inputs():
    """A weight tensor (12 entries, fan-in 4) and a bias (3) with a random gradient, in float64."""
    import torch

    sizes = (12, 3)
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(15, generator=gen, dtype=torch.float64)
    g = torch.randn(15, 1, generator=gen, dtype=torch.float64)
    return sizes, (4, 0), theta, g, torch.repeat_interleave(torch.arange(2), torch.tensor(sizes))


def test_probe_controller_is_the_rule_at_beta_0_and_bounded_otherwise(tmp_path):
    import math

    import pytest
    import torch

    from mpbackprop.rules.base import UpdateContext

    pc = _load("probe_controller")
    _, (_, plain) = pc.variant("p=0", "default")
    _, (_, fast) = pc.variant("f=2:-0.693:4", "default")
    assert isinstance(plain, pc.Controlled) and abs(float(plain.log_lr_scale - fast.log_lr_scale) - 0.693) < 1e-6
    with pytest.raises(SystemExit, match="NAME=BETA"):
        pc.variant("x", "default")
    sizes, fan_in, theta, g, segments = _controller_inputs()
    plain, fast = plain.double(), fast.double()
    ref = pc.ScheduledUpdate(**plain.config()).double()
    ref.load_state_dict(plain.state_dict())
    state = {"m": torch.stack([g[:, 0], g[:, 0]]), "v": g[:, 0] ** 2}  # momentum along the gradient: cos = 1

    def step(update, st, t):
        return update.step(UpdateContext(theta, g, st, t, segments, 2, sizes, 50, fan_in))

    with torch.no_grad():
        assert torch.equal(step(plain, state, 3)[0], step(ref, state, 3)[0])  # beta = 0: the rule itself
        new, st = step(fast, state, 3)
        # raised by beta * cos = 2 * 1, clipped at log 4
        assert torch.allclose(st["log_kappa"], torch.full((2,), math.log(4.0), dtype=torch.float64))
        same = pc.ScheduledUpdate(**plain.config()).double()
        same.load_state_dict(fast.state_dict())  # the shifted rule without the controller
        unscaled, _ = step(same, state, 3)
    # the bias tensor (no weight decay) moves exactly kappa = 4 times as far
    assert torch.allclose(theta[12:] - new[12:], 4 * (theta[12:] - unscaled[12:]), rtol=1e-12, atol=0)
    assert pc.main(["p=0", "c=0.1:-0.693", "l=loss-follow:0.3", "--suites", "heldout", "--seeds", "2", "--tasks", "1", "--steps", "5",
                    "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "controller.json").read_text())
    assert set(doc["suites"]["heldout"]) == {"p", "c", "l"}


def test_probe_controller_loss_kinds_scale_the_step_by_the_loss_curve():
    import pytest
    import torch

    from mpbackprop.rules.base import UpdateContext

    pc = _load("probe_controller")
    _, (_, setter) = pc.variant("s=loss-set:1:0.5:8:4", "default")
    _, (_, follow) = pc.variant("f=loss-follow:0.5:0.25:4", "default")
    assert isinstance(setter, pc.LossSet) and isinstance(follow, pc.LossFollow) and setter.window == 8
    for bad in ("x=loss-set", "x=loss-set:a", "x=loss-follow:1:0:1", "x=loss-set:1:0.3:8:4:9"):
        with pytest.raises(SystemExit):
            pc.variant(bad, "default")
    sizes, fan_in, theta, g, segments = _controller_inputs()
    setter, follow = setter.double(), follow.double()
    plain = pc.ScheduledUpdate(**setter.config()).double()
    plain.load_state_dict(setter.state_dict())

    def ctx(state, t, loss, total=500):
        return UpdateContext(theta, g, state, t, segments, 2, sizes, total, fan_in, torch.tensor(loss))

    def bias_move(update, state, t, loss, total=500):
        new, st = update.step(ctx(state, t, loss, total))
        return (theta[12:] - new[12:]), st  # the bias tensor: no weight decay

    with torch.no_grad():
        base = plain.init_state(theta)
        ref = bias_move(plain, base, 0, 2.0)[0]
        # in the window (K = min(8, 500/5) = 8): kappa 1 at the reference horizon's rate
        move, st = bias_move(setter, setter.init_state(theta), 0, 2.0)
        assert torch.allclose(move, ref * float(plain.step_size(0, 100) / plain.step_size(0, 500)), rtol=1e-12)
        for t in range(1, 8):  # the window's last four losses average 0.5: r = 0.25, log kappa = log(0.25/0.5)
            _, st = setter.step(ctx(st, t, 0.5))
        assert float(st["log_kappa"]) == 0.0  # set at step K, not before
        before = {k: v for k, v in st.items() if k in base}
        move, st = bias_move(setter, st, 8, 0.1)  # step K: kappa 0.5 from now on, at T's own rate
        assert torch.allclose(st["log_kappa"], torch.log(torch.tensor([0.5], dtype=torch.float64)))
        assert torch.allclose(move, 0.5 * bias_move(plain, before, 8, 0.1)[0], rtol=1e-12)
        # loss-follow: step 0 -> kappa = (1/0.25)^0.5 = 2; step 1 with loss 0 -> mean 0.09/0.19
        move, st = bias_move(follow, follow.init_state(theta), 0, 1.0)
        assert torch.allclose(move, 2 * ref, rtol=1e-12)
        kappa = (0.09 / 0.19 / 0.25) ** 0.5
        ref1 = bias_move(plain, st, 1, 0.0)[0]
        assert torch.allclose(bias_move(follow, st, 1, 0.0)[0], kappa * ref1, rtol=1e-12)


def test_lr_signals_fits_and_writes_one_row_per_task(tmp_path):
    lrs = _load("lr_signals")
    exact = lrs.fit([0.0, 1.0, 2.0], [1.0, 3.0, 5.0])
    assert abs(exact["corr"] - 1) < 1e-12 and abs(exact["slope"] - 2) < 1e-12 and exact["resid_std"] < 1e-12
    noisy = lrs.fit([0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 0.0, 1.0])
    assert 0 < noisy["corr"] < 1 and 0 < noisy["resid_std"] < noisy["std"]
    out = tmp_path / "signals.json"
    assert lrs.main(["--tasks", "1", "--steps", "6", "--multiple", "2", "--window", "5", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [r["family"] for r in doc["tasks"]] == ["digits-mlp", "tabular-mlp", "synthetic", "digits-conv"]
    assert all(r["lr_T"] > 0 and r["lr_long"] > 0 and r["ratio"] > 0 and r["params"] > 0 for r in doc["tasks"])
    assert -1 <= doc["summary"]["lr_T_vs_ratio"]["corr"] <= 1 and (tmp_path / "lr-signals-tuning").is_dir()


def test_probe_oracle_orthogonalise_is_near_u_vt_for_tall_wide_and_square():
    import torch

    po = _load("probe_oracle")
    gen = torch.Generator().manual_seed(0)
    for shape in ((32, 16), (16, 32), (20, 20)):
        n = min(shape)
        u = torch.linalg.qr(torch.randn(shape[0], n, generator=gen, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(shape[1], n, generator=gen, dtype=torch.float64))[0]
        x = u @ torch.diag(torch.linspace(1.0, 3.0, n, dtype=torch.float64)) @ v.t()  # condition number 3
        o = po.orthogonalise(x)
        assert o.shape == x.shape
        uu, _, vt = torch.linalg.svd(x, full_matrices=False)
        ref = uu @ vt
        sv = torch.linalg.svdvals(o)
        assert 0.6 <= float(sv.min()) and float(sv.max()) <= 1.3, (shape, sv)
        assert float((o * ref).sum() / (o.norm() * ref.norm())) > 0.9, shape
        assert float((o - ref).norm() / ref.norm()) < 0.4, shape  # not just aligned: close
        assert float(torch.linalg.svdvals(x / x.norm()).max()) < 0.6  # the iteration moved them, not the input


def _scaled_inputs():
    """A two-layer net's tensors (weight 3x4, bias 3, weight 2x3, bias 2) and a random step context."""
    import torch

    from mpbackprop.rules.base import UpdateContext

    sizes, fan_in = (12, 3, 6, 2), (4, 0, 3, 0)
    gen = torch.Generator().manual_seed(1)
    theta = torch.randn(sum(sizes), generator=gen, dtype=torch.float64)
    g = torch.randn(sum(sizes), 1, generator=gen, dtype=torch.float64)
    segments = torch.repeat_interleave(torch.arange(4), torch.tensor(sizes))
    return lambda state, t: UpdateContext(theta, g, state, t, segments, 4, sizes, 50, fan_in), theta


def test_probe_oracle_scaled_multiplies_only_the_chosen_tensors_step():
    from types import SimpleNamespace

    import pytest
    import torch

    po = _load("probe_oracle")
    ctx, theta = _scaled_inputs()
    tensors = [SimpleNamespace(shape=(3, 4), role="weight"), SimpleNamespace(shape=(3,), role="bias"),
               SimpleNamespace(shape=(2, 3), role="weight"), SimpleNamespace(shape=(2,), role="bias")]
    assert po.tensor_factors(tensors, head=3.0) == [1.0, 1.0, 3.0, 1.0]
    assert po.tensor_factors(tensors, head=3.0, bias=2.0) == [1.0, 2.0, 3.0, 2.0]
    conv = [SimpleNamespace(shape=(4, 1, 3, 3), role="weight"), SimpleNamespace(shape=(4,), role="bias"),
            SimpleNamespace(shape=(10, 16), role="weight")]
    assert po.tensor_factors(conv, conv=5.0, head=2.0) == [5.0, 1.0, 2.0]
    source = po.ev.resolve_rule("default")[1]
    for inner in (po.scheduled_at_peak(source, 0.03, 50, correction=False).double(), po.Muon(0.05)):
        state = inner.init_state(theta)
        with torch.no_grad():
            ref, ref_state = inner.step(ctx(state, 2))
            same, same_state = po.Scaled(inner, [1.0] * 4).step(ctx(state, 2))
            assert torch.equal(same, ref) and all(torch.equal(same_state[k], ref_state[k]) for k in ref_state)
            new, _ = po.Scaled(inner, [1.0, 1.0, 3.0, 1.0]).step(ctx(state, 2))
        step, ref_step = theta - new, theta - ref
        head = slice(15, 21)
        assert torch.allclose(step[head], 3 * ref_step[head], rtol=1e-12, atol=0)
        assert float(ref_step[head].abs().min()) > 0  # a step to scale
        rest = torch.ones_like(theta, dtype=torch.bool)
        rest[head] = False
        assert torch.equal(new[rest], ref[rest])
    with pytest.raises(ValueError, match="step factors"):
        po.Scaled(po.Muon(0.1), [1.0, 0.0])


def test_probe_oracle_directions_parse_and_bad_names_are_refused(capsys):
    import pytest

    po = _load("probe_oracle")
    assert po.parse_direction("adam:head=3,bias=2") == po.Direction("adam:head=3,bias=2", "adam",
                                                                    {"head": 3.0, "bias": 2.0})
    assert po.parse_direction("muon").factors == {}
    for bad, words in (("sgd", "adam, rule, muon"), ("adam:tail=3", "conv, head, bias"), ("adam:head=x", "number"),
                       ("adam:head=-1", "> 0")):
        with pytest.raises(ValueError, match=words):
            po.parse_direction(bad)
        with pytest.raises(SystemExit) as exit_info:
            po.main([bad, "--out", "unused"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err
    assert po.grid_exponents(-12, -2) == [k / 4 for k in range(-12, -1)]  # the scripts' grid, 1e-3 .. 0.56


def test_probe_oracle_pool_takes_every_paired_difference_and_the_geometric_speedup():
    import math

    po = _load("probe_oracle")
    rows = [{"directions": {"a": {"diffs": [0.1, 0.3], "speedup": 2.0}}},
            {"directions": {"a": {"diffs": [-0.2, 0.0], "speedup": 0.5}}}]
    pooled = po.pool(rows, ["a"])["a"]
    assert math.isclose(pooled["diff"]["mean"], 0.05) and pooled["diff"]["ci"][0] < 0.05 < pooled["diff"]["ci"][1]
    assert math.isclose(pooled["speedup"], 1.0) and pooled["speedups"] == [2.0, 0.5]
    rows[1]["directions"]["a"]["speedup"] = 0.0  # a task that never reached Adam's loss
    assert po.pool(rows, ["a"])["a"]["speedup"] == 0.0


def test_probe_oracle_cli_chooses_the_grid_argmin_and_pools_the_task_differences(tmp_path, capsys):
    import math

    po = _load("probe_oracle")
    assert po.main(["adam", "muon", "adam:head=3", "--tasks", "1", "--seeds", "2", "--steps", "4",
                    "--grid", "-9", "-7", "--out", str(tmp_path)]) == 0
    path = tmp_path / "probe-oracle-heldout-digits-mlp.json"
    doc = json.loads(path.read_text(), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))  # strict
    assert {"suite", "family", "rule", "directions", "seeds", "tuning_seeds", "grid", "tasks", "pooled"} <= set(doc)
    assert doc["grid"] == [-2.25, -2.0, -1.75] and (tmp_path / "tuning").is_dir()
    (row,) = doc["tasks"]
    assert {"task", "steps", "adam_lr", "adam_losses", "adam", "directions"} <= set(row)
    assert math.isclose(row["adam"], sum(row["adam_losses"]) / 2)
    out = capsys.readouterr().out.splitlines()
    for name in ("adam", "muon", "adam:head=3"):
        entry = row["directions"][name]
        assert [g["exponent"] for g in entry["grid"]] == doc["grid"]
        best = min(entry["grid"], key=lambda g: g["score"])
        assert entry["peak"] == best["peak"] == 10 ** best["exponent"]
        assert len(entry["losses"]) == 2 and all(math.isclose(d, a - b) for d, a, b in
                                                 zip(entry["diffs"], entry["losses"], row["adam_losses"]))
        assert math.isclose(entry["diff"]["mean"], sum(entry["diffs"]) / 2)
        reach = entry["steps_to_reach"]
        assert entry["speedup"] == (row["steps"] / reach if reach else 0.0)
        task_means = [t["directions"][name]["diff"]["mean"] for t in doc["tasks"]]
        assert math.isclose(doc["pooled"][name]["diff"]["mean"], sum(task_means) / len(task_means))
        assert any(line.startswith(f"{row['task']} 4 {name} peak ") for line in out)
        assert any(line.startswith(f"POOLED heldout {name} d ") for line in out)
    # the head factor changes the runs: not the plain direction under another name
    assert row["directions"]["adam:head=3"]["grid"] != row["directions"]["adam"]["grid"]


def test_probe_oracle_muon_steps_weights_orthogonally_and_vectors_by_adam():
    import torch

    po = _load("probe_oracle")
    ctx, theta = _scaled_inputs()
    g = ctx({}, 0).signal[:, 0]
    muon = po.Muon(0.05)
    with torch.no_grad():
        new, state = muon.step(ctx(muon.init_state(theta), 0))  # first step: schedule 1, momenta from zero
        late, _ = muon.step(ctx(muon.init_state(theta), 50))  # at T: the schedule's floor, 0.1
    step = theta - new
    # weights 3x4 and 2x3: Nesterov momentum (1 - 0.95)(1 + 0.95) g, orthogonalised, RMS scale 0.2*sqrt(max(out, in))
    u = 0.05 * 1.95 * g
    assert torch.allclose(step[:12], 0.05 * 0.2 * 2.0 * po.orthogonalise(u[:12].view(3, 4)).reshape(-1), rtol=1e-9)
    assert torch.allclose(step[15:21], 0.05 * 0.2 * 3**0.5 * po.orthogonalise(u[15:21].view(2, 3)).reshape(-1),
                          rtol=1e-9)
    for bias in (slice(12, 15), slice(21, 23)):  # Adam's first step: the gradient's sign
        assert torch.allclose(step[bias], 0.05 * torch.sign(g[bias]), rtol=1e-6)
    weights = torch.cat([torch.arange(12), torch.arange(15, 21)])  # (the biases' Adam step has its own bias correction)
    assert torch.allclose((theta - late)[weights], 0.1 * step[weights], rtol=1e-9)
    assert torch.allclose(state["m"], 0.05 * g) and torch.allclose(state["v"], 0.001 * g * g)
