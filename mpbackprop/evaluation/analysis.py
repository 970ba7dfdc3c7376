"""What did the learned backward pass learn? Alignment with the true gradient, layer by layer.

:func:`analyze` trains one target network with a rule and records, per weighted layer and step:

* ``cos_to_grad``, ``norm_ratio``, ``sign_agreement`` — the rule's per-parameter signal
  (channel 0) against the true gradient (``torch.autograd`` on the same batch, same parameters);
* ``update_cos_to_adam``, ``update_norm_ratio`` — the step the rule takes against the step Adam
  would take from the true gradients seen so far (a shadow Adam state, learning rate ``adam_lr``);
* ``b_mean``, ``b_rms``, ``dead_fraction`` — statistics of the backward state of the layer's
  neurons (dead: zero for every sample of the batch);

plus the validation loss curve, and per weight use the mean message magnitude at chosen steps
(to draw where the signal flows and where it dies). Feedback alignment is the usual reference:
its signal starts misaligned and aligns as the forward weights adapt (Lillicrap et al., 2016).

A value that is undefined (a cosine against a zero gradient, statistics of a layer without
backward state) or not finite (a diverged run) is ``nan`` in memory and ``null`` in the JSON;
``"diverged": true`` marks a rule whose run diverged (as :mod:`mpbackprop.evaluation` defines it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..engine.backward import layer_context
from ..engine.inner_step import InnerStep
from ..kinds import Coefficients
from ..engine.losses import resolve_loss
from ..graph.network import CompiledNetwork
from ..rules import Adam, BackwardRule, UpdateContext, UpdateRule
from ..device import check_kernels
from ..device import resolve as resolve_device

__all__ = ["LayerSeries", "Analysis", "analyze", "plot_alignment", "plot_curves"]


@dataclass
class LayerSeries:
    name: str
    index: int
    kind: str
    cos_to_grad: list[float] = field(default_factory=list)
    norm_ratio: list[float] = field(default_factory=list)
    sign_agreement: list[float] = field(default_factory=list)
    update_cos_to_adam: list[float] = field(default_factory=list)
    update_norm_ratio: list[float] = field(default_factory=list)
    b_mean: list[float] = field(default_factory=list)
    b_rms: list[float] = field(default_factory=list)
    dead_fraction: list[float] = field(default_factory=list)


@dataclass
class Analysis:
    rule: str
    steps: int
    layers: list[LayerSeries]
    val_loss: list[float]
    messages: dict[int, Tensor] = field(default_factory=dict)  # step -> (num uses,) mean |message|

    @property
    def diverged(self) -> bool:
        """Whether the run diverged (:func:`mpbackprop.evaluation.is_diverged` at some step)."""
        from .protocol import is_diverged

        return any(is_diverged(v) for v in self.val_loss)

    def to_json(self) -> dict[str, Any]:
        """The series as a dict (floats may be ``nan``: write it with :func:`mpbackprop._json.dumps`)."""
        return {"rule": self.rule, "steps": self.steps, "val_loss": self.val_loss, "diverged": self.diverged,
                "layers": [dict(vars(layer)) for layer in self.layers]}


def _cos(a: Tensor, b: Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else float("nan")


def _messages(net: CompiledNetwork, layer: Any, b: Tensor, coef: Tensor) -> Tensor:
    """Mean over the batch of |channel-0 message| on each use of ``layer``."""
    view = net.views[layer.index]
    dst = view.fwd.edges()[1]  # post-neuron of each use (block-local)
    bj = b[dst]  # (E, d, B)
    m = Coefficients.of(coef).channel0(view.param, bj)  # type: ignore[union-attr]
    return m.abs().mean(-1).cpu()


def analyze(net: CompiledNetwork, theta: Tensor, batches: Any, evaluate: Any, backward_rule: BackwardRule,
            update: UpdateRule, steps: int, loss: str = "cross_entropy", adam_lr: float = 1e-2,
            message_steps: tuple[int, ...] = (), name: str = "rule") -> Analysis:
    """Train ``net`` from ``theta`` for ``steps`` steps and record the alignment series.

    ``batches()`` returns the next ``(x, y)``; ``evaluate(theta)`` the validation loss. The run is an
    :class:`~mpbackprop.engine.inner_step.InnerStep` (told ``total_steps = steps``), so the rule sees what it
    sees in training; the messages drawn at ``message_steps`` are computed from the coefficients of that
    step (the parameters and the update's history before its update, :func:`~mpbackprop.engine.layer_context`).
    """
    loss_fn = resolve_loss(loss)
    weighted = [layer for layer in net.layers if layer.weighted]
    series = [LayerSeries(layer.name, layer.index, layer.kind) for layer in weighted]
    run = InnerStep.start(net, theta, backward_rule, update, total_steps=steps, batches=batches, loss=loss_fn)
    adam = Adam(adam_lr)
    adam_state = adam.init_state(theta)
    segments = net.graph.nodes["param"].data["tensor"].to(theta.device)
    result = Analysis(name, steps, series, [])
    for step in range(steps):
        x, y = run.next_batch()
        x, y = x.to(run.theta.device), y.to(run.theta.device)  # no copy on the CPU
        theta, history = run.theta, run.history  # before this step's update
        with torch.enable_grad():  # the true gradient, by autograd on the same batch
            th = theta.detach().clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(loss_fn(net(x, th), y), th)
        with torch.no_grad():
            res = run.step(x, y, keep_backward=True).backward
            assert res is not None
            new_theta = run.theta
            adam_theta, adam_state = adam.step(UpdateContext(theta, grad.unsqueeze(1), adam_state, step, segments,
                                                             len(net.tensors), net.tensor_sizes))
            delta, adam_delta = theta - new_theta, theta - adam_theta
            sig = res.signal[:, 0]
            for s, layer in zip(series, weighted):
                sl = slice(layer.params[0].offset, layer.params[-1].stop)
                g, r = grad[sl], sig[sl]
                s.cos_to_grad.append(_cos(r, g))
                s.norm_ratio.append(float(r.norm() / g.norm()) if float(g.norm()) > 0 else float("nan"))
                nz = g != 0
                s.sign_agreement.append(float((torch.sign(r[nz]) == torch.sign(g[nz])).float().mean())
                                        if bool(nz.any()) else float("nan"))
                s.update_cos_to_adam.append(_cos(delta[sl], adam_delta[sl]))
                an = float(adam_delta[sl].norm())
                s.update_norm_ratio.append(float(delta[sl].norm()) / an if an > 0 else float("nan"))
                b = res.b[layer.index]
                if b is None:
                    s.b_mean.append(float("nan"))
                    s.b_rms.append(float("nan"))
                    s.dead_fraction.append(float("nan"))
                else:
                    s.b_mean.append(float(b.mean()))
                    s.b_rms.append(float(b.pow(2).mean().sqrt()))
                    s.dead_fraction.append(float((b.abs().amax(dim=(1, 2)) == 0).float().mean()))
            if step in message_steps:
                parts = []
                for layer in weighted:
                    b = res.b[layer.index]
                    coef = backward_rule.coefficients(layer_context(net, layer.index, theta, run.rule_state, history))
                    if b is None or coef is None:
                        parts.append(torch.zeros(net.views[layer.index].num_edges))
                    else:
                        parts.append(_messages(net, layer, b, coef))
                result.messages[step] = torch.cat(parts)
            result.val_loss.append(float(evaluate(new_theta)))
    return result


def plot_alignment(analyses: list[Analysis], path: Path, key: str = "cos_to_grad") -> Path:
    """Heatmaps (layers × steps) of ``key`` for each analysed rule, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .._io import atomic_write

    fig, axes = plt.subplots(1, len(analyses), figsize=(5.5 * len(analyses), 0.6 * len(analyses[0].layers) + 2.2),
                             squeeze=False)
    for ax, an in zip(axes[0], analyses):
        data = np.array([getattr(s, key) for s in an.layers], dtype=float)
        im = ax.imshow(data, aspect="auto", cmap="RdYlGn", vmin=-1 if "cos" in key else 0,
                       vmax=1, interpolation="nearest")
        ax.set_yticks(range(len(an.layers)), [f"{s.index}: {s.name}" for s in an.layers], fontsize=8)
        ax.set_xlabel("step")
        ax.set_title(f"{an.rule}: {key}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=90))
    plt.close(fig)
    return path


def plot_curves(curves: dict[str, list[float]], path: Path, title: str = "") -> Path:
    """Validation-loss curves of several methods on one task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._io import atomic_write

    fig, ax = plt.subplots(figsize=(6.5, 4))
    positive = False
    for k, (name, values) in enumerate(curves.items()):
        finite = [v if math.isfinite(v) and v > 0 else float("nan") for v in values]
        positive = positive or any(math.isfinite(v) for v in finite)
        ax.plot(range(1, len(finite) + 1), finite, label=name, color=f"C{k}")
    if positive:  # a log axis without a positive value only warns
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=90))
    plt.close(fig)
    return path


def _summary_md(analyses: list[Analysis], title: str) -> str:
    lines = [f"# Backward-pass analysis: {title}", "",
             "Cosine between each rule's per-parameter signal and the true gradient (autograd, same batch), "
             "mean over the first and last 10% of steps:", "",
             "| rule | layer | cos (start) | cos (end) | norm ratio (end) | sign agreement (end) | dead units (end) |",
             "|---|---|---|---|---|---|---|"]
    for an in analyses:
        k = max(1, an.steps // 10)
        for s in an.layers:
            def m(v: list[float], end: bool) -> float:
                part = [x for x in (v[-k:] if end else v[:k]) if math.isfinite(x)]
                return sum(part) / len(part) if part else float("nan")
            lines.append(f"| {an.rule} | {s.index}: {s.name} | {m(s.cos_to_grad, False):.3f} | {m(s.cos_to_grad, True):.3f} "
                         f"| {m(s.norm_ratio, True):.3f} | {m(s.sign_agreement, True):.3f} | {m(s.dead_fraction, True):.3f} |")
    lines.append("")
    for an in analyses:
        lines.append(f"- {an.rule}: validation loss {an.val_loss[0]:.4f} after step 1, {an.val_loss[-1]:.4f} after "
                     f"step {an.steps}.")
    return "\n".join(lines) + "\n"


def report(rule: str, spec: Any, steps: int, seed: int, out: Path | None, message_step: int | None = None,
           adam_lr: float | None = None, device: str = "cpu") -> dict[str, Any]:
    """Analyse ``rule`` (a rule file/directory/``default``, or ``exact``/``fa``) and feedback
    alignment on task ``spec``; write JSON, PNGs and a markdown summary to ``out``. ``message_step``
    (0-based; default the last step) is the step whose messages are drawn. The runs are on ``device``
    (:mod:`mpbackprop.device`; a rule needing the DGL reference path is refused before any run there)."""
    from dataclasses import replace

    from .protocol import resolve_rule, run_method, tune_lr
    from ..metatrain.inner import get_task
    from ..graph.plotting import plot_network
    from ..rules import SGD, Exact, FeedbackAlignment

    message_step = steps - 1 if message_step is None else message_step
    if not 0 <= message_step < steps:
        raise ValueError(f"message_step must be in 0..{steps - 1} (0-based, steps={steps}), got {message_step}")
    if rule == "exact":
        rules = {"exact": (Exact(), SGD(0.1))}
    elif rule == "fa":
        rules = {}
    else:  # a missing or damaged rule file is refused before any training
        backward, update, path = resolve_rule(rule)
        rules = {f"learned ({path.name})": (backward, update)}
    run_spec = replace(spec, init_seed=spec.init_seed + seed)
    task = get_task(run_spec)
    dev = resolve_device(device)
    fa_adam = (FeedbackAlignment(seed=seed), Adam(adam_lr if adam_lr is not None else 1e-2))
    for backward, _ in [*rules.values(), fa_adam]:  # refused before anything runs
        check_kernels(task.net, backward, dev)
    if adam_lr is None:
        adam_lr = tune_lr(spec, "adam", steps, tuning_seeds=1, device=dev)["lr"]
    rules["fa + adam"] = (fa_adam[0], Adam(adam_lr))
    analyses = []
    for name, (backward, update) in rules.items():
        gen = task.batch_generator(seed)  # the same batches as evaluate's runs of this seed
        an = analyze(task.net, task.theta0.clone().to(dev), lambda: task.batch(gen), lambda th: task.evaluate(th)[0],
                     backward.to(dev), update.to(dev), steps, task.loss, adam_lr, (message_step,), name)
        analyses.append(an)
    adam_run = run_method(spec, "adam", steps, seed, lr=adam_lr, device=dev)
    adam_curve = adam_run.loss
    doc = {"task": run_spec.name, "steps": steps, "seed": seed, "adam_lr": adam_lr,
           "rules": [a.to_json() for a in analyses], "adam_val_loss": adam_curve, "adam_diverged": adam_run.diverged}
    doc.update(analyses[0].to_json())  # the analysed rule's series at the top level
    if out is not None:
        from .. import _json as strict_json
        from .._io import atomic_write

        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "analysis.json", lambda p: Path(p).write_text(strict_json.dumps(doc, indent=1)))
        plot_alignment(analyses, out / "alignment.png", "cos_to_grad")
        plot_alignment(analyses, out / "update_alignment.png", "update_cos_to_adam")
        plot_curves({**{a.rule: a.val_loss for a in analyses}, f"adam (tuned lr {adam_lr:.3g})": adam_curve},
                    out / "curves.png", run_spec.name)
        if task.net.num_neurons <= 400:
            for a in analyses:
                slug = "".join(ch if ch.isalnum() else "_" for ch in a.rule).strip("_")
                plot_network(task.net, out / f"messages-{slug}.png", use_values=a.messages[message_step],
                             value_label=f"mean |message| at step {message_step + 1}",
                             title=f"{a.rule}, step {message_step + 1}")
        atomic_write(out / "summary.md", lambda p: Path(p).write_text(_summary_md(analyses, run_spec.name)))
    return doc
