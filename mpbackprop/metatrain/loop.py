"""The outer loop: meta-gradient estimates → clipped Adam steps on the rule's meta-parameters.

Run directory layout (every write atomic, write-then-rename):

=================  ==============================================================
``config.json``    the :class:`MetaConfig`
``rule.pt``        latest rule (``mpbackprop.rules.load_rule`` reads it)
``best.pt``        best rule so far on the meta-validation tasks
``state.pt``       outer optimizer, RNG states, step, inner states (``--resume``)
``metrics.jsonl``  one line per outer step: meta-loss, grad norm, skipped, seconds, …
``meta_loss.png``  the meta-loss curve with validation scores
``.lock``          held by the process writing the run (:mod:`.rundir`)
=================  ==============================================================

An outer step whose meta-loss or meta-gradient is not finite is skipped and counted,
never applied. Files are loaded with ``torch.load(weights_only=True)``: loading a
checkpoint never runs code. JSON files and the rule files' provenance strings are strict
JSON (``null`` for a missing or non-finite value).

One process writes a run (rank 0 of a distributed run), holding ``.lock`` for as long as it
runs (:mod:`.rundir`). Checkpoints are taken at outer-step boundaries only: SIGINT and SIGTERM
wait for the end of the current step, which is then saved (:mod:`.interrupts`), so
``--resume`` continues exactly as if the run had not stopped.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .._io import atomic_torch_save, atomic_write
from ..device import DeviceError
from ..device import resolve as resolve_device
from .._json import dump_line, finite_or_none, sanitize
from ..errors import GraphFileError, first_line
from ..rules import BackwardRule, Exact, LearnedBackward, LearnedUpdate, ScheduledUpdate, UpdateRule, save_rule
from ..rules.io import load_matching_state
from ..tasks.registry import TaskSpec, get_family
from .config import MetaConfig
from .distributed import WorkerFailure, Workers
from .estimators import Estimator, make_estimator
from .inner import new_inner, unroll
from .interrupts import StopRequests
from .rundir import RunDirectoryError, RunLock, append_line, clear_run, disk_full_guard, holds_run, read_metrics

__all__ = ["MetaTrainer", "meta_validate", "build_rules", "RunSummary", "print_note"]

_STATE_FORMAT = "mpbackprop-metatrain-state"


def check_device(name: str) -> None:
    """Refuse a device meta-training cannot run on (one line): unknown, unavailable (:func:`~mpbackprop.device.resolve`)
    or not the CPU — the estimators' noise, the batched copies, the all-reduces (gloo) and the checkpoints are
    not device-aware yet."""
    if resolve_device(name).type != "cpu":
        raise DeviceError(f"meta-training runs on the CPU only so far (device {name!r}); use --device cpu "
                          "(evaluate, analyze, the Trainer and tools/bench.py take --device cuda)")


def build_rules(cfg: MetaConfig) -> tuple[BackwardRule, UpdateRule]:
    """The learned backward and update rules a config describes (seeded)."""
    torch.manual_seed(cfg.seed)
    rule: BackwardRule = LearnedBackward(state_dim=cfg.state_dim, hidden=cfg.hidden, init=cfg.backward_init,
                                         seed=cfg.seed, features=cfg.features) if cfg.learn_backward else Exact()
    update: UpdateRule
    if cfg.update_rule == "scheduled":
        update = ScheduledUpdate(signal_dim=cfg.state_dim, hidden=cfg.update_hidden, lr=cfg.update_lr,
                                 correction=cfg.correction, weight_decay=cfg.weight_decay,
                                 weight_decay_init=cfg.weight_decay_init,
                                 horizon_exponent=cfg.horizon_exponent, horizon_init=cfg.horizon_init,
                                 width_init=cfg.width_init, width_wide_only=cfg.width_wide_only)
    else:
        update = LearnedUpdate(signal_dim=cfg.state_dim, hidden=cfg.update_hidden, layers=cfg.update_layers,
                               features=cfg.features, init=cfg.update_init, lr=cfg.update_lr,
                               weight_input=cfg.weight_input)
    return rule, update


def meta_param_groups(params: list[torch.nn.Parameter], cfg: MetaConfig) -> list[dict[str, Any]]:
    """The outer optimizer's parameter groups: one group, or (``scalar_lr_mult != 1``) the rule's
    0-dimensional meta-parameters at ``meta_lr·scalar_lr_mult`` apart from the rest."""
    if cfg.scalar_lr_mult == 1.0:
        return [{"params": list(params)}]
    scalars = [p for p in params if p.dim() == 0]
    others = [p for p in params if p.dim() > 0]
    groups = [{"params": others}] if others else []
    return (groups + [{"params": scalars, "lr": cfg.meta_lr * cfg.scalar_lr_mult}]) if scalars else groups


def score_key(multiple: int) -> str:
    """Metrics key of the meta-validation log loss at ``multiple``·T (``valid_log_loss_T``, ``…_10T``)."""
    return "valid_log_loss_T" if multiple == 1 else f"valid_log_loss_{multiple}T"


def meta_validate(rule: BackwardRule, update: UpdateRule, specs: list[TaskSpec], horizon: int,
                  val_examples: int | None = None, multiples: tuple[int, ...] = (1, 2)) -> dict[str, float]:
    """Train each task for ``k·horizon`` steps for each ``k`` in ``multiples`` (the rule told that
    length); mean log validation loss at the end of each, and ``score``, their mean over ``k``."""
    out: dict[str, float] = {}
    for k in multiples:
        logs = []
        for spec in specs:
            inner = new_inner(spec, update, k * horizon, val_examples or 10**9)
            with torch.no_grad():
                res = unroll(rule, update, inner, k * horizon, "final", 1.0, val_examples, math.inf, False,
                             check_every=max(horizon // 4, 1))
            logs.append(_safe_log(res.last_val_loss))
        out[score_key(k)] = sum(logs) / len(logs)
    out["score"] = sum(out[score_key(k)] for k in multiples) / len(multiples)
    return out


def _safe_log(x: float) -> float:
    return math.log(x) if math.isfinite(x) and x > 0 else 10.0


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001 - provenance is best effort
        return "unknown"


@dataclass
class RunSummary:
    out: Path
    steps: int
    skipped: int
    best_score: float
    interrupted: bool  # stopped before cfg.outer_steps (by a signal, or at once by a second one)
    seconds: float
    saved_step: int | None = None  # the step state.pt holds
    signal: str | None = None  # the signal that asked the run to stop ("SIGINT", "SIGTERM")
    stopped_at_once: bool = False  # a second signal: nothing saved since saved_step


#: What may change when a run is resumed (everything else must match its config.json).
RESUMABLE = ("outer_steps",)


def print_note(message: str) -> None:
    """Print a note of the run (not an error; the run goes on) as one line ``note: ...`` on stderr."""
    print(f"note: {message}", file=sys.stderr)


class MetaTrainer:
    """Meta-train a learned rule.

    Parameters
    ----------
    cfg : MetaConfig or mapping
        The run's configuration. With ``resume``, the run continues with its own ``config.json``
        and ``cfg`` only states what the caller asks for: a mapping of some fields, or a whole
        config; a field that differs from the saved one is refused, except ``outer_steps``.
    out : path
        Run directory (created). A directory that already holds a run is refused unless
        ``resume`` (continue it) or ``overwrite`` (remove its run files and start anew).
    resume : bool
        Continue from ``out/state.pt`` exactly where it stopped.
    workers : Workers, optional
        This process's place in a distributed run (:mod:`.distributed`); default: alone.
    overwrite : bool
        Start a new run in a directory that holds one.
    notify : callable, optional
        Receives one-line notes (a dropped torn metrics line, a changed ``outer_steps``);
        default: :func:`print_note`.

    The writing process holds the directory's lock from here to the end of :meth:`run`.
    """

    def __init__(self, cfg: MetaConfig | Mapping[str, Any], out: str | os.PathLike, resume: bool = False,
                 workers: Workers | None = None, overwrite: bool = False,
                 notify: Callable[[str], None] | None = None) -> None:
        self.out = Path(out)
        self.workers = workers or Workers()
        self.is_writer = self.workers.is_writer
        self.notify = notify or print_note
        self.lock = RunLock(self.out)
        state_path = self.out / "state.pt"
        if resume and overwrite:
            raise RunDirectoryError("--resume continues a run and --overwrite starts it anew: give one of them")
        nothing = GraphFileError(f"{self.out}: nothing to resume (no state.pt); run without --resume")
        if resume and not self.out.is_dir():
            raise nothing
        self.saved_step: int | None = None
        if isinstance(cfg, MetaConfig):  # refused before the directory is touched
            check_device(cfg.device)
        self._claim(resume, overwrite)
        try:
            if resume and not state_path.is_file():
                raise nothing
            cfg = self._resumed_config(cfg) if resume else cfg
            if not isinstance(cfg, MetaConfig):
                raise TypeError("a new run needs a whole MetaConfig")
            check_device(cfg.device)
            self.cfg = cfg
            self.family = get_family(cfg.family)
            self.rule, self.update = build_rules(cfg)
            self.estimator: Estimator = make_estimator(cfg, self.family, self.rule, self.update,
                                                       self.workers.slots(cfg.tasks_per_step), self.workers)
            self.params = self.estimator.params
            self.opt = torch.optim.Adam(meta_param_groups(self.params, cfg), lr=cfg.meta_lr)
            self.valid_specs = self.family.tasks("valid", cfg.eval_tasks, seed=cfg.seed)
            self.step = 0
            self.skipped = 0
            self.best_score = math.inf
            self.history: list[dict[str, Any]] = []
            if resume:
                self._load_state(state_path)
            if self.is_writer:  # on resume too: a new outer_steps is part of the run's config from now on
                self._write(self.out / "config.json", lambda p: Path(p).write_text(cfg.dumps()))
        except BaseException:
            self.lock.release()
            raise

    # ------------------------------------------------------------ run directory
    def _claim(self, resume: bool, overwrite: bool) -> None:
        """The writer locks the directory and makes sure it may start (or continue) a run there;
        every worker learns its verdict, so all of them stop with the same line."""
        problem: BaseException | None = None
        if self.is_writer:
            try:
                self.lock.acquire()
                if not resume and holds_run(self.out):
                    if not overwrite:
                        raise RunDirectoryError(
                            f"{self.out} already holds a meta-training run; continue it with --resume, or start "
                            "it anew with --overwrite (removes its checkpoints and metrics)")
                    clear_run(self.out)
            except BaseException as exc:  # noqa: BLE001 - the other workers must hear of it
                self.lock.release()
                problem = exc
        verdict = self.workers.broadcast(None if problem is None else first_line(problem))
        if problem is not None:
            raise problem
        if verdict is not None:
            raise RunDirectoryError(verdict)

    def _resumed_config(self, asked: MetaConfig | Mapping[str, Any]) -> MetaConfig:
        """The run's saved config with what is asked for; refuse asked values that would change it."""
        path = self.out / "config.json"
        try:
            saved = MetaConfig.load_run(path)
        except (OSError, ValueError, TypeError) as exc:
            raise GraphFileError(f"{path}: cannot resume with this config ({first_line(exc)}); repair it, or "
                                 "start a new run with --overwrite") from None
        requested = asked.to_json() if isinstance(asked, MetaConfig) else dict(asked)
        try:
            cfg = saved.replace(**requested)
        except (ValueError, TypeError) as exc:
            raise RunDirectoryError(f"cannot resume {self.out}: {first_line(exc)}") from None
        old, new = saved.to_json(), cfg.to_json()
        changed = [f"{k}={json.dumps(new[k])} (saved: {json.dumps(old[k])})" for k in new
                   if k not in RESUMABLE and new[k] != old[k]]
        if changed:
            raise RunDirectoryError(
                f"{self.out}: --resume continues the run with its own settings, and these differ from its "
                f"config.json: {', '.join(changed)}; leave them out or give the saved values (only "
                f"{', '.join('--' + k.replace('_', '-') for k in RESUMABLE)}, --threads, --progress and "
                "--tensorboard may change), or start a new run with --overwrite or another --out")
        if self.is_writer and cfg.outer_steps != saved.outer_steps:
            self.notify(f"outer_steps of {self.out} changed from {saved.outer_steps} to {cfg.outer_steps}")
        return cfg

    def _write(self, path: Path, write: Callable[[str], Any]) -> None:
        """An atomic write of one run file; a full disk ends the run with one line saying where it
        can continue from."""
        with disk_full_guard(path, self.saved_step):
            atomic_write(path, write)

    # ------------------------------------------------------------ checkpoints
    def _provenance(self) -> dict[str, Any]:
        return {"command": " ".join(sys.argv), "commit": _git_commit(), "config": self.cfg.to_json(),
                "step": self.step}

    def save(self) -> None:
        """Write the checkpoint (``state.pt``: optimizer, RNG and inner states), the latest rule and
        the plot, each atomically; rank 0 writes, every worker takes part because the inner states
        of all workers go into ``state.pt``. ``state.pt`` goes first: once it is written, the run
        continues from this step whatever happens to the other writes."""
        estimators = self.workers.gather(self.estimator.state_dict())
        if not self.is_writer:
            self.saved_step = self.step
            return
        state = {
            "format": _STATE_FORMAT,
            "step": self.step,
            "skipped": self.skipped,
            "best_score": self.best_score,
            "optimizer": self.opt.state_dict(),
            "rule": self.rule.state_dict(),
            "update": self.update.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "world_size": self.workers.world_size,
            "estimators": estimators,
        }
        with disk_full_guard(self.out / "state.pt", self.saved_step):
            atomic_torch_save(state, self.out / "state.pt")
        self.saved_step = self.step
        self._save_rule("rule.pt", self._provenance())
        self._plot()

    def _save_rule(self, name: str, meta: dict[str, Any]) -> None:
        with disk_full_guard(self.out / name, self.saved_step):
            save_rule(self.out / name, self.rule, self.update, meta)

    def _load_state(self, path: Path) -> None:
        what_to_do = "start a new run with --overwrite, or restore the run directory from a backup"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - never torch's hint to load it unsafely
            raise GraphFileError(f"{path}: not a readable meta-training state ({type(exc).__name__}: damaged, "
                                 f"or not a file meta-train wrote); {what_to_do}") from None
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise GraphFileError(f"{path}: not a meta-training state (a torch file of another kind); {what_to_do}")
        if state.get("world_size") != self.workers.world_size:
            raise GraphFileError(f"{path}: cannot resume from this file (it was written by {state.get('world_size')} "
                                 f"workers, this run has {self.workers.world_size}; resume with the same number)")
        for part, module in (("rule", self.rule), ("update", self.update)):
            try:  # the check rule files get: every key and shape named, not torch's first line
                load_matching_state(module, state.get(part))
            except ValueError as exc:
                raise GraphFileError(f"{path}: not a readable meta-training state (its {part} state does not fit the "
                                     f"run's config.json: {exc}); {what_to_do}") from None
        try:
            self.opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
            self.estimator.load_state_dict(state["estimators"][self.workers.rank])
            self.step = int(state["step"])
            self.skipped = int(state["skipped"])
            self.best_score = float(state["best_score"])
        except Exception as exc:  # noqa: BLE001
            raise GraphFileError(f"{path}: not a readable meta-training state (it does not fit the run's "
                                 f"config.json: {first_line(exc)}); {what_to_do}") from None
        self.saved_step = self.step
        rows, note = read_metrics(self.out / "metrics.jsonl")
        if note and self.is_writer:
            self.notify(note)
        # drop lines written after the checkpoint: the run continues from there
        self.history = [sanitize(r) for r in rows if r["step"] <= self.step]
        if self.is_writer and (self.out / "metrics.jsonl").is_file():
            text = "".join(dump_line(r) for r in self.history)
            self._write(self.out / "metrics.jsonl", lambda p: Path(p).write_text(text))

    def _plot(self) -> None:
        if not self.history:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        points = [(h["step"], v) for h in self.history if (v := finite_or_none(h.get("meta_loss"))) is not None]
        steps, losses = [s for s, _ in points], [v for _, v in points]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, losses, lw=0.8, alpha=0.5, label="meta-loss (train tasks)")
        if len(losses) >= 10:
            k = max(len(losses) // 20, 5)
            smooth = [sum(losses[max(0, i - k):i + 1]) / len(losses[max(0, i - k):i + 1]) for i in range(len(losses))]
            ax.plot(steps, smooth, lw=2, label=f"running mean ({k})")
        vs = [(h["step"], v) for h in self.history if (v := finite_or_none(h.get("valid_log_loss_T"))) is not None]
        if vs:
            ax.plot(*zip(*vs), "o-", color="C3", label="meta-validation log loss at T")
        ax.set_xlabel("outer step")
        ax.set_ylabel("log validation loss")
        ax.set_title(f"meta-training {self.cfg.family} ({self.cfg.estimator})")
        ax.legend()
        fig.tight_layout()
        try:
            self._write(self.out / "meta_loss.png", lambda p: fig.savefig(p, format="png", dpi=100))
        finally:
            plt.close(fig)

    def _log(self, row: dict[str, Any]) -> None:
        row = sanitize(row)  # strict JSON: a non-finite value is written as null
        self.history.append(row)
        if self.is_writer:
            path = self.out / "metrics.jsonl"
            with disk_full_guard(path, self.saved_step):
                append_line(path, dump_line(row))

    # ------------------------------------------------------------------- loop
    def outer_step(self) -> dict[str, Any]:
        """One meta-gradient estimate and (if finite) one Adam step; returns the metrics row."""
        t0 = time.perf_counter()
        fault = os.environ.get("MPBACKPROP_FAULT_AT_STEP")  # fault injection for the resume tests
        if fault and int(fault) == self.step + 1 and self.workers.rank == self.workers.world_size - 1:
            os._exit(3)
        est = self.estimator.estimate()
        if est.reduced:  # ES/PES combined their scalars over workers already
            grad, loss = est.grad, est.meta_loss
        else:
            grad = self.workers.mean(est.grad)
            loss = float(self.workers.mean(torch.tensor([est.meta_loss], dtype=torch.float64))[0])
        norm = float(grad.norm())
        skipped = not (math.isfinite(norm) and math.isfinite(loss))
        if skipped:
            self.skipped += 1
        else:
            scale = min(1.0, self.cfg.clip_norm / (norm + 1e-12))
            k = 0
            for p in self.params:
                n = p.numel()
                p.grad = (grad[k:k + n] * scale).view_as(p).to(p.dtype)
                k += n
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": self.step, "meta_loss": loss, "grad_norm": norm, "skipped": skipped,
                "skipped_total": self.skipped, "resets": est.resets, "finished": est.finished,
                "seconds": round(time.perf_counter() - t0, 4)}

    def validate(self) -> dict[str, float]:
        return meta_validate(self.rule, self.update, self.valid_specs, self.cfg.eval_horizon, self.cfg.val_examples,
                             self.cfg.eval_multiples)

    def run(self, progress: bool = True, on_step: Callable[[dict[str, Any]], None] | None = None) -> RunSummary:
        """Run until ``cfg.outer_steps``. SIGINT/SIGTERM: finish the current step, save it, return
        (``interrupted``); a second signal: return at once without saving (``stopped_at_once``).
        Releases the directory's lock when it returns."""
        from tqdm import tqdm

        start = time.perf_counter()
        if self.is_writer:
            self.lock.acquire()
        stop = StopRequests()
        at_once = False
        bar = tqdm(total=self.cfg.outer_steps, initial=self.step, disable=not progress, desc="meta-train",
                   unit="step", dynamic_ncols=True)
        try:
            with stop:
                if self.step == 0 and self.is_writer and not any(r["step"] == 0 for r in self.history):
                    self._validate_and_keep(initial=True)
                while self.step < self.cfg.outer_steps and not self.workers.any(stop.requested):
                    row = self.outer_step()
                    if self.is_writer and (self.step % self.cfg.eval_every == 0 or self.step == self.cfg.outer_steps):
                        row.update(self._validate_and_keep())
                    self._log(row)
                    if on_step:
                        on_step(row)
                    bar.update(1)
                    bar.set_postfix(meta_loss=f"{row['meta_loss']:.3f}", skipped=self.skipped)
                    if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.outer_steps:
                        self.save()
                if self.saved_step != self.step:  # stopped between checkpoints, or nothing ran at all
                    self.save()
        except KeyboardInterrupt:  # a second signal: the last checkpoint stays as it is
            at_once = True
        except WorkerFailure as exc:
            where = f"step {self.saved_step} in {self.out}" if self.saved_step is not None else "none written yet"
            raise WorkerFailure(f"{exc}; last checkpoint: {where} (continue with --resume)") from exc
        finally:
            bar.close()
            self.lock.release()
        name = None if stop.signum is None else signal.Signals(stop.signum).name
        return RunSummary(self.out, self.step, self.skipped, self.best_score,
                          at_once or self.step < self.cfg.outer_steps, time.perf_counter() - start,
                          self.saved_step, name, at_once)

    def _validate_and_keep(self, initial: bool = False) -> dict[str, Any]:
        scores = self.validate()
        score = scores.pop("score")
        best = score < self.best_score
        if best:
            self.best_score = score
            if self.is_writer:
                self._save_rule("best.pt", {**self._provenance(), **scores})
        if initial:
            self._log({"step": 0, "meta_loss": None, "grad_norm": None, "skipped": False,
                       "skipped_total": 0, "resets": 0, "finished": 0, "seconds": 0.0, **scores, "best": best})
        return {**scores, "best": best}
