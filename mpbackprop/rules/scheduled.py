"""A learned update that holds over the whole length of a run: Adam's direction, a bounded learned
correction, and a step size from a schedule relative to the run's stated length.

:class:`ScheduledUpdate` takes the step

.. math::

    θ ← θ − η_i(t, T)·\\big(\\hat m/(\\sqrt{\\hat v}+ε) + c·\\tanh(\\tfrac12(\\mathrm{MLP}(x_i, τ) − \\mathrm{MLP}(−x_i, τ)))\\big) − η(t, T)·λ·θ

* **direction** — Adam's, plus a learned correction bounded by ``c`` per parameter (the MLP's last layer
  starts at zero, so the rule starts *as* Adam with the schedule below). The correction is made odd in
  the gradient features, ``(MLP(x, τ) − MLP(−x, τ))/2`` inside the ``tanh``: it vanishes with the
  gradient and flips with it, so it cannot add a constant drift to the parameters — a learned bias that
  is harmless over 100 steps but moves every weight steadily over thousands (the first recipes' rules,
  meta-trained with an unconstrained correction and backward, lost most at 10T and 25T). The MLP sees the gradient and
  the momenta at 0.9 and 0.99 over the root of the second moment, each normalised per tensor (as the
  compact :class:`~mpbackprop.rules.LearnedUpdate`), and the progress ``τ = min(t/T, 1)`` as
  ``(τ, cos πτ)`` — never an absolute step count.
* **step size** — ``η(t, T) = lr·e^{a}·(T/T_0)^{-b}·s(τ)`` with the cosine schedule
  ``s(τ) = f + (1 − f)·(1 + cos πτ)/2`` from 1 down to a floor ``f`` (Loshchilov & Hutter, 2017), learned
  scale ``a`` and floor ``f``, and a horizon exponent ``b`` (bounded in (−1, 1); starts at ``horizon_init``,
  learned only with ``horizon_exponent=True``); ``T`` is the run's stated length
  (``total_steps``: the Trainer's, the evaluation horizon, the meta-training task's horizon), ``T_0`` the
  reference horizon. The schedule is kept apart from the learned direction, as in Celo: the learned part can
  turn the direction, not blow up the step. On four validation-split tasks (digits, wine, breast cancer)
  the best peak rate of cosine-scheduled Adam (floor 0.1) fell from 0.018–0.032 at T = 100 to
  0.0032–0.0056 at T = 1000, i.e. ``b`` of 0.5–1: the first long-horizon recipes started at ``lr = 0.02``,
  ``b = 0.6``; the recipe since v7 starts at twice that rate with weight decay 0.1
  (:class:`~mpbackprop.metatrain.MetaConfig`; the convnets underfit at 0.02).
* **width** — per tensor, weights (not biases) get ``(fan_in/64)^{-p}`` with a learned exponent ``p``
  (bounded in (−1, 1); μP's value for Adam is 1, Yang et al., 2022; μLO, Thérien et al., 2024), so the
  step of a wider layer can shrink with its fan-in. With ``width_wide_only=True`` a fan-in below 64 counts
  as 64: narrow layers (a convnet's 3×3 kernels, a tabular net's 13 inputs) keep the common step, as
  μP keeps input layers' rates, and only wider layers' steps shrink.
* **weight decay** — optional (``weight_decay=True``): decoupled, ``λ = e^{w}`` learned, on weights only.

**Past the stated length** (``t ≥ T``) the progress stays at ``τ = 1``: the step size stays at its floor
``f·η`` and the MLP sees the features of the run's end — a run longer than stated continues as its end
did, never with a growing step. Without a stated length (``total_steps=None``) the rule refuses to step.

**Cost.** Without autograd the same step may run as one fused kernel per network
(:func:`mpbackprop.rules.kernels.scheduled_step`, compiled; :func:`~mpbackprop.rules.kernels.choose`
decides); :meth:`ScheduledUpdate.step`'s code below is its reference.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from . import kernels
from .base import UpdateContext, UpdateHistory, UpdateRule
from .learned import _feature_mlp, _tanh, mlp

__all__ = ["ScheduledUpdate", "cosine_schedule", "width_logs"]

_DECAYS = (0.9, 0.99)
_BETA2 = 0.999
#: Fan-in at which the width factor is 1.
WIDTH_REF = 64


def width_logs(fan_in: tuple[int, ...], wide_only: bool, dtype: torch.dtype,
               device: torch.device | str | None = None) -> Tensor:
    """``log(fan_in/64)`` per tensor (0 for biases, whose fan-in is written 0), the exponent's argument of
    the width factor ``(fan_in/64)^{-p}``; with ``wide_only`` a fan-in below 64 counts as 64 (factor 1), so
    only wider layers' steps change. The one place the eager step, the fused kernel's inputs and the batched
    meta-training step take it from."""
    floor = WIDTH_REF if wide_only else 0
    return torch.tensor([math.log(max(f, floor) / WIDTH_REF) if f > 0 else 0.0 for f in fan_in], dtype=dtype,
                        device=device)


def cosine_schedule(progress: Tensor | float, floor: Tensor | float) -> Tensor | float:
    """``f + (1 − f)·(1 + cos πτ)/2`` with ``τ`` clamped to ``[0, 1]`` (constant ``f`` past the end)."""
    if isinstance(progress, Tensor):
        tau = progress.clamp(0.0, 1.0)
        return floor + (1 - floor) * 0.5 * (1 + torch.cos(math.pi * tau))
    tau = min(max(float(progress), 0.0), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * tau))


class ScheduledUpdate(UpdateRule):
    """Adam direction + bounded learned correction, with a step size scheduled over the run's length.

    Parameters
    ----------
    signal_dim : int
        Channels of the per-parameter signal (the backward rule's ``state_dim``).
    hidden : int
        Width of the correction MLP's hidden layer.
    lr : float
        Peak learning rate at the reference horizon before meta-training (``a = b = 0``).
    correction : float
        Bound ``c`` of the learned correction per parameter, relative to Adam's direction (whose
        entries are of order 1).
    floor : float
        Initial floor ``f`` of the schedule, as a fraction of the peak, in (0, 1).
    horizon_ref : int
        Reference horizon ``T_0`` of the horizon exponent.
    weight_decay : bool
        Add a learned decoupled weight decay (starting at ``λ = 1e-4``).
    horizon_exponent : bool
        Learn the horizon exponent ``b``; if False it stays at ``horizon_init`` (a buffer, not a
        meta-parameter).
    horizon_init : float
        Initial ``b`` in (−1, 1): the peak step size at horizon ``T`` starts as ``lr·(T/T_0)^{-b}``.
    weight_decay_init : float
        Where the learned weight decay ``λ = e^{w}`` starts (> 0; with ``weight_decay=True``). Rule files
        written before the option load with 1e-4, the start they had (the learned ``w`` is in the file).
    width_init : float
        Initial width exponent ``p`` in (−1, 1) (0: every layer's step is the same; 0.5 halves the step of a
        layer with 4× the fan-in). Rule files written before the option load with 0, the start they had
        (the learned ``p`` is in the file).
    width_wide_only : bool
        Apply the width factor only to fan-ins above 64 (below, the factor is 1). Rule files written before
        the option load with False, what they computed.
    """

    name = "scheduled"

    def __init__(self, signal_dim: int = 1, hidden: int = 4, lr: float = 1e-2, correction: float = 0.5,
                 floor: float = 0.1, horizon_ref: int = 100, weight_decay: bool = False,
                 horizon_exponent: bool = False, horizon_init: float = 0.0,
                 weight_decay_init: float = 1e-4, width_init: float = 0.0, width_wide_only: bool = False) -> None:
        super().__init__()
        if not 0 < floor < 1:
            raise ValueError(f"floor must be in (0, 1), got {floor}")
        if not (lr > 0 and math.isfinite(lr)) or not (correction >= 0 and math.isfinite(correction)):
            raise ValueError(f"lr must be > 0 and correction >= 0 (finite), got lr={lr}, correction={correction}")
        if not -1 < horizon_init < 1:
            raise ValueError(f"horizon_init must be in (-1, 1), got {horizon_init}")
        if not -1 < width_init < 1:
            raise ValueError(f"width_init must be in (-1, 1), got {width_init}")
        if not (weight_decay_init > 0 and math.isfinite(weight_decay_init)):
            raise ValueError(f"weight_decay_init must be > 0 (finite), got {weight_decay_init}")
        if horizon_ref < 1 or signal_dim < 1 or hidden < 1:
            raise ValueError("horizon_ref, signal_dim and hidden must be >= 1")
        self.signal_dim = int(signal_dim)
        self.hidden = int(hidden)
        self.lr = float(lr)
        self.correction = float(correction)
        self.floor = float(floor)
        self.horizon_ref = int(horizon_ref)
        self.weight_decay = bool(weight_decay)
        self.horizon_exponent_learned = bool(horizon_exponent)
        self.horizon_init = float(horizon_init)
        self.weight_decay_init = float(weight_decay_init)
        self.width_init = float(width_init)
        self.width_wide_only = bool(width_wide_only)
        self.log_lr_scale = nn.Parameter(torch.tensor(0.0))  # a
        raw = torch.tensor(math.atanh(self.horizon_init))  # b = tanh(raw)
        if self.horizon_exponent_learned:
            self.horizon_raw = nn.Parameter(raw)
        else:
            self.register_buffer("horizon_raw", raw)
        self.width_raw = nn.Parameter(torch.tensor(math.atanh(self.width_init)))  # p = tanh(raw)
        self.floor_logit = nn.Parameter(torch.tensor(math.log(floor / (1 - floor))))  # f = σ(logit)
        if self.weight_decay:
            self.log_wd = nn.Parameter(torch.tensor(math.log(self.weight_decay_init)))
        # first-layer columns: g·r, m_.9·r, m_.99·r (+ extra signal channels), τ, cos πτ
        self.net = mlp(self.signal_dim + len(_DECAYS) + 2, hidden, 1)

    def config(self) -> dict[str, Any]:
        return {"signal_dim": self.signal_dim, "hidden": self.hidden, "lr": self.lr, "correction": self.correction,
                "floor": self.floor, "horizon_ref": self.horizon_ref, "weight_decay": self.weight_decay,
                "horizon_exponent": self.horizon_exponent_learned, "horizon_init": self.horizon_init,
                "weight_decay_init": self.weight_decay_init, "width_init": self.width_init,
                "width_wide_only": self.width_wide_only}

    def init_state(self, theta: Tensor) -> dict[str, Tensor]:
        return {"m": theta.new_zeros(len(_DECAYS), theta.numel()), "v": torch.zeros_like(theta)}

    # ------------------------------------------------------------------ the pieces
    def horizon_exponent(self) -> Tensor:
        return torch.tanh(self.horizon_raw)

    def width_exponent(self) -> Tensor:
        return torch.tanh(self.width_raw)

    def floor_fraction(self) -> Tensor:
        return torch.sigmoid(self.floor_logit)

    def step_size(self, step: int, total_steps: int) -> Tensor:
        """``η(t, T)`` before the per-tensor width factor (a scalar tensor, differentiable)."""
        tau = min(step / total_steps, 1.0)
        scale = torch.exp(self.log_lr_scale - self.horizon_exponent() * math.log(total_steps / self.horizon_ref))
        return self.lr * scale * cosine_schedule(torch.tensor(tau, dtype=scale.dtype, device=scale.device), self.floor_fraction())

    def _width_factors(self, ctx: UpdateContext, sizes: tuple[int, ...], like: Tensor) -> Tensor | None:
        """``(fan_in/64)^{-p}`` per parameter (1 for biases), or None when no fan-in is known."""
        if ctx.fan_in is None:
            return None
        logs = width_logs(ctx.fan_in, self.width_wide_only, like.dtype, like.device)
        per_tensor = torch.exp(-self.width_exponent().to(like.dtype) * logs)
        return torch.repeat_interleave(per_tensor, torch.tensor(sizes, device=like.device), output_size=like.numel())

    def history(self, state: dict[str, Tensor]) -> UpdateHistory:
        return UpdateHistory(second_moment=state["v"])

    def step(self, ctx: UpdateContext) -> tuple[Tensor, dict[str, Tensor]]:
        if ctx.total_steps is None or ctx.total_steps < 1:
            raise ValueError("the 'scheduled' update needs the run's length: pass total_steps "
                             "(e.g. mpbackprop.Trainer(..., total_steps=N))")
        signal = ctx.signal
        if signal.shape[1] < self.signal_dim:  # e.g. exact backprop (1 channel): missing channels are 0
            signal = torch.cat([signal, signal.new_zeros(signal.shape[0], self.signal_dim - signal.shape[1])], 1)
        elif signal.shape[1] > self.signal_dim:
            raise ValueError(f"signal has {signal.shape[1]} channels, this update takes {self.signal_dim}")
        sizes = ctx.sizes or tuple(torch.bincount(ctx.segments, minlength=ctx.num_segments).tolist())
        kernel = kernels.choose("scheduled", (sizes, _DECAYS, _BETA2, self.correction > 0), ctx.total_steps,
                                ctx.theta, signal, self.log_lr_scale)
        if kernel is not None:  # the same step, fused (no autograd): rules/kernels.py
            fused = kernels.run("scheduled", kernel, *self._kernel_inputs(ctx, signal, sizes))
            if fused is not None:
                return fused[0], {"m": fused[1], "v": fused[2]}
        g, theta = signal[:, 0], ctx.theta
        t = ctx.step + 1
        weight = torch.tensor([[1 - beta] for beta in _DECAYS], dtype=g.dtype, device=g.device)
        m = torch.lerp(ctx.state["m"], g, weight)
        v = torch.lerp(ctx.state["v"], g * g, 1 - _BETA2)
        rsqrt = 1 / (torch.sqrt(v * (1 / (1 - _BETA2**t)) + 1e-30) + 1e-8)  # Adam's; +1e-30: finite derivative at 0
        unbiased = [1 / (1 - beta**t) for beta in _DECAYS]
        direction = m[0] * (unbiased[0] * rsqrt)
        if self.correction > 0:
            rows = [g * rsqrt, *(c * rsqrt for c in signal.unbind(1)[1:]), *(mk * rsqrt for mk in m.unbind(0))]
            factors = [1.0] * self.signal_dim + unbiased
            dtype = self.log_lr_scale.dtype
            tau = min(ctx.step / ctx.total_steps, 1.0)
            const = torch.tensor([tau, math.cos(math.pi * tau)], dtype=dtype, device=g.device)
            x = torch.stack(rows).to(dtype)
            scale = torch.tensor(factors, dtype=dtype, device=g.device)
            out = _feature_mlp(self.net, x, const, sizes=sizes, row_scale=scale)
            out = out - _feature_mlp(self.net, -x, const, sizes=sizes, row_scale=scale)  # odd in x: no drift
            direction = direction + self.correction * _tanh(0.5 * out[0].to(g.dtype))
        eta = self.step_size(ctx.step, ctx.total_steps).to(g.dtype)
        width = self._width_factors(ctx, sizes, g)
        delta = eta * (direction if width is None else width * direction)
        if self.weight_decay:
            decay = torch.exp(self.log_wd).to(g.dtype) * eta
            if ctx.fan_in is not None:  # weights only
                is_weight = torch.tensor([f > 0 for f in ctx.fan_in], dtype=g.dtype, device=g.device)
                decay = decay * torch.repeat_interleave(is_weight, torch.tensor(sizes, device=g.device),
                                                        output_size=g.numel())
            delta = delta + decay * theta
        return theta - delta, {"m": m, "v": v}

    def _kernel_inputs(self, ctx: UpdateContext, signal: Tensor, sizes: tuple[int, ...]) -> tuple[Tensor, ...]:
        """The arguments of :func:`~mpbackprop.rules.kernels.scheduled_step` for this step: the
        per-step constants of :meth:`step` (bias corrections, the MLP's first-layer bias with the
        progress inputs folded in, step size × width factor and weight decay per tensor)."""
        t = ctx.step + 1
        dtype = signal.dtype
        scalars = torch.tensor([1 / (1 - _BETA2**t), self.correction, *(1 / (1 - beta**t) for beta in _DECAYS)],
                               dtype=dtype, device=signal.device)
        first, last = self.net[0], self.net[-1]
        n_feat = self.signal_dim + len(_DECAYS)
        tau = min(ctx.step / ctx.total_steps, 1.0)  # type: ignore[operator]
        b1 = first.bias + first.weight[:, n_feat:] @ torch.tensor([tau, math.cos(math.pi * tau)], dtype=dtype,
                                                                    device=signal.device)
        eta = self.step_size(ctx.step, ctx.total_steps)  # type: ignore[arg-type]
        if ctx.fan_in is None:
            rate = eta.expand(len(sizes))
            decay = (torch.exp(self.log_wd) * eta).expand(len(sizes)) if self.weight_decay else torch.zeros_like(rate)
        else:
            logs = width_logs(ctx.fan_in, self.width_wide_only, dtype, signal.device)
            rate = eta * torch.exp(-self.width_exponent() * logs)
            is_weight = torch.tensor([f > 0 for f in ctx.fan_in], dtype=dtype, device=signal.device)
            decay = torch.exp(self.log_wd) * eta * is_weight if self.weight_decay else torch.zeros_like(rate)
        return (signal, ctx.theta, ctx.state["m"], ctx.state["v"], scalars, first.weight[:, :n_feat], b1,
                last.weight[0], torch.stack([rate, decay], 1))

    def __repr__(self) -> str:
        return (f"ScheduledUpdate(signal_dim={self.signal_dim}, hidden={self.hidden}, lr={self.lr:g}, "
                f"correction={self.correction:g}, weight_decay={self.weight_decay})")
