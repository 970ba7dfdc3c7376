"""Fused kernels for the per-parameter work of the learned update rules, and the one place that
chooses between them and the rules' plain (eager) code.

A learned update reads and writes every parameter several times per step: moments, per-tensor
normalisation, a small MLP per parameter, the step. Written as eager torch ops each of these is a
full pass over memory plus Python dispatch; :func:`torch.compile` (inductor: one C++ loop nest on
CPU, one Triton kernel on CUDA) fuses them into about two passes — one to reduce the per-tensor
statistics, one to compute the step — as ``torch.optim``'s ``foreach``/``fused`` Adam do for Adam.

* :func:`scheduled_step` — :class:`~mpbackprop.rules.ScheduledUpdate`'s step over the flat
  parameter vector, written per parameter tensor with static slices (so one compilation serves one
  network's flat layout, never one per tensor shape). It is plain torch: run eagerly it is the
  reference of the compiled kernel; ``ScheduledUpdate.step``'s own code is the reference of both
  (``tests/test_kernels.py``: float32 within 1e-6 relative).
* :func:`choose` — the only place that decides whether a step runs fused. Fused needs: no
  autograd (meta-gradients go through the rule's own differentiable code), the mode
  (:func:`set_mode`, or the environment variable ``MPBACKPROP_FUSED``: ``auto``, ``on``, ``off``),
  a working ``torch.compile`` (on CPU a C++ compiler), and in ``auto`` a run long enough to pay
  for the compilation — ``total_steps × estimated saving per step ≥`` :data:`COMPILE_COST_S`,
  decided from the run's stated length and parameter count alone, so that the same run always takes
  the same path (a short run, e.g. a meta-training task, stays eager). Compiled kernels are cached
  per layout for the life of the process (inductor also caches generated code on disk).
* :func:`run` — calls what :func:`choose` returned; :func:`compile_log` reports each compilation's
  seconds. A compilation that fails turns fused kernels off for the process with one warning, and
  ``run`` returns ``None``: the rule falls back to its eager code.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from typing import Callable

import torch
from torch import Tensor

__all__ = ["MODES", "set_mode", "get_mode", "available", "choose", "run", "compile_log", "scheduled_step",
           "COMPILE_COST_S"]

MODES = ("auto", "on", "off")
#: Assumed seconds to compile one layout (measured 6–16 s on 2 loaded cores, torch 2.2.1).
COMPILE_COST_S = 15.0
#: Estimated eager-minus-fused time per step: a fixed part (dispatch of ~60 small ops) and a part
#: per parameter (~8 full passes saved; measured ~24 ms on 669,706 parameters, one thread).
_SAVED_FIXED_S, _SAVED_PER_PARAM_S = 5e-4, 3.5e-8
#: Largest hidden width the scheduled kernel unrolls (wider MLPs keep the eager code).
MAX_HIDDEN = 16

_mode: str | None = None
_broken: str | None = None  # why compiling failed in this process
_cache: dict[tuple, Callable[..., tuple[Tensor, ...]]] = {}
_log: list[dict[str, object]] = []


def set_mode(mode: str | None) -> None:
    """``auto`` (default): fuse when the run pays for it; ``on``: whenever possible; ``off``: never;
    ``None``: back to the environment's ``MPBACKPROP_FUSED``."""
    global _mode
    if mode is not None and mode not in MODES:
        raise ValueError(f"fused mode must be one of {', '.join(MODES)}, got {mode!r}")
    _mode = mode


def get_mode() -> str:
    """The mode in force: :func:`set_mode`'s, else ``MPBACKPROP_FUSED``'s (``auto`` if unset or unknown)."""
    if _mode is not None:
        return _mode
    env = os.environ.get("MPBACKPROP_FUSED", "auto").strip().lower()
    return env if env in MODES else "auto"


def available(device: torch.device | str = "cpu") -> bool:
    """Whether fused kernels can be compiled here (on CPU: a C++ compiler on the PATH)."""
    if _broken is not None or not hasattr(torch, "compile"):
        return False
    if torch.device(device).type == "cpu":
        import torch._inductor.config as inductor

        cxx = inductor.cpp.cxx[-1] if isinstance(inductor.cpp.cxx, tuple) else inductor.cpp.cxx
        return bool(cxx and shutil.which(cxx))
    return torch.device(device).type == "cuda"


def compile_log() -> list[dict[str, object]]:
    """One entry per compilation in this process: kernel name, parameter count, tensors, seconds."""
    return [dict(e) for e in _log]


def _pays(num_params: int, total_steps: int | None) -> bool:
    if total_steps is None:
        return False
    return total_steps * (_SAVED_FIXED_S + _SAVED_PER_PARAM_S * num_params) >= COMPILE_COST_S


def choose(name: str, key: tuple, total_steps: int | None, *tensors: Tensor) -> Callable[..., tuple[Tensor, ...]] | None:
    """The compiled kernel ``name`` for ``key`` (what it is specialised on: the layout, sizes of the
    rule), or ``None`` when the caller should run its eager code. ``tensors`` (the parameters first)
    must agree in dtype (float32 or float64) and device. See the module docstring for the rule."""
    like = tensors[0]
    if torch.is_grad_enabled() or like.dtype not in (torch.float32, torch.float64) or like.numel() == 0:
        return None
    if any(t.dtype != like.dtype or t.device != like.device for t in tensors[1:]):
        return None
    mode = get_mode()
    if mode == "off" or (mode == "auto" and not _pays(like.numel(), total_steps)):
        return None
    full_key = (name, key, like.dtype, like.device.type)
    compiled = _cache.get(full_key)
    if compiled is None:
        if not available(like.device):
            return None
        # no "pointwise" cat: each tensor's piece is then written straight into the flat result
        compiled = _cache[full_key] = torch.compile(_FACTORIES[name](*key), dynamic=False,
                                                    options={"max_pointwise_cat_inputs": 0})
        _ensure_cache_room()
    return compiled


def _ensure_cache_room() -> None:
    """One code object serves every layout (dynamo guards on the captured layout): room for them all."""
    import torch._dynamo.config as dynamo

    dynamo.cache_size_limit = max(dynamo.cache_size_limit, 2 * len(_cache) + 8)


def run(name: str, compiled: Callable[..., tuple[Tensor, ...]], *args: Tensor) -> tuple[Tensor, ...] | None:
    """Call a kernel from :func:`choose`; the first call of a layout compiles it (logged). ``None`` if
    compiling failed — fused kernels are then off for this process and the caller runs its eager code."""
    global _broken
    first = getattr(compiled, "_mp_ran", False) is False
    start = time.perf_counter()
    try:
        out = compiled(*args)
    except Exception as exc:  # inductor / compiler failure: keep going on the eager code
        _broken = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        _cache.clear()
        warnings.warn(f"fused kernels are off for this process: compiling {name} failed ({_broken})",
                      RuntimeWarning, stacklevel=3)
        return None
    if first:
        compiled._mp_ran = True  # type: ignore[attr-defined]
        _log.append({"kernel": name, "params": args[0].shape[0], "seconds": round(time.perf_counter() - start, 3)})
    return out


# --------------------------------------------------------------------------- ScheduledUpdate


def scheduled_step(signal: Tensor, theta: Tensor, m: Tensor, v: Tensor, scalars: Tensor, w1: Tensor,
                   b1: Tensor, w2: Tensor, per_tensor: Tensor, *, sizes: tuple[int, ...], decays: tuple[float, ...],
                   beta2: float, correction: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One :class:`~mpbackprop.rules.ScheduledUpdate` step without autograd, per parameter tensor.

    Parameters
    ----------
    signal : Tensor
        ``(P, d)`` per-parameter signal (channel 0: the gradient).
    theta, v : Tensor
        ``(P,)`` parameters and second moment; ``m`` ``(K, P)`` the momenta at ``decays``.
    scalars : Tensor
        ``(2 + K,)``: ``1/(1 − β₂^t)``, the correction bound ``c``, then ``1/(1 − β_k^t)`` per momentum.
    w1, b1, w2 : Tensor
        The correction MLP: first-layer weights on the features ``(H, d + K)``, its bias with the
        constant inputs folded in ``(H,)``, last-layer weights ``(H,)`` (its bias cancels in the
        odd part).
    per_tensor : Tensor
        ``(S, 2)``: per tensor, the step size times the width factor, and the decoupled weight decay.
    sizes : tuple of int
        Parameters per tensor (consecutive runs of ``theta``): the layout this kernel is compiled for.
    correction : bool
        Whether the learned correction is on (``c > 0``).

    Returns ``(new_theta, new_m, new_v)``; the inputs are not modified.
    """
    d, k = signal.shape[1], len(decays)
    g = signal[:, 0]
    m_all = m + (g - m) * m.new_tensor([[1 - beta] for beta in decays])  # one pass writes every momentum
    m_new = list(m_all.unbind(0))
    v_new = v + (g * g - v) * (1 - beta2)
    rsqrt = 1 / (torch.sqrt(v_new * scalars[0] + 1e-30) + 1e-8)
    feats = [g * rsqrt] + [signal[:, c] * rsqrt for c in range(1, d)] + [mk * rsqrt for mk in m_new]
    row_scale = [None] * d + [scalars[2 + i] for i in range(k)]
    pieces = []
    start = 0
    for s, n in enumerate(sizes):
        sl = slice(start, start + n)
        start += n
        direction = m_new[0][sl] * (scalars[2] * rsqrt[sl])
        if correction:
            xs = [f[sl] for f in feats]
            # per-tensor RMS normalisation of each (scaled) feature, folded into the first layer
            cols = []
            for f, (x, scale) in enumerate(zip(xs, row_scale)):
                ms = (x * x).sum() / n
                col = w1[:, f] * torch.rsqrt(ms + 1e-12) if scale is None else \
                    w1[:, f] * scale * torch.rsqrt(ms * (scale * scale) + 1e-12)
                cols.append(col)
            out = None
            for j in range(w1.shape[0]):
                a = cols[0][j] * xs[0]
                for f in range(1, len(xs)):
                    a = a + cols[f][j] * xs[f]
                h = torch.relu(a + b1[j]) - torch.relu(b1[j] - a)  # MLP(x) − MLP(−x), hidden unit j
                out = h * w2[j] if out is None else out + h * w2[j]
            direction = direction + scalars[1] * (torch.sigmoid(out) * 2 - 1)  # c·tanh(out/2)
        pieces.append(theta[sl] - (per_tensor[s, 0] * direction + per_tensor[s, 1] * theta[sl]))
    return torch.cat(pieces), m_all, v_new


def _scheduled_factory(sizes: tuple[int, ...], decays: tuple[float, ...], beta2: float,
                       correction: bool) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    def kernel(*args: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return scheduled_step(*args, sizes=sizes, decays=decays, beta2=beta2, correction=correction)
    return kernel


#: Kernel name -> factory of the function to compile, from the key given to :func:`choose`.
_FACTORIES: dict[str, Callable[..., Callable[..., tuple[Tensor, ...]]]] = {"scheduled": _scheduled_factory}
