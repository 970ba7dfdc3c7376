"""The heterograph schema (method.md §1) and its construction from a compiler trace.

Node types are exactly ``neuron`` and ``param``. For a block ``L`` the edge types are:

=========================================  ==============================================
``('neuron', 'in_L', 'param')``            use ``k``: pre-neuron ``i`` → weight ``p``
``('param', 'out_L', 'neuron')``           use ``k``: weight ``p`` → post-neuron ``j``
``('param', 'in_L_rev', 'neuron')``        reverse of ``in_L`` (same edge ids)
``('neuron', 'out_L_rev', 'param')``       reverse of ``out_L`` (same edge ids)
``('param', 'bias_L', 'neuron')``          bias ``p`` → post-neuron ``j`` (and ``bias_L_rev``)
``('neuron', 'fixed_L', 'neuron')``        pooling / residual / scaling / identity, ``edata['coef']``
``('neuron', 'fixed_L_rev', 'neuron')``    reverse of ``fixed_L`` (same edge ids)
=========================================  ==============================================

Edge ``k`` of ``in_L``, ``out_L`` and both reverses is the same use ``z_j += w_p·a_i``, so a
convolution's weight sharing is exact: one ``param`` node, many uses.

Static features: ``neuron`` — ``layer``, ``pos`` (row-major index in the block), ``coord``
(channel, row, column; -1 where the block has fewer axes), ``act`` (activation id),
``kind`` (layer kind id), ``fan_in``, ``fan_out`` (number of incoming/outgoing edges);
``param`` — ``value``, ``layer``, ``role`` (0 weight, 1 bias), ``index`` (flat index in
its tensor), ``tensor`` (index in the network's tensor table), ``uses``, ``fan_in``,
``fan_out`` (of the weight tensor, as ``torch.nn.init`` computes them), ``frozen`` (1 for
parameters of tensors with ``requires_grad=False``: training leaves them unchanged).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._quiet import dgl
from ..compiler.trace import Trace
from .layers import KINDS, Layer, ParamTensor

__all__ = ["build_heterograph", "frozen_feature", "tensor_table", "NEURON", "PARAM"]

NEURON = "neuron"
PARAM = "param"


def tensor_table(layers: list[Layer]) -> list[ParamTensor]:
    """All parameter tensors in param-node order."""
    return [p for layer in layers for p in layer.params]


def frozen_feature(layers: list[Layer]) -> Tensor:
    """``(P,)`` int64: 1 on parameters of frozen tensors, 0 elsewhere (``param`` feature ``frozen``)."""
    tensors = tensor_table(layers)
    if not tensors:
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat([torch.full((p.numel,), int(p.frozen), dtype=torch.int64) for p in tensors])


def _input_ids(layers: list[Layer], layer: Layer) -> Tensor:
    return torch.cat([torch.arange(layers[b].offset, layers[b].stop) for b in layer.inputs])


def _coords(shape: tuple[int, ...]) -> Tensor:
    n = math.prod(shape)
    out = torch.full((n, 3), -1, dtype=torch.int64)
    if not shape:
        return out
    idx = torch.arange(n)
    tail = shape[-3:]
    strides = [math.prod(tail[k + 1:]) for k in range(len(tail))]
    for k, (size, stride) in enumerate(zip(tail, strides)):
        out[:, 3 - len(tail) + k] = (idx // stride) % size
    return out


def _torch_fans(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) < 2:
        return shape[0], shape[0]
    recept = math.prod(shape[2:])
    return shape[1] * recept, shape[0] * recept


def build_heterograph(trace: Trace) -> dgl.DGLGraph:
    """Build the DGL heterograph of a compiler :class:`~mpbackprop.compiler.Trace`."""
    layers = trace.layers
    num_neurons = layers[-1].stop
    num_params = int(trace.values.numel())
    data: dict[tuple[str, str, str], tuple[Tensor, Tensor]] = {}
    coefs: dict[tuple[str, str, str], Tensor] = {}
    fan_in = torch.zeros(num_neurons, dtype=torch.int64)
    fan_out = torch.zeros(num_neurons, dtype=torch.int64)
    uses = torch.zeros(num_params, dtype=torch.int64)
    for layer, edges in zip(layers, trace.edges):
        if edges is None:
            continue
        L = layer.index
        src = _input_ids(layers, layer)[edges.src]
        dst = edges.dst + layer.offset
        fan_in += torch.bincount(dst, minlength=num_neurons)
        fan_out += torch.bincount(src, minlength=num_neurons)
        if layer.weighted:
            assert layer.weight is not None and edges.param is not None
            p = edges.param + layer.weight.offset
            uses += torch.bincount(p, minlength=num_params)
            data[(NEURON, f"in_{L}", PARAM)] = (src, p)
            data[(PARAM, f"out_{L}", NEURON)] = (p, dst)
            data[(PARAM, f"in_{L}_rev", NEURON)] = (p, src)
            data[(NEURON, f"out_{L}_rev", PARAM)] = (dst, p)
            if layer.bias is not None:
                assert edges.bias_param is not None and edges.bias_dst is not None
                pb = edges.bias_param + layer.bias.offset
                jb = edges.bias_dst + layer.offset
                uses += torch.bincount(pb, minlength=num_params)
                data[(PARAM, f"bias_{L}", NEURON)] = (pb, jb)
                data[(NEURON, f"bias_{L}_rev", PARAM)] = (jb, pb)
        else:
            assert edges.coef is not None
            data[(NEURON, f"fixed_{L}", NEURON)] = (src, dst)
            data[(NEURON, f"fixed_{L}_rev", NEURON)] = (dst, src)
            coefs[(NEURON, f"fixed_{L}", NEURON)] = edges.coef
            coefs[(NEURON, f"fixed_{L}_rev", NEURON)] = edges.coef
    if not data:  # a graph needs at least one relation for DGL to know both node types
        data[(NEURON, "none", PARAM)] = (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    g = dgl.heterograph(data, num_nodes_dict={NEURON: num_neurons, PARAM: num_params})
    for etype, c in coefs.items():
        g.edges[etype].data["coef"] = c.to(trace.values.dtype)

    nd = g.nodes[NEURON].data
    nd["layer"] = torch.cat([torch.full((l.size,), l.index, dtype=torch.int64) for l in layers])
    nd["pos"] = torch.cat([torch.arange(l.size) for l in layers])
    nd["coord"] = torch.cat([_coords(l.shape) for l in layers])
    nd["act"] = torch.cat([torch.full((l.size,), l.activation.id, dtype=torch.int64) for l in layers])
    nd["kind"] = torch.cat([torch.full((l.size,), KINDS.index(l.kind), dtype=torch.int64) for l in layers])
    nd["fan_in"] = fan_in
    nd["fan_out"] = fan_out

    pd = g.nodes[PARAM].data
    tensors = tensor_table(layers)
    if tensors:
        pd["value"] = trace.values.clone()
        pd["layer"] = torch.cat([
            torch.full((p.numel,), l.index, dtype=torch.int64) for l in layers for p in l.params
        ])
        pd["role"] = torch.cat([torch.full((p.numel,), int(p.role == "bias"), dtype=torch.int64) for p in tensors])
        pd["index"] = torch.cat([torch.arange(p.numel) for p in tensors])
        pd["tensor"] = torch.cat([torch.full((p.numel,), k, dtype=torch.int64) for k, p in enumerate(tensors)])
        pd["uses"] = uses
        pd["frozen"] = frozen_feature(layers)
        fans = []
        for l in layers:
            if l.weight is None:
                continue
            fi, fo = _torch_fans(l.weight.shape)
            for p in l.params:
                fans.append(torch.tensor([[fi, fo]], dtype=torch.int64).expand(p.numel, 2))
        both = torch.cat(fans)
        pd["fan_in"] = both[:, 0].contiguous()
        pd["fan_out"] = both[:, 1].contiguous()
    return g
