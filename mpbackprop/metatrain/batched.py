"""Copies of one inner run that differ only in their meta-parameters, advanced together.

The antithetic ES/PES estimators run every task slot as ``2 × es_pairs`` copies: the same task, the same
step, the same batch stream, each under its own perturbed meta-parameters ``φ ± ε_j``. One after another
(:func:`~mpbackprop.metatrain.inner.unroll` under :func:`perturbed`)
each inner step of each copy is a few hundred small torch calls on a network of 10²–10⁵ parameters,
so Python and dispatch dominate. Here the ``K`` copies' parameters are stacked ``(K, P)`` and every
inner step runs once for all of them:

* forward, loss and the exact gradient — the network's own dense forward under :func:`torch.func.vmap`,
  its gradient by autograd (the copies are independent, so the gradient of the summed losses is each
  copy's gradient). This is a fast path for the *exact* backward only (a rule that overrides none of
  :class:`~mpbackprop.rules.BackwardRule`'s hooks), whose signal is that gradient;
* the update — :class:`~mpbackprop.rules.ScheduledUpdate`'s step with a leading copy axis and per-copy
  meta-parameters (its correction MLP as batched matrix products);
* the validation loss of every copy — one vmapped forward.

:func:`unroll_copies` is the sequential code run on each copy (the reference, and what runs when
:func:`supported` says no); :func:`supported` is the one place that chooses. Results equal the
sequential ones up to float rounding (float32: ~1e-7 relative per step; ``tests/test_batched.py``),
not bit for bit.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

from ..engine.losses import LOSSES, resolve_loss
from ..rules import BackwardRule, ScheduledUpdate, UpdateRule
from ..rules.learned import _EPS, _tanh
from ..rules.scheduled import _BETA2, _DECAYS, cosine_schedule, width_logs
from .inner import InnerState, UnrollResult, get_task, step_weight, unroll

__all__ = ["supported", "unroll_copies", "set_enabled", "perturbed", "scheduled_step"]

#: Layer kinds whose forward is plain dense torch (vmappable).
_KINDS = frozenset({"input", "linear", "conv2d", "avgpool2d", "add", "scale", "act"})
_HOOKS = ("seed", "coefficients", "message", "reduce", "node", "init_state")
_enabled: bool | None = None


def set_enabled(on: bool | None) -> None:
    """Force the batched path on/off for this process (``None``: ``MPBACKPROP_BATCHED``, default on)."""
    global _enabled
    _enabled = on


def _is_enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return os.environ.get("MPBACKPROP_BATCHED", "1").strip().lower() not in ("0", "off", "false", "no")


def _is_exact(rule: BackwardRule) -> bool:
    return rule.state_dim == 1 and all(getattr(type(rule), h) is getattr(BackwardRule, h) for h in _HOOKS)


def supported(rule: BackwardRule, update: UpdateRule, states: list[InnerState]) -> bool:
    """Whether :func:`unroll_copies` batches ``states`` (else it runs them one after another): the exact
    backward, the scheduled update, two or more copies of one task at one step with one batch stream, a
    network of dense layer kinds without frozen parameters, a built-in loss, float32/float64."""
    if not _is_enabled() or len(states) < 2 or torch.is_grad_enabled():
        return False
    if not _is_exact(rule) or type(update) is not ScheduledUpdate or update.signal_dim != 1:
        return False
    first = states[0]
    gen = first.gen.get_state()
    if any(s.spec != first.spec or s.step != first.step or s.horizon != first.horizon
           or s.theta.dtype != first.theta.dtype or not torch.equal(s.gen.get_state(), gen) for s in states[1:]):
        return False
    if first.theta.dtype not in (torch.float32, torch.float64):
        return False
    task = get_task(first.spec)
    net = task.net
    if net.frozen_mask is not None or any(layer.kind not in _KINDS for layer in net.layers):
        return False
    return isinstance(task.loss, str) and task.loss in LOSSES


def unroll_copies(rule: BackwardRule, update: UpdateRule, params: list[torch.nn.Parameter], states: list[InnerState],
                  deltas: list[Tensor], steps: int, objective: str, final_weight: float, val_examples: int,
                  diverge_factor: float) -> list[UnrollResult]:
    """``unroll`` of each ``states[k]`` (in place) with the flat meta-parameters ``params`` moved by
    ``deltas[k]``, without gradients; batched when :func:`supported`, else one after another."""
    if supported(rule, update, states):
        return _batched(rule, update, params, states, deltas, steps, objective, final_weight, val_examples,
                        diverge_factor)
    out = []
    for state, delta in zip(states, deltas):
        with perturbed(params, delta), torch.no_grad():
            out.append(unroll(rule, update, state, steps, objective, final_weight, val_examples, diverge_factor,
                              False))
    return out


@contextmanager
def perturbed(params: list[torch.nn.Parameter], eps: Tensor) -> Iterator[None]:
    """Temporarily set the flat meta-parameters to ``φ + eps`` (restored exactly afterwards)."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        k = 0
        for p in params:
            n = p.numel()
            p.add_(eps[k:k + n].view_as(p).to(p.dtype))
            k += n
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


# --------------------------------------------------------------------------- the batched path


def _copy_params(update: UpdateRule, params: list[torch.nn.Parameter], deltas: list[Tensor]) -> dict[str, Tensor]:
    """``update``'s parameters per copy, ``(K, *shape)``: each ``p + δ_k`` computed as
    :func:`perturbed` does (so bit-identical to it)."""
    offsets, k = {}, 0
    for p in params:
        offsets[id(p)] = k
        k += p.numel()
    out = {}
    for name, p in update.named_parameters():
        start = offsets[id(p)]
        rows = [p.detach() + d[start:start + p.numel()].view_as(p).to(p.dtype) for d in deltas]
        out[name] = torch.stack(rows)
    for name, b in update.named_buffers():
        out[name] = b.detach().expand(len(deltas), *b.shape)
    return out


def scheduled_step(update: ScheduledUpdate, mp: dict[str, Tensor], theta: Tensor, g: Tensor, m: Tensor, v: Tensor,
                   step: int, total_steps: int, sizes: tuple[int, ...],
                   fan_in: tuple[int, ...] | None) -> tuple[Tensor, Tensor, Tensor]:
    """:meth:`ScheduledUpdate.step` for ``K`` copies at once: ``theta``, ``g`` (the gradient, the only
    signal channel), ``v`` are ``(K, P)``, ``m`` ``(K, 2, P)``, ``mp`` the per-copy meta-parameters
    ``(K, *shape)`` by name. The same operations as the eager step with a leading copy axis."""
    t = step + 1
    weight = torch.tensor([[1 - beta] for beta in _DECAYS], dtype=g.dtype)
    m = torch.lerp(m, g.unsqueeze(1), weight)
    v = torch.lerp(v, g * g, 1 - _BETA2)
    rsqrt = 1 / (torch.sqrt(v * (1 / (1 - _BETA2**t)) + 1e-30) + 1e-8)
    unbiased = [1 / (1 - beta**t) for beta in _DECAYS]
    direction = m[:, 0] * (unbiased[0] * rsqrt)
    last = len(update.net) - 1
    w1, b1 = mp["net.0.weight"], mp["net.0.bias"]
    dtype = w1.dtype
    tau = min(step / total_steps, 1.0)
    if update.correction > 0:
        x = torch.stack([g * rsqrt, *(m[:, k] * rsqrt for k in range(len(_DECAYS)))], 1).to(dtype)  # (K, F, P)
        n = x.shape[1]
        scale = torch.tensor([1.0, *unbiased], dtype=dtype)
        const = torch.tensor([tau, math.cos(math.pi * tau)], dtype=dtype)
        w_var = w1[:, :, :n] * scale
        bias = (b1 + w1[:, :, n:] @ const).unsqueeze(2)  # (K, H, 1)
        w2, b2 = mp[f"net.{last}.weight"], mp[f"net.{last}.bias"].unsqueeze(2)  # (K, 1, H), (K, 1, 1)
        scale2 = scale.square()
        pieces, start = [], 0
        for size in sizes:
            xs = x[:, :, start:start + size]
            start += size
            ms = torch.linalg.vector_norm(xs, dim=2).square() / size  # (K, F)
            w = w_var * torch.rsqrt(ms * scale2 + _EPS).unsqueeze(1)
            plus = torch.baddbmm(b2, w2, torch.baddbmm(bias, w, xs).relu_())
            minus = torch.baddbmm(b2, w2, torch.baddbmm(bias, w, -xs).relu_())
            pieces.append(plus - minus)  # odd in x: no drift
        out = torch.cat(pieces, 2)[:, 0]
        direction = direction + update.correction * _tanh(0.5 * out.to(g.dtype))
    rate = torch.exp(mp["log_lr_scale"] - torch.tanh(mp["horizon_raw"]) * math.log(total_steps / update.horizon_ref))
    eta = update.lr * rate * cosine_schedule(torch.tensor(tau, dtype=rate.dtype), torch.sigmoid(mp["floor_logit"]))
    eta = eta.to(g.dtype).unsqueeze(1)  # (K, 1)
    if fan_in is not None:
        logs = width_logs(fan_in, update.width_wide_only, g.dtype)
        per_tensor = torch.exp(-torch.tanh(mp["width_raw"]).to(g.dtype).unsqueeze(1) * logs)  # (K, S)
        width = torch.repeat_interleave(per_tensor, torch.tensor(sizes), dim=1, output_size=g.shape[1])
        delta = eta * (width * direction)
    else:
        delta = eta * direction
    if update.weight_decay:
        decay = torch.exp(mp["log_wd"]).to(g.dtype).unsqueeze(1) * eta
        if fan_in is not None:
            is_weight = torch.tensor([f > 0 for f in fan_in], dtype=g.dtype)
            decay = decay * torch.repeat_interleave(is_weight, torch.tensor(sizes), output_size=g.shape[1])
        delta = delta + decay * theta
    return theta - delta, m, v


def _batched(rule: BackwardRule, update: ScheduledUpdate, params: list[torch.nn.Parameter], states: list[InnerState],
             deltas: list[Tensor], steps: int, objective: str, final_weight: float, val_examples: int,
             diverge_factor: float) -> list[UnrollResult]:
    """The loop of :func:`~mpbackprop.metatrain.inner.unroll` over ``K`` copies at once. A copy that
    diverges keeps the state, step count and batch stream it had when it stopped (as if run alone)."""
    first = states[0]
    task = get_task(first.spec)
    net = task.net
    loss_fn = resolve_loss(task.loss)
    sizes, fan_in = net.tensor_sizes, net.tensor_fan_in
    if update.correction > 0 and len(update.net) != 3:
        raise ValueError("the batched scheduled step expects a correction MLP with one hidden layer")
    mp = _copy_params(update, params, deltas)
    kk = len(states)
    theta = torch.stack([s.theta for s in states])
    m = torch.stack([s.opt_state["m"] for s in states])
    v = torch.stack([s.opt_state["v"] for s in states])
    gen = first.gen
    step, horizon = first.step, first.horizon

    def batch_loss(th: Tensor, x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(net(x, th), y)

    train_loss = torch.func.vmap(batch_loss, in_dims=(0, None, None))

    def val_loss(th: Tensor) -> Tensor:
        return task.evaluate(th, val_examples)[0]

    valid = torch.func.vmap(val_loss)
    total = torch.zeros(kk, dtype=theta.dtype)
    wsum = [0.0] * kk
    last = [math.nan] * kk
    done = [0] * kk
    stopped: dict[int, tuple] = {}  # copy -> (theta, m, v, step, gen state) when it diverged
    for _ in range(steps):
        if step >= horizon or len(stopped) == kk:
            break
        x, y = task.batch(gen)
        with torch.enable_grad():
            th = theta.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(train_loss(th, x, y).sum(), th)
        theta, m, v = scheduled_step(update, mp, theta, grad, m, v, step, horizon, sizes, fan_in)
        w = step_weight(step, horizon, objective, final_weight)
        step += 1
        live = [k for k in range(kk) if k not in stopped]
        for k in live:
            done[k] += 1
        vals = valid(theta)  # check_every = 1: the validation loss after every step
        logs = torch.log(vals)
        for k, val in zip(live, vals[live].tolist()):
            last[k] = val
            if not math.isfinite(val) or val > diverge_factor * max(states[k].initial_loss, 1e-3):
                stopped[k] = (theta[k].clone(), m[k].clone(), v[k].clone(), step, gen.get_state())
        if w:
            keep = [k for k in live if k not in stopped]
            total[keep] = total[keep] + w * logs[keep]
            for k in keep:
                wsum[k] += w
    final = gen.get_state()
    results = []
    for k, s in enumerate(states):
        if k in stopped:
            s.theta, mk, vk, s.step, gstate = stopped[k]
            s.opt_state = {"m": mk, "v": vk}
            s.gen.set_state(gstate)
        else:
            s.theta, s.opt_state, s.step = theta[k].clone(), {"m": m[k].clone(), "v": v[k].clone()}, step
            s.gen.set_state(final)
        results.append(UnrollResult(total[k], wsum[k], k in stopped, last[k], done[k]))
    return results
