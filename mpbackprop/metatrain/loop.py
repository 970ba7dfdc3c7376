"""The outer loop: meta-gradient estimates → clipped Adam steps on the rule's meta-parameters.

Run directory layout (every write atomic, write-then-rename):

=================  ==============================================================
``config.json``    the :class:`MetaConfig`
``rule.pt``        latest rule (``mpbackprop.rules.load_rule`` reads it)
``best.pt``        best rule so far on the meta-validation tasks
``state.pt``       outer optimizer, RNG states, step, inner states (``--resume``)
``metrics.jsonl``  one line per outer step: meta-loss, grad norm, skipped, seconds, …
``meta_loss.png``  the meta-loss curve with validation scores
=================  ==============================================================

An outer step whose meta-loss or meta-gradient is not finite is skipped and counted,
never applied. Files are loaded with ``torch.load(weights_only=True)``: loading a
checkpoint never runs code.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .._io import atomic_write
from ..errors import GraphFileError
from ..rules import BackwardRule, LearnedBackward, LearnedUpdate, ScheduledUpdate, UpdateRule, save_rule
from ..tasks import TaskSpec, get_family
from .config import MetaConfig
from .distributed import WorkerFailure, Workers
from .estimators import Estimator, make_estimator
from .inner import get_task, unroll

__all__ = ["MetaTrainer", "meta_validate", "build_rules", "RunSummary"]

_STATE_FORMAT = "mpbackprop-metatrain-state"


def build_rules(cfg: MetaConfig) -> tuple[BackwardRule, UpdateRule]:
    """The learned backward and update rules a config describes (seeded)."""
    torch.manual_seed(cfg.seed)
    rule = LearnedBackward(state_dim=cfg.state_dim, hidden=cfg.hidden, init=cfg.backward_init, seed=cfg.seed,
                           features=cfg.features)
    update: UpdateRule
    if cfg.update_rule == "scheduled":
        update = ScheduledUpdate(signal_dim=cfg.state_dim, hidden=cfg.update_hidden, lr=cfg.update_lr,
                                 correction=cfg.correction, weight_decay=cfg.weight_decay)
    else:
        update = LearnedUpdate(signal_dim=cfg.state_dim, hidden=cfg.update_hidden, layers=cfg.update_layers,
                               features=cfg.features, init=cfg.update_init, lr=cfg.update_lr,
                               weight_input=cfg.weight_input)
    return rule, update


def score_key(multiple: int) -> str:
    """Metrics key of the meta-validation log loss at ``multiple``·T (``valid_log_loss_T``, ``…_10T``)."""
    return "valid_log_loss_T" if multiple == 1 else f"valid_log_loss_{multiple}T"


def meta_validate(rule: BackwardRule, update: UpdateRule, specs: list[TaskSpec], horizon: int,
                  val_examples: int | None = None, multiples: tuple[int, ...] = (1, 2)) -> dict[str, float]:
    """Train each task for ``k·horizon`` steps for each ``k`` in ``multiples`` (the rule told that
    length); mean log validation loss at the end of each, and ``score``, their mean over ``k``."""
    from .inner import new_inner

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
    interrupted: bool
    seconds: float


class MetaTrainer:
    """Meta-train a learned rule.

    Parameters
    ----------
    cfg : MetaConfig
    out : path
        Run directory (created).
    resume : bool
        Continue from ``out/state.pt`` exactly where it stopped.
    workers : Workers, optional
        This process's place in a distributed run (:mod:`.distributed`); default: alone.
    """

    def __init__(self, cfg: MetaConfig, out: str | os.PathLike, resume: bool = False,
                 workers: Workers | None = None) -> None:
        self.out = Path(out)
        self.workers = workers or Workers()
        self.is_writer = self.workers.is_writer
        state_path = self.out / "state.pt"
        if resume:
            if not state_path.is_file():
                raise GraphFileError(f"{self.out}: nothing to resume (no state.pt); run without --resume")
            try:
                cfg = MetaConfig.load_run(self.out / "config.json").replace(outer_steps=cfg.outer_steps)
            except (OSError, ValueError, TypeError) as exc:
                raise GraphFileError(f"{self.out / 'config.json'}: cannot resume with this config ({exc})") from exc
        self.cfg = cfg
        self.family = get_family(cfg.family)
        self.rule, self.update = build_rules(cfg)
        self.estimator: Estimator = make_estimator(cfg, self.family, self.rule, self.update,
                                                   self.workers.slots(cfg.tasks_per_step), self.workers)
        self.params = self.estimator.params
        self.opt = torch.optim.Adam(self.params, lr=cfg.meta_lr)
        self.valid_specs = self.family.tasks("valid", cfg.eval_tasks, seed=cfg.seed)
        self.step = 0
        self.saved_step: int | None = None
        self.skipped = 0
        self.best_score = math.inf
        self.history: list[dict[str, Any]] = []
        if resume:
            self._load_state(state_path)
        elif self.is_writer:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
        if self.is_writer:  # on resume too: a new --outer-steps is part of the run's config from now on
            atomic_write(self.out / "config.json", lambda p: Path(p).write_text(json.dumps(cfg.to_json(), indent=2)))

    # ------------------------------------------------------------ checkpoints
    def _provenance(self) -> dict[str, Any]:
        return {"command": " ".join(sys.argv), "commit": _git_commit(), "config": self.cfg.to_json(),
                "step": self.step}

    def save(self) -> None:
        """Write latest rule, optimizer/RNG/inner state and the plot (atomically; rank 0 writes,
        every worker takes part because the inner states of all workers go into ``state.pt``)."""
        estimators = self.workers.gather(self.estimator.state_dict())
        self.saved_step = self.step
        if not self.is_writer:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        save_rule(self.out / "rule.pt", self.rule, self.update, self._provenance())
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
        atomic_write(self.out / "state.pt", lambda p: torch.save(state, p))
        self._plot()

    def _load_state(self, path: Path) -> None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
                raise ValueError("not a meta-training state file")
            self.rule.load_state_dict(state["rule"])
            self.update.load_state_dict(state["update"])
            self.opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
            if int(state["world_size"]) != self.workers.world_size:
                raise ValueError(f"it was written by {state['world_size']} workers, this run has "
                                 f"{self.workers.world_size}; resume with the same number")
            self.estimator.load_state_dict(state["estimators"][self.workers.rank])
        except Exception as exc:  # noqa: BLE001
            raise GraphFileError(f"{path}: cannot resume from this file ({exc})") from exc
        self.step = int(state["step"])
        self.saved_step = self.step
        self.skipped = int(state["skipped"])
        self.best_score = float(state["best_score"])
        metrics = self.out / "metrics.jsonl"
        if metrics.is_file():  # drop lines written after the checkpoint: the run continues from there
            lines = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
            self.history = [l for l in lines if l["step"] <= self.step]
            if self.is_writer:
                text = "".join(json.dumps(l) + "\n" for l in self.history)
                atomic_write(metrics, lambda p: Path(p).write_text(text))

    def _plot(self) -> None:
        if not self.history:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [h["step"] for h in self.history if math.isfinite(h.get("meta_loss", math.nan))]
        losses = [h["meta_loss"] for h in self.history if math.isfinite(h.get("meta_loss", math.nan))]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, losses, lw=0.8, alpha=0.5, label="meta-loss (train tasks)")
        if len(losses) >= 10:
            k = max(len(losses) // 20, 5)
            smooth = [sum(losses[max(0, i - k):i + 1]) / len(losses[max(0, i - k):i + 1]) for i in range(len(losses))]
            ax.plot(steps, smooth, lw=2, label=f"running mean ({k})")
        vs = [(h["step"], h["valid_log_loss_T"]) for h in self.history if "valid_log_loss_T" in h]
        if vs:
            ax.plot(*zip(*vs), "o-", color="C3", label="meta-validation log loss at T")
        ax.set_xlabel("outer step")
        ax.set_ylabel("log validation loss")
        ax.set_title(f"meta-training {self.cfg.family} ({self.cfg.estimator})")
        ax.legend()
        fig.tight_layout()
        atomic_write(self.out / "meta_loss.png", lambda p: fig.savefig(p, format="png", dpi=100))
        plt.close(fig)

    def _log(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if self.is_writer:
            with open(self.out / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")

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
        """Run until ``cfg.outer_steps``; Ctrl-C saves a checkpoint before returning."""
        from tqdm import tqdm

        start = time.perf_counter()
        interrupted = False
        if self.step == 0 and self.is_writer:
            self._validate_and_keep(initial=True)
        bar = tqdm(total=self.cfg.outer_steps, initial=self.step, disable=not progress, desc="meta-train",
                   unit="step", dynamic_ncols=True)
        try:
            while self.step < self.cfg.outer_steps:
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
            if self.step == 0:  # nothing ran (outer_steps=0): still leave a complete run directory
                self.save()
        except KeyboardInterrupt:
            interrupted = True
            self.save()
        except WorkerFailure as exc:
            where = f"step {self.saved_step} in {self.out}" if self.saved_step is not None else "none written yet"
            raise WorkerFailure(f"{exc}; last checkpoint: {where} (continue with --resume)") from exc
        finally:
            bar.close()
        return RunSummary(self.out, self.step, self.skipped, self.best_score, interrupted,
                          time.perf_counter() - start)

    def _validate_and_keep(self, initial: bool = False) -> dict[str, Any]:
        scores = self.validate()
        score = scores.pop("score")
        best = score < self.best_score
        if best:
            self.best_score = score
            if self.is_writer:
                save_rule(self.out / "best.pt", self.rule, self.update, {**self._provenance(), **scores})
        if initial:
            self._log({"step": 0, "meta_loss": math.nan, "grad_norm": math.nan, "skipped": False,
                       "skipped_total": 0, "resets": 0, "finished": 0, "seconds": 0.0, **scores, "best": best})
        return {**scores, "best": best}


