"""Where a run's tensors live: resolving and checking ``device=`` / ``--device``.

The dense fast paths (:meth:`~mpbackprop.kinds.Kind.dense`, the forward pass, the update rules) are torch
ops and run on CUDA; the DGL reference path (:meth:`~mpbackprop.kinds.Kind.reference`: gspmm, the rules'
message UDFs) stays on the CPU, since the DGL build on PyPI has no CUDA. :func:`resolve` turns a device
name into a ``torch.device`` (refusing unknown names and CUDA where there is none), and
:func:`check_kernels` refuses, before any tensor moves, a network and backward rule whose step would
take the reference path on a device other than the CPU. The default is ``"cpu"`` everywhere, which
moves nothing: results on it are those of runs made before the option existed, bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import MPBackpropError

__all__ = ["DEVICES", "DeviceError", "resolve", "check_kernels", "place", "reference_blocks", "synchronize"]

#: Device names ``--device`` accepts (``cuda`` is the current CUDA device; the library also takes
#: ``"cuda:N"`` and ``torch.device`` objects).
DEVICES: tuple[str, ...] = ("cpu", "cuda")


class DeviceError(MPBackpropError):
    """A device that is unknown, not available here, or that the run's backward path cannot use."""


def resolve(device: str | torch.device | None = "cpu") -> torch.device:
    """``device`` as a ``torch.device`` (``None``: the CPU).

    Raises :class:`DeviceError` with one line for an unknown name and for CUDA on a machine without it.
    """
    if device is None:
        return torch.device("cpu")
    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(str(device).strip())
        except (RuntimeError, ValueError):
            dev = None
        if dev is None or dev.type not in DEVICES:
            raise DeviceError(f"unknown device {device!r}; allowed: {', '.join(DEVICES)} (or cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("CUDA is not available on this machine (torch.cuda.is_available() is False); "
                              "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"no CUDA device {dev.index} on this machine ({torch.cuda.device_count()} found); "
                              "use --device cuda or cpu")
    return dev


def reference_blocks(net: Any, rule: Any, fused: bool = True, theta: torch.Tensor | None = None,
                     rule_state: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Names of the blocks of ``net`` whose backward would take the DGL reference path with ``rule``.

    Asks :func:`~mpbackprop.kinds.select_kernel` — the engine's one kernel choice — with the inputs the
    engine would give it (the rule's state channels and message coefficients of ``theta``, default the
    network's stored values), computed on the CPU; no batch is run.
    """
    from .engine import layer_context  # the engine sits above this module's callers' imports
    from .kinds import BlockInput, Coefficients, select_kernel
    from .kinds import get as kind_of

    theta = net.values if theta is None else theta
    found = []
    with torch.no_grad():
        state = rule.init_state(net) if rule_state is None else rule_state
        for k in range(1, len(net.layers)):
            layer, view = net.layers[k], net.views[k]
            if view is None:
                continue
            needs_messages = any(s != 0 for s in view.sources)
            if not layer.weighted and not needs_messages:
                continue  # never run (as in the engine)
            b = torch.empty(layer.size, rule.state_dim, 1, device="meta")  # only its shape is read
            inp = BlockInput(layer, view, b, b, b, 1, needs_messages)
            if layer.weighted and needs_messages:
                inp.coef = Coefficients.of(rule.coefficients(layer_context(net, k, theta, state)))
            kind = kind_of(layer.kind)
            if select_kernel(kind, inp, fused) == kind.reference:
                found.append(f"{layer.name} ({layer.kind})")
    return found


def check_kernels(net: Any, rule: Any, device: torch.device, fused: bool = True,
                  theta: torch.Tensor | None = None, rule_state: dict[str, torch.Tensor] | None = None) -> None:
    """Refuse (:class:`DeviceError`, one line) a run of ``net`` with backward ``rule`` on ``device`` when a
    block's step needs the DGL reference path and ``device`` is not the CPU. Nothing to check on the CPU."""
    if torch.device(device).type == "cpu":
        return
    blocks = reference_blocks(net, rule, fused, theta, rule_state)
    if not blocks:
        return
    why = "fused=False" if not fused else f"rule {getattr(rule, 'name', type(rule).__name__)!r}"
    shown = ", ".join(blocks[:3]) + (f" and {len(blocks) - 3} more" if len(blocks) > 3 else "")
    raise DeviceError(f"block {shown} needs the DGL reference path with {why}, which runs on the CPU only "
                      f"(the PyPI DGL build has no CUDA); use --device cpu, or a rule and layers with a dense "
                      f"path on {torch.device(device).type}")


def place(net: Any, theta: torch.Tensor, rule: Any, update: Any, device: torch.device,
          fused: bool = True) -> tuple[torch.Tensor, Any, Any]:
    """A run's parameters and rules on ``device``: :func:`check_kernels` first (nothing moves when it
    refuses), then ``theta``, the backward ``rule`` and the ``update`` moved there. On the CPU they are
    returned as given (no copy)."""
    check_kernels(net, rule, device, fused, theta=theta)
    if torch.device(device).type == "cpu":
        return theta, rule, update
    return theta.to(device), rule.to(device), update.to(device)


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA runs asynchronously: a step's time is measured after it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
