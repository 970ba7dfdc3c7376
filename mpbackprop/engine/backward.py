"""The backward pass as message passing on the compiled graph (method.md §2).

One training step with a backward rule ``R`` and an update rule ``U``:

1. forward: dense torch ops per block record ``z``, ``a`` and ``f'(z)``;
2. seed: the output block receives ``M = R.seed(∂ℓ/∂a_out)`` (per sample: ``ℓ`` is the
   per-sample loss, so ``∂ℓ/∂a = B·∂L/∂a`` for the batch-mean loss ``L``);
3. blocks in reverse order: ``b = R.node(M, z, a, f'(z))``; then, on the layer's backward
   block (post→pre, the same edges as its uses), messages ``m_k = C(s_p)·b_j`` are summed
   at the pre-neurons — DGL's fused ``u_mul_e`` + ``sum`` when the rule's message is
   linear (:meth:`~mpbackprop.rules.BackwardRule.coefficients`), its edge/node UDFs
   (``message``/``reduce``) otherwise. Fixed edges (pooling, residual, scaling) carry
   ``coef·b_j``;
4. per-parameter signal ``G_p = mean_batch Σ_{uses k of p} a_i·b_j`` (DGL ``u_dot_v`` on
   the uses, ``copy_e_sum`` onto the weights through the ``in_L`` edges); biases
   ``mean_batch Σ b_j``. For the exact rule ``G[:, 0] = ∂L/∂θ``;
5. update: ``θ, state ← U(θ, G, state, step)``; frozen parameters (``requires_grad=False``
   when compiled, :attr:`~mpbackprop.graph.network.CompiledNetwork.frozen_mask`) keep their values
   and their update state bit for bit, whatever the rules.

Each block's steps 3–4 are its kind's (:mod:`mpbackprop.kinds`): a DGL reference path and, for
kinds that have one, an equal dense fast path (``Linear`` products, convolution and pooling
gradients, ...; tests check each against the reference). :func:`~mpbackprop.kinds.select_kernel` alone
chooses between them (``fused=False`` forces the reference everywhere). Every rule goes through the
same code; nothing here asks which rule it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._quiet import ops
from ..graph.schema import NEURON, PARAM
from ..kinds import BlockInput, Coefficients, select_kernel
from ..kinds import get as kind_of
from .losses import LossFn, resolve_loss
from ..graph.network import CompiledNetwork, ForwardRecord
from ..rules.base import BackwardRule, LayerContext, NodeContext, UpdateContext, UpdateHistory, UpdateRule

__all__ = ["BackwardResult", "StepResult", "forward_and_seed", "backward", "train_step", "signals", "layer_depth",
           "layer_context"]


@dataclass
class BackwardResult:
    """What one backward pass produced.

    Attributes
    ----------
    signal : Tensor
        ``(P, d)`` per-parameter signals (channel 0: gradient-like).
    b : list of Tensor or None
        Per block ``(N, d, B)`` backward state (``None``: input block or unreached).
    messages : list of Tensor or None
        Per block ``(N, d, B)`` reduced incoming messages ``M``.
    """

    signal: Tensor
    b: list[Tensor | None]
    messages: list[Tensor | None]


@dataclass
class StepResult:
    """Result of :func:`train_step` (``backward``: the pass's :class:`BackwardResult` when asked for)."""

    loss: Tensor
    theta: Tensor
    state: dict[str, Tensor]
    signal: Tensor
    extras: dict[str, Any] = field(default_factory=dict)
    backward: BackwardResult | None = None


def layer_depth(net: CompiledNetwork, k: int) -> float:
    """Depth of block ``k`` as the rules see it: ``k / (number of blocks − 1)``, in ``[0, 1]``."""
    return k / max(len(net.layers) - 1, 1)


def layer_context(net: CompiledNetwork, k: int, theta: Tensor, rule_state: dict[str, Tensor],
                  history: UpdateHistory | None = None) -> LayerContext:
    """What :meth:`~mpbackprop.rules.BackwardRule.coefficients` sees for weighted block ``k``: its weights
    in ``theta``, its slice of the update's ``history`` (the state before this step's update)."""
    wt = net.layers[k].weight
    assert wt is not None
    hist = UpdateHistory() if history is None else history.slice(wt.offset, wt.stop)
    return LayerContext(net.layers[k], theta[wt.offset:wt.stop], rule_state, layer_depth(net, k), hist)


def forward_and_seed(
    net: CompiledNetwork, theta: Tensor, x: Tensor, y: Tensor, loss_fn: LossFn, differentiable: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[ForwardRecord, Tensor, Tensor]:
    """Forward pass and the loss gradient at the output activations.

    Returns ``(record, loss, dloss_da)`` where ``dloss_da`` is ``(B, N_out)`` per-sample
    ``∂ℓ/∂a_out``. Only the loss head is differentiated by autograd; with
    ``differentiable=True`` everything stays on the autograd graph (for meta-gradients).
    ``generator`` is passed to the forward (a training-mode forward: dropout masks are drawn from it and
    recorded in ``record.aux``); ``None`` draws nothing (dropout is the identity).
    """
    batch = x.shape[0]
    if differentiable and theta.requires_grad:  # else the seed does not depend on meta-parameters
        record = net.forward(x, theta, record=True, generator=generator)
        a_out = record.a[net.output_layer]
        loss = loss_fn(record.output, y)
        (grad,) = torch.autograd.grad(loss, a_out, create_graph=True)
        return record, loss, grad * batch
    with torch.no_grad():
        record = net.forward(x, theta.detach(), record=True, generator=generator)
    a_out = record.a[net.output_layer].detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(a_out.view(batch, *net.output_shape), y)
        (grad,) = torch.autograd.grad(loss, a_out)
    return record, loss.detach(), grad * batch


def _udf_messages(block: Any, rule: BackwardRule, b: Tensor, post: dict[str, Tensor], pre: dict[str, Tensor],
                  w: Tensor) -> Tensor:
    """Messages through the rule's DGL edge and node UDFs (non-linear messages)."""
    with block.local_scope():
        block.srcdata.update({"b": b, **post})
        block.dstdata.update(pre)
        block.edata["w"] = w
        block.update_all(rule.message, rule.reduce)
        return block.dstdata["M"]


def backward(
    net: CompiledNetwork,
    record: ForwardRecord,
    dloss_da: Tensor,
    rule: BackwardRule,
    rule_state: dict[str, Tensor],
    theta: Tensor,
    history: UpdateHistory | None = None,
    fused: bool = True,
) -> BackwardResult:
    """Propagate the error signal backwards through ``net`` with ``rule``.

    Parameters
    ----------
    net : CompiledNetwork
    record : ForwardRecord
        From :func:`forward_and_seed` (``(B, N)`` per block).
    dloss_da : Tensor
        ``(B, N_out)`` per-sample loss gradient at the output activations.
    rule : BackwardRule
    rule_state : dict
        ``rule.init_state(net)``.
    theta : Tensor
        ``(P,)`` parameters of this step.
    history : UpdateHistory, optional
        The update rule's named statistics (:meth:`~mpbackprop.rules.UpdateRule.history`) offered to the rule.
    fused : bool
        Run ``Linear`` layers with linear messages as dense contractions (same numbers as
        the DGL path up to summation order; ``False`` forces DGL message passing everywhere).
    """
    layers, views = net.layers, net.views
    n = len(layers)
    batch = dloss_da.shape[0]
    d = rule.state_dim

    a_t: list[Tensor] = [a.t() for a in record.a]  # (N, B) views; node axis first for DGL
    z_t: list[Tensor | None] = [None] + [z.t() for z in record.z[1:]]  # type: ignore[union-attr]
    fp_t: list[Tensor | None] = [None] * n

    def fprime(k: int) -> Tensor:
        if fp_t[k] is None:
            z = z_t[k]
            assert z is not None
            fp_t[k] = layers[k].activation.derivative(z)
        return fp_t[k]  # type: ignore[return-value]

    out = net.output_layer
    M: list[Tensor | None] = [None] * n
    B: list[Tensor | None] = [None] * n
    seed_ctx = NodeContext(layers[out], dloss_da.t(), z_t[out], a_t[out], fprime(out), layer_depth(net, out), True)  # type: ignore[arg-type]
    M[out] = rule.seed(dloss_da.t().contiguous(), seed_ctx)
    parts: dict[int, Tensor] = {}  # param offset -> (numel, d)

    for k in range(n - 1, 0, -1):
        if M[k] is None:
            continue
        layer, view = layers[k], views[k]
        assert view is not None
        ctx = NodeContext(layer, M[k], z_t[k], a_t[k], fprime(k), layer_depth(net, k), k == out)  # type: ignore[arg-type]
        b = rule.node(ctx).contiguous()
        B[k] = b
        sources = view.sources
        a_src = a_t[sources[0]] if len(sources) == 1 else torch.cat([a_t[s] for s in sources])
        needs_messages = any(s != 0 for s in sources)
        if not layer.weighted and not needs_messages:
            continue  # a parameter-free block fed by the input alone: nothing to send
        inp = BlockInput(layer, view, b, z_t[k], a_src, batch, needs_messages, aux=record.aux.get(k))  # type: ignore[arg-type]
        if layer.weighted:
            wt = layer.weight
            assert wt is not None and view.param is not None and view.to_param is not None
            if needs_messages:
                lctx = layer_context(net, k, theta, rule_state, history)
                w = lctx.weight
                inp.coef = Coefficients.of(rule.coefficients(lctx))
                if inp.coef is None:  # non-linear messages: the rule's own edge/node UDFs
                    s0 = sources[0]
                    post = {"z": z_t[k], "a": a_t[k], "fprime": fprime(k)}
                    pre = {"a": a_src}
                    if s0 != 0:
                        pre.update(z=z_t[s0], fprime=fprime(s0))  # type: ignore[dict-item]
                    inp.udf = (lambda blk=view.bwd, b=b, post=post, pre=pre, w=w[view.param]:  # type: ignore[misc]
                               _udf_messages(blk, rule, b, post, pre, w))
        out = select_kernel(kind_of(layer.kind), inp, fused)(inp)
        if out.weight is not None:
            parts[layer.weight.offset] = out.weight  # type: ignore[union-attr]
        if out.bias is not None:
            parts[layer.bias.offset] = out.bias  # type: ignore[union-attr]
        msgs = out.messages
        if msgs is None:
            continue
        start = 0
        for s in sources:
            size = layers[s].size
            if s != 0:
                piece = msgs[start:start + size]
                M[s] = piece if M[s] is None else M[s] + piece
            start += size

    signal = _assemble(net, parts, d, theta)
    return BackwardResult(signal, B, M)


def _assemble(net: CompiledNetwork, parts: dict[int, Tensor], d: int, theta: Tensor) -> Tensor:
    """Concatenate per-tensor signals in param-node order (zeros for tensors no signal reached)."""
    pieces = []
    for p in net.tensors:
        piece = parts.get(p.offset)
        if piece is None:
            piece = theta.new_zeros(p.numel, d)
        pieces.append(piece)
    if not pieces:
        return theta.new_zeros(0, d)
    return torch.cat(pieces)


def signals(net: CompiledNetwork, x: Tensor, y: Tensor, rule: BackwardRule, loss: str | LossFn = "cross_entropy",
            theta: Tensor | None = None, rule_state: dict[str, Tensor] | None = None,
            fused: bool = True) -> tuple[Tensor, Tensor]:
    """Per-parameter signals ``(P, d)`` of one backward pass, and the loss (no update)."""
    theta = net.values if theta is None else theta
    loss_fn = resolve_loss(loss)
    rule_state = rule.init_state(net) if rule_state is None else rule_state
    record, value, dl = forward_and_seed(net, theta, x, y, loss_fn)
    with torch.no_grad():
        result = backward(net, record, dl, rule, rule_state, theta, fused=fused)
    return result.signal, value


def train_step(
    net: CompiledNetwork,
    theta: Tensor,
    x: Tensor,
    y: Tensor,
    rule: BackwardRule,
    update: UpdateRule,
    rule_state: dict[str, Tensor],
    opt_state: dict[str, Tensor],
    step: int,
    loss: str | LossFn = "cross_entropy",
    differentiable: bool = False,
    trace: bool = False,
    fused: bool = True,
    total_steps: int | None = None,
    keep_backward: bool = False,
    generator: torch.Generator | None = None,
) -> StepResult:
    """One training step of ``net`` with a backward rule and an update rule (functional).

    With ``differentiable=True`` the new parameters stay on the autograd graph of the
    rules' meta-parameters (truncated backprop through unrolls). With ``trace=True`` the
    backward state and signals are written onto ``net.graph`` for inspection:
    ``g.nodes['neuron'].data['b']`` ``(N, B, d)``, ``['M']``, ``['z']``, ``['a']`` ``(N, B)``,
    ``g.nodes['param'].data['signal']`` ``(P, d)`` and ``['delta']`` ``(P,)``. ``total_steps`` is the
    stated length of the run, passed on to the update rule (rules with a schedule need it). The backward
    rule sees the update's :meth:`~mpbackprop.rules.UpdateRule.history` of ``opt_state`` (before this
    step's update). ``keep_backward=True`` returns the pass's :class:`BackwardResult` in ``backward``.
    ``generator`` draws the step's dropout masks (:func:`forward_and_seed`; the backward uses the recorded
    masks); ``None`` draws none, and a network without dropout never touches it.
    """
    loss_fn = resolve_loss(loss)
    record, value, dl = forward_and_seed(net, theta, x, y, loss_fn, differentiable, generator)
    grad_ctx = torch.enable_grad() if differentiable else torch.no_grad()
    with grad_ctx:
        result = backward(net, record, dl, rule, rule_state, theta, update.history(opt_state), fused=fused)
        segments = net.graph.nodes[PARAM].data["tensor"].to(theta.device)  # the graph stays on the CPU
        uctx = UpdateContext(theta, result.signal, opt_state, step, segments,
                             len(net.tensors), net.tensor_sizes, total_steps, net.tensor_fan_in, value.detach())
        new_theta, new_state = update.step(uctx)
        frozen = net.frozen_mask
        if frozen is not None:
            frozen = frozen.to(theta.device)
            new_theta, new_state = _keep_frozen(frozen, theta, new_theta, opt_state, new_state)
    if trace:
        write_trace(net, record, result, (theta - new_theta).detach())
    return StepResult(value, new_theta, new_state, result.signal, backward=result if keep_backward else None)


def _keep_frozen(frozen: Tensor, theta: Tensor, new_theta: Tensor, state: dict[str, Tensor],
                 new_state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Frozen entries of the parameters, and of every state tensor laid out per parameter (last
    axis ``P``), as they were before the update — as ``torch.optim`` leaves a parameter without
    gradient alone."""
    kept = torch.where(frozen, theta, new_theta)
    p = frozen.numel()
    out = {}
    for key, value in new_state.items():
        old = state.get(key)
        if old is not None and value.dim() >= 1 and value.shape[-1] == p and old.shape == value.shape:
            value = torch.where(frozen, old, value)
        out[key] = value
    return kept, out


def write_trace(net: CompiledNetwork, record: ForwardRecord, result: BackwardResult, delta: Tensor) -> None:
    """Write what flowed in one step onto ``net.graph`` (see :func:`train_step`; the graph is on the CPU)."""
    g = net.graph
    batch = record.a[0].shape[0]
    d = result.signal.shape[1]
    dtype = result.signal.dtype
    b_all = torch.zeros(net.num_neurons, batch, d, dtype=dtype)
    m_all = torch.zeros(net.num_neurons, batch, d, dtype=dtype)
    z_all = torch.zeros(net.num_neurons, batch, dtype=dtype)
    a_all = torch.zeros(net.num_neurons, batch, dtype=dtype)
    for layer in net.layers:
        sl = slice(layer.offset, layer.stop)
        a_all[sl] = record.a[layer.index].detach().t().cpu()
        z = record.z[layer.index]
        if z is not None:
            z_all[sl] = z.detach().t().cpu()
        if result.b[layer.index] is not None:
            b_all[sl] = result.b[layer.index].detach().permute(0, 2, 1).cpu()  # type: ignore[union-attr]
        if result.messages[layer.index] is not None:
            m_all[sl] = result.messages[layer.index].detach().permute(0, 2, 1).cpu()  # type: ignore[union-attr]
    nd = g.nodes[NEURON].data
    nd["b"], nd["M"], nd["z"], nd["a"] = b_all, m_all, z_all, a_all
    g.nodes[PARAM].data["signal"] = result.signal.detach().cpu()
    g.nodes[PARAM].data["delta"] = delta.cpu()

