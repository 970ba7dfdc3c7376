"""Check a compiled network against autograd: the user's proof that it compiled faithfully.

For ``rule="exact"`` the reference is ``torch.autograd.grad`` of the module's loss. For
``rule="fa"`` it is autograd through the same network run with the *straight-through*
feedback trick ``z = f(x.detach(); W) + f(x; B) − f(x; B).detach()`` — forward value with
``W``, error flowing back through ``B`` — an oracle independent of the message-passing engine.

Frozen parameters (``requires_grad=False``) are checked too — the engine computes their signal
like any other's, training only leaves them unchanged — and counted per layer (``frozen``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ..engine.backward import signals
from ..kinds import compiled_modes
from ..engine.losses import resolve_loss
from ..graph.network import CompiledNetwork, compile
from ..rules import Exact, FeedbackAlignment

__all__ = ["verify", "TOLERANCES", "VerifyReport", "RULES", "DTYPES"]

#: (max abs error, max relative error) accepted per dtype.
TOLERANCES = {torch.float64: (1e-10, 1e-8), torch.float32: (1e-4, 1e-4)}
#: The rules :func:`verify` has a reference for, and the dtypes it checks in (by name).
RULES = ("exact", "fa")
DTYPES = tuple(str(dtype).replace("torch.", "") for dtype in TOLERANCES)


@dataclass
class VerifyReport:
    ok: bool
    max_abs_err: float
    max_rel_err: float
    layers: list[dict[str, Any]]
    rule: str
    dtype: str
    batch: int
    loss: str
    frozen_params: int = 0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _fa_reference(net: CompiledNetwork, theta: Tensor, feedback: dict[str, Tensor], x: Tensor) -> Tensor:
    theta_b = torch.zeros_like(theta)
    for layer in net.layers:
        if layer.weight is not None:
            theta_b[layer.weight.offset:layer.weight.stop] = feedback[f"B{layer.index}"]
    batch = x.shape[0]
    acts = [x.reshape(batch, -1)]
    for layer in net.layers[1:]:
        ins = [acts[k].reshape(batch, *s) for k, s in zip(layer.inputs, layer.input_shapes)]
        if layer.weighted:
            fwd = net._apply(layer, [ins[0].detach()], theta)
            fb = net._apply(layer, ins, theta_b)
            z = fwd + fb - fb.detach()
        else:
            z = net._apply(layer, ins, theta)
        z = z.reshape(batch, -1)
        acts.append(layer.activation(z))
    return acts[net.output_layer].reshape(batch, *net.output_shape)


def verify(model: nn.Module, input_shape: tuple[int, ...], batch: int = 8, rule: str = "exact",
           dtype: torch.dtype = torch.float64, seed: int = 0, loss: str | None = None) -> VerifyReport:
    """Run the engine and the reference on one random batch; compare per-parameter signals per layer."""
    torch.manual_seed(seed)
    model = copy.deepcopy(model).to(dtype)
    net = compile(model, tuple(input_shape))
    for p in model.parameters():  # the copy's frozen parameters get a reference gradient as well
        p.requires_grad_(True)
    x = torch.randn(batch, *input_shape, dtype=dtype)
    n_out = net.layers[net.output_layer].size
    if loss is None:
        loss = "cross_entropy" if n_out > 1 else "mse"
    if loss == "cross_entropy":
        y = torch.randint(0, n_out, (batch,))
    else:
        y = torch.randn(batch, *net.output_shape, dtype=dtype)
    loss_fn = resolve_loss(loss)
    theta = net.values.clone()
    if rule == "exact":
        backward_rule = Exact()
        state = backward_rule.init_state(net)
        params = [model.get_parameter(p.path) for p in net.tensors]
        with compiled_modes(model):  # BatchNorm with batch statistics, as compiled
            grads = torch.autograd.grad(loss_fn(model(x), y), params)
        ref = torch.cat([g.reshape(-1) for g in grads])
    elif rule == "fa":
        backward_rule = FeedbackAlignment(seed=seed)
        state = backward_rule.init_state(net)
        th = theta.clone().requires_grad_(True)
        (ref,) = torch.autograd.grad(loss_fn(_fa_reference(net, th, state, x), y), th)
    else:
        raise ValueError(f"verify checks rules {' and '.join(map(repr, RULES))}, not {rule!r}")
    sig, _ = signals(net, x, y, backward_rule, loss_fn, theta, state)
    got = sig[:, 0]
    tol_abs, tol_rel = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    rows = []
    ok = True
    for layer in net.layers:
        if not layer.params:
            continue
        sl = slice(layer.params[0].offset, layer.params[-1].stop)
        diff = (got[sl] - ref[sl]).abs()
        abs_err = float(diff.max())
        rel_err = abs_err / max(float(ref[sl].abs().max()), 1e-30)
        good = abs_err <= tol_abs if dtype == torch.float64 else rel_err <= tol_rel
        ok &= good
        rows.append({"layer": layer.index, "name": layer.name, "kind": layer.kind, "params": layer.num_params,
                     "frozen": sum(p.numel for p in layer.params if p.frozen),
                     "max_abs_err": abs_err, "max_rel_err": rel_err, "ok": good})
    return VerifyReport(ok, max((r["max_abs_err"] for r in rows), default=0.0),
                        max((r["max_rel_err"] for r in rows), default=0.0), rows, rule,
                        str(dtype).replace("torch.", ""), batch, loss, net.num_frozen)
