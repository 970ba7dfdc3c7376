"""The learned rule (method.md §3): a learned backward pass and a learned update.

:class:`LearnedBackward` — backward state of ``d`` channels;

* message ``m_k = C(s_p)·b_j`` with ``C(s_p) = (α·w_p + β·B_p)·I + ρ_L·MLP_C(s_p)`` a
  ``d×d`` matrix per weight, computed once per step from per-weight features ``s_p``
  (normalised weight, normalised random feedback weight, depth, fan-in, gradient
  history); the per-sample part stays a sparse-dense product (DGL ``u_mul_e`` + ``sum``);
* node ``b_i = f'(z_i)·M_i + r·MLP_N(M_i/r, tanh z_i, tanh a_i, f'(z_i), depth)`` with
  ``r`` the block's RMS of ``M`` (scale-free);
* both MLPs end in a zero-initialised layer, so with ``init="backprop"`` (α=1, β=0) the
  rule *is* exact backprop at the start, and with ``init="feedback"`` (α=0, β=1) it starts
  as feedback alignment ("from scratch").

:class:`LearnedUpdate` — a per-parameter MLP in the style of learned optimizers
(Metz et al., 2020, *Tasks, stability, architecture, and compute*): inputs are the
signal channels, momenta at decays 0.5/0.9/0.99/0.999, the signal and momenta over the
root of the second moment and the weight, each normalised per tensor, plus step-count
features; output ``direction·exp(λ·magnitude)`` times a base step size, soft-bounded by
``tanh``. With ``init="adam"`` an Adam term with a learnable learning-rate scale is added
(the MLP starting at zero, the rule starts *as* Adam with learning rate ``lr``); ``init="scratch"`` has no Adam term.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .base import BackwardRule, LayerContext, NodeContext, UpdateContext, UpdateRule
from .fa import feedback_weights

__all__ = ["LearnedBackward", "LearnedUpdate", "mlp"]

_EPS = 1e-12


def mlp(n_in: int, hidden: int, n_out: int, layers: int = 1, zero_last: bool = True) -> nn.Sequential:
    """``n_in → hidden (×layers, ReLU) → n_out``; the last layer starts at zero if asked."""
    mods: list[nn.Module] = []
    width = n_in
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    last = nn.Linear(width, n_out)
    if zero_last:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    mods.append(last)
    return nn.Sequential(*mods)


def _apply(seq: nn.Sequential, x: Tensor, const: Tensor | None = None) -> Tensor:
    """Run ``seq`` on inputs ``[x, const]`` (``const`` the same for every row) without
    materialising the constant columns: they fold into the first layer's bias. ReLUs run in place."""
    first = seq[0]
    if const is None:
        h = first(x)
    else:
        n = x.shape[-1]
        h = F.linear(x, first.weight[:, :n], first.bias + first.weight[:, n:] @ const)
    for layer in list(seq)[1:]:
        h = torch.relu_(h) if isinstance(layer, nn.ReLU) else layer(h)
    return h


def _apply_columns(seq: nn.Sequential, x: Tensor, const: Tensor | None = None,
                   columns: tuple[list[int], list[int]] | None = None) -> Tensor:
    """:func:`_apply` in feature-major layout: ``x`` is ``(features, P)`` and so is the result.

    For per-parameter MLPs over hundreds of thousands of parameters this is the fast layout:
    features are built by stacking contiguous rows, every layer is one wide GEMM, and biases are
    added in place instead of being broadcast-copied."""
    layers = list(seq)
    first = layers[0]
    n = x.shape[0]
    var, fixed = columns if columns is not None else (list(range(n)), list(range(n, first.in_features)))
    w_var = first.weight[:, var] if columns is not None else first.weight[:, :n]
    bias = first.bias if const is None else first.bias + first.weight[:, fixed] @ const
    h = (w_var @ x).add_(bias.unsqueeze(1))
    for layer in layers[1:]:
        h = torch.relu_(h) if isinstance(layer, nn.ReLU) else (layer.weight @ h).add_(layer.bias.unsqueeze(1))
    return h


def _rms(x: Tensor) -> Tensor:
    return torch.sqrt(x.pow(2).mean() + _EPS)


def _normalise_per_tensor(x: Tensor, sizes: tuple[int, ...]) -> Tensor:
    """Each row of ``x`` ``(F, P)`` divided by its RMS within each parameter tensor.

    Parameter tensors are consecutive runs of ``sizes`` columns, so this is one pass per tensor
    over a slice (no scatter/gather over all parameters)."""
    parts = [part / torch.sqrt(part.pow(2).mean(1, keepdim=True) + _EPS) for part in x.split(list(sizes), dim=1)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


#: first-layer columns of the coefficient MLP: (per-weight w, B, |g| history), (constant depth, log fan-in)
_COEF_COLUMNS = ([0, 1, 4], [2, 3])


class LearnedBackward(BackwardRule):
    """Learned message-passing backward rule.

    Parameters
    ----------
    state_dim : int
        Channels ``d`` of the backward state (1–8).
    hidden : int
        Width of the coefficient and node MLPs.
    init : {"backprop", "feedback"}
        Start exactly at backprop, or at feedback alignment (learning from scratch).
    seed : int
        Seed of the random feedback weights ``B``.
    """

    name = "learned"

    def __init__(self, state_dim: int = 2, hidden: int = 16, init: str = "backprop", seed: int = 0) -> None:
        super().__init__()
        if init not in ("backprop", "feedback"):
            raise ValueError(f"init must be 'backprop' or 'feedback', got {init!r}")
        if not 1 <= state_dim <= 8:
            raise ValueError(f"state_dim must be in 1..8, got {state_dim}")
        self.state_dim = int(state_dim)
        self.hidden = int(hidden)
        self.init = init
        self.seed_value = int(seed)
        self.alpha = nn.Parameter(torch.tensor(1.0 if init == "backprop" else 0.0))
        self.beta = nn.Parameter(torch.tensor(0.0 if init == "backprop" else 1.0))
        self.coef_mlp = mlp(5, hidden, self.state_dim**2)  # inputs: w, B, depth, log fan-in, |g| history
        self.node_mlp = mlp(self.state_dim + 4, hidden, self.state_dim)

    def config(self) -> dict[str, Any]:
        return {"state_dim": self.state_dim, "hidden": self.hidden, "init": self.init, "seed": self.seed_value}

    def init_state(self, net: Any) -> dict[str, Tensor]:
        return feedback_weights(net, self.seed_value)

    def coefficients(self, ctx: LayerContext) -> Tensor:
        w = ctx.weight
        fb = ctx.rule_state[f"B{ctx.layer.index}"].to(w.dtype)
        rw, rb = _rms(w), _rms(fb)
        hist = ctx.history.get("v")
        h = torch.log(torch.sqrt(hist + 1e-30) + 1e-8) / 10 if hist is not None else torch.zeros_like(w)
        fan_in = w.numel() / max(ctx.layer.weight.shape[0], 1)  # type: ignore[union-attr]
        dtype = self.alpha.dtype
        feats = torch.stack([w / rw, fb / rb, h]).to(dtype)  # (3, P_w) + constants: depth, log fan-in
        const = torch.tensor([ctx.depth, math.log(fan_in) / 5], dtype=dtype)
        d = self.state_dim
        learned = _apply_columns(self.coef_mlp, feats, const, _COEF_COLUMNS).to(w.dtype).t().reshape(-1, d, d) * rw
        base = self.alpha * w + self.beta * fb
        if d == 1:
            return base + learned.view(-1)
        return learned + base.view(-1, 1, 1) * torch.eye(d, dtype=w.dtype)

    def node(self, ctx: NodeContext) -> Tensor:
        M = ctx.M  # (N, d, B)
        r = _rms(M)
        dtype = self.alpha.dtype
        feats = torch.cat(
            [(M / r).permute(0, 2, 1), torch.stack([torch.tanh(ctx.z), torch.tanh(ctx.a), ctx.fprime], -1)], dim=-1
        ).to(dtype)  # (N, B, d+3) + the constant depth
        const = torch.tensor([ctx.depth], dtype=dtype)
        correction = _apply(self.node_mlp, feats, const).to(M.dtype).permute(0, 2, 1) * r
        return ctx.fprime.unsqueeze(1) * M + correction

    def __repr__(self) -> str:
        return f"LearnedBackward(state_dim={self.state_dim}, hidden={self.hidden}, init={self.init!r})"


_DECAYS = (0.5, 0.9, 0.99, 0.999)


class LearnedUpdate(UpdateRule):
    """Learned per-parameter update.

    Parameters
    ----------
    signal_dim : int
        Channels of the per-parameter signal (the backward rule's ``state_dim``).
    hidden : int
        Width of the two hidden layers.
    init : {"adam", "scratch"}
        Add an Adam term (learnable log learning rate) so the rule starts as Adam, or not.
    lr : float
        Adam learning rate at the start (``init="adam"``) and base step of the MLP term.
    max_step : float
        Soft bound of the MLP term per parameter and step.
    """

    name = "learned"

    def __init__(self, signal_dim: int = 2, hidden: int = 16, init: str = "adam", lr: float = 1e-2,
                 max_step: float = 0.1, exp_mult: float = 0.01) -> None:
        super().__init__()
        if init not in ("adam", "scratch"):
            raise ValueError(f"init must be 'adam' or 'scratch', got {init!r}")
        self.signal_dim = int(signal_dim)
        self.hidden = int(hidden)
        self.init = init
        self.lr = float(lr)
        self.max_step = float(max_step)
        self.exp_mult = float(exp_mult)
        n_in = self.signal_dim + 2 * len(_DECAYS) + 2 + 4
        self.net = mlp(n_in, hidden, 2, layers=2)
        self.log_lr_scale = nn.Parameter(torch.tensor(0.0))  # Adam's lr = lr·exp(scale)
        self.use_adam = init == "adam"

    def config(self) -> dict[str, Any]:
        return {"signal_dim": self.signal_dim, "hidden": self.hidden, "init": self.init, "lr": self.lr,
                "max_step": self.max_step, "exp_mult": self.exp_mult}

    def init_state(self, theta: Tensor) -> dict[str, Tensor]:
        state = {f"m{k}": torch.zeros_like(theta) for k in range(len(_DECAYS))}
        state["v"] = torch.zeros_like(theta)
        return state

    def step(self, ctx: UpdateContext) -> tuple[Tensor, dict[str, Tensor]]:
        signal = ctx.signal
        if signal.shape[1] < self.signal_dim:  # e.g. exact backprop (1 channel) + this update: missing = 0
            signal = torch.cat([signal, signal.new_zeros(signal.shape[0], self.signal_dim - signal.shape[1])], 1)
        elif signal.shape[1] > self.signal_dim:
            raise ValueError(f"signal has {signal.shape[1]} channels, this update takes {self.signal_dim}")
        g = signal[:, 0]
        t = ctx.step + 1
        new: dict[str, Tensor] = {}
        moms = []
        for k, beta in enumerate(_DECAYS):
            m = beta * ctx.state[f"m{k}"] + (1 - beta) * g
            new[f"m{k}"] = m
            moms.append(m / (1 - beta**t))
        v = 0.999 * ctx.state["v"] + (1 - 0.999) * g * g
        new["v"] = v
        v_hat = v / (1 - 0.999**t)
        rsqrt = 1.0 / (torch.sqrt(v_hat + 1e-30) + 1e-8)  # +1e-30: finite derivative at v = 0
        raw = torch.stack([*signal.unbind(1), *moms, g * rsqrt, *(m * rsqrt for m in moms), ctx.theta])  # (F, P)
        sizes = ctx.sizes or tuple(torch.bincount(ctx.segments, minlength=ctx.num_segments).tolist())
        normed = _normalise_per_tensor(raw, sizes)
        dtype = self.log_lr_scale.dtype
        time = torch.tensor([math.tanh(t / c) for c in (1, 10, 100, 1000)], dtype=dtype)
        out = _apply_columns(self.net, normed.to(dtype), time).to(g.dtype)
        direction, magnitude = out[0], out[1]
        learned = self.lr * direction * torch.exp(self.exp_mult * magnitude)
        delta = self.max_step * torch.tanh(learned / self.max_step)
        if self.use_adam:
            delta = delta + self.lr * torch.exp(self.log_lr_scale) * moms[1] * rsqrt  # m at β=0.9: Adam's first moment
        return ctx.theta - delta, new

    def __repr__(self) -> str:
        return f"LearnedUpdate(signal_dim={self.signal_dim}, hidden={self.hidden}, init={self.init!r})"
