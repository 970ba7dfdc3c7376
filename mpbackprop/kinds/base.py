"""What a layer kind is (the registry's one interface), and the one place that picks a kernel.

A *kind* is everything mpbackprop knows about one kind of block, in one module of this package:

* how it is traced (:attr:`Kind.modules`, :attr:`Kind.functions`, :meth:`Kind.trace`) and how big its
  graph will be (:meth:`Kind.estimate`);
* its edges (built by :meth:`Kind.trace` as :class:`LayerEdges`);
* its forward pass with dense torch ops (:meth:`Kind.forward`) and as message passing on the graph
  (:meth:`Kind.forward_graph`);
* its exact vector–Jacobian product as messages on the graph — the DGL *reference* path
  (:meth:`Kind.reference`) — and, where it has one, the equal *dense* fast path (:meth:`Kind.dense`,
  with :meth:`Kind.accepts_dense` saying for which inputs);
* its plot colour.

Both backward paths have one signature, ``(BlockInput) -> BlockGrad``; :func:`select_kernel` alone
chooses between them, as ``torch.optim`` picks single-tensor / foreach / fused Adam in one function and
PyG fuses a layer that implements ``message_and_aggregate``. A kind opts into a fast path by
implementing :meth:`Kind.dense`.

Message coefficients of weighted kinds are typed (:class:`Coefficients`: one scalar per weight, a
diagonal per weight, a full ``d×d`` matrix per weight), decoded here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from torch import Tensor

from .._quiet import ops

if TYPE_CHECKING:  # the registry sits below layers/views/compiler in the import graph
    from ..graph.layers import Layer
    from ..graph.views import LayerView

__all__ = ["LayerEdges", "Coefficients", "BlockInput", "BlockGrad", "ForwardContext", "Kind", "WeightedKind",
           "FixedKind", "select_kernel", "SCALAR", "DIAGONAL", "FULL"]


@dataclass
class LayerEdges:
    """Edges of one block, in block-local numbering.

    ``src`` indexes the concatenation of the block's input blocks (in ``Layer.inputs``
    order), ``dst`` the block's own neurons. Weighted blocks carry ``param`` (flat index
    into the weight tensor) for each use and optional bias edges; fixed blocks ``coef``.
    """

    src: Tensor
    dst: Tensor
    param: Tensor | None = None
    coef: Tensor | None = None
    bias_param: Tensor | None = None
    bias_dst: Tensor | None = None


SCALAR, DIAGONAL, FULL = "scalar", "diagonal", "full"
_FORMS = {1: SCALAR, 2: DIAGONAL, 3: FULL}


@dataclass(frozen=True)
class Coefficients:
    """A weighted block's linear message coefficients ``C(s_p)``, typed by their shape.

    ``form`` is ``"scalar"`` (``value`` is ``(P_w,)``: one number per weight, every channel alike),
    ``"diagonal"`` (``(P_w, d)``: one number per weight and channel) or ``"full"``
    (``(P_w, d, d)``: a matrix per weight mixing channels), as
    :meth:`~mpbackprop.rules.BackwardRule.coefficients` returns them.
    """

    form: str
    value: Tensor

    @classmethod
    def of(cls, value: Tensor | None) -> "Coefficients | None":
        """Type a rule's coefficient tensor (``None`` stays ``None``: the rule's UDFs run)."""
        if value is None:
            return None
        form = _FORMS.get(value.dim())
        if form is None:
            raise ValueError(f"message coefficients must be (P,), (P, d) or (P, d, d), got shape {tuple(value.shape)}")
        return cls(form, value)

    def messages(self, block: Any, b: Tensor, param: Tensor) -> Tensor:
        """``M_i = Σ_k C_{p(k)} b_{j(k)}`` with DGL's fused ``u_mul_e_sum`` (gspmm) on ``block``."""
        c = self.value[param]
        if self.form == SCALAR:  # one scalar per weight, all channels
            return ops.u_mul_e_sum(block, b, c.view(-1, 1, 1))
        if self.form == DIAGONAL:  # diagonal (P, d)
            return ops.u_mul_e_sum(block, b, c.unsqueeze(-1))
        # full (P, d, d): broadcast (N, 1, d', B) * (E, d, d', 1), then sum over d'
        return ops.u_mul_e_sum(block, b.unsqueeze(1), c.unsqueeze(-1)).sum(2)

    def channel0(self, param: Tensor, b: Tensor) -> Tensor:
        """Channel 0 of the message on each use, ``(E, B)``, from ``b`` gathered at the uses ``(E, d, B)``."""
        c = self.value[param]
        if self.form == SCALAR:
            return c.view(-1, 1) * b[:, 0]
        if self.form == DIAGONAL:
            return c[:, :1] * b[:, 0]
        return torch.einsum("ex,exb->eb", c[:, 0, :], b)


@dataclass
class ForwardContext:
    """What a kind's forward may need besides its inputs and parameters.

    ``generator`` draws the random parts of a training-mode forward (dropout masks); ``None`` runs the
    network deterministically (evaluation). ``aux`` collects per-block forward extras the backward
    needs (``aux[block] = tensor``), recorded with the forward pass.
    """

    generator: torch.Generator | None = None
    aux: dict[int, Tensor] | None = None


@dataclass
class BlockInput:
    """Everything one block's backward kernel sees (``(N, d, B)``: neurons, channels, batch).

    ``b`` is the block's backward state, ``z`` its pre-activations ``(N, B)``, ``a_src`` the
    activations of its sources concatenated ``(N_src, B)``. ``coef`` is set for weighted kinds when
    messages are needed and the rule's messages are linear; with ``coef is None`` and
    ``want_messages`` the rule's own message/reduce UDFs run (``udf()``). ``aux`` is what the
    block's forward recorded (dropout masks), or ``None``.
    """

    layer: "Layer"
    view: "LayerView"
    b: Tensor
    z: Tensor
    a_src: Tensor
    batch: int
    want_messages: bool
    coef: Coefficients | None = None
    udf: Callable[[], Tensor] | None = None
    aux: Tensor | None = None


@dataclass
class BlockGrad:
    """A block's backward result: weight and bias signals ``(P, d)`` (summed over uses, batch-averaged)
    and the messages ``(N_src, d, B)`` reduced at its sources' neurons (``None`` where not computed)."""

    weight: Tensor | None = None
    bias: Tensor | None = None
    messages: Tensor | None = None


class Kind:
    """One kind of block. Subclasses live one per module in :mod:`mpbackprop.kinds`."""

    #: Name on ``Layer.kind``.
    name: ClassVar[str] = ""
    #: Id on ``g.nodes['neuron'].data['kind']``: fixed once given (saved graphs keep it); the next free one.
    id: ClassVar[int] = -1
    #: Whether its uses carry learned weights (edge types ``in_L``/``out_L``), else fixed edges.
    weighted: ClassVar[bool] = False
    #: Plot colour of its neurons.
    colour: ClassVar[str] = "#333333"
    #: Module classes it traces (``isinstance``), and functions / tensor methods it traces.
    modules: ClassVar[tuple[type, ...]] = ()
    functions: ClassVar[tuple[Any, ...]] = ()
    methods: ClassVar[tuple[str, ...]] = ()
    #: How the supported-operations line names it (empty: traced by the compiler itself).
    supported: ClassVar[str] = ""
    #: Whether it reads the leading per-sample axis as channels (a spatial op: Conv2d, pooling).
    spatial: ClassVar[bool] = False
    #: The ``training`` flag its modules must have for the compiled block to compute what they compute
    #: (BatchNorm: True, batch statistics; Dropout: False, no random mask); ``None``: either.
    module_training: ClassVar[bool | None] = None

    # ------------------------------------------------------------------ trace
    def trace(self, builder: Any, node: Any, mod: Any) -> Any:
        """Add the block(s) of traced ``node`` (``mod`` its module or ``None``) through ``builder``."""
        raise NotImplementedError(f"kind {self.name!r} is not traced by itself")

    def estimate(self, node: Any, mod: Any, size: int, inputs: int) -> tuple[int, int, int]:
        """Upper bounds ``(uses, bias edges, fixed edges)`` of the block of ``node`` (``size`` neurons per
        sample, ``inputs`` tensor inputs), before anything is built. Default: one fixed edge per
        element and input."""
        return 0, 0, size * max(inputs, 1)

    # ---------------------------------------------------------------- forward
    def forward(self, layer: "Layer", inputs: list[Tensor], w: Tensor | None, b: Tensor | None,
                ctx: ForwardContext) -> Tensor:
        """``z`` of the block, ``(B, *layer.shape)`` or anything of that many elements per sample."""
        raise NotImplementedError

    def forward_graph(self, layer: "Layer", view: "LayerView", a_src: Tensor, theta: Tensor) -> Tensor:
        """``z`` ``(N, B)`` as message passing on the block's forward edges, ``a_src`` ``(N_src, B)``."""
        raise NotImplementedError

    # --------------------------------------------------------------- backward
    def reference(self, inp: BlockInput) -> BlockGrad:
        """The exact vector–Jacobian product as messages on the graph (DGL)."""
        raise NotImplementedError

    def dense(self, inp: BlockInput) -> BlockGrad:
        """The same numbers as :meth:`reference` with dense torch ops (implement to opt in)."""
        raise NotImplementedError

    def accepts_dense(self, inp: BlockInput) -> bool:
        """Whether :meth:`dense` handles ``inp`` (e.g. one state channel, scalar coefficients)."""
        return True

    @classmethod
    def has_dense(cls) -> bool:
        return cls.dense is not Kind.dense


def select_kernel(kind: Kind, inp: BlockInput, fused: bool) -> Callable[[BlockInput], BlockGrad]:
    """The one place that chooses a block's backward kernel: the kind's dense fast path when fusing is
    on, the kind implements one and accepts this input; its DGL reference path otherwise."""
    if fused and kind.has_dense() and kind.accepts_dense(inp):
        return kind.dense
    return kind.reference


class WeightedKind(Kind):
    """A kind whose uses ``z_j += w_p·a_i`` carry weights: the reference backward is shared.

    Signals: ``G_p = mean_batch Σ_{uses k of p} a_i·b_j`` (DGL ``u_dot_v`` on the uses, ``copy_e_sum``
    onto the weights), biases ``mean_batch Σ b_j``; messages ``Σ_k C_p·b_j`` (gspmm) or the rule's UDFs.
    """

    weighted = True

    def forward_graph(self, layer: "Layer", view: "LayerView", a_src: Tensor, theta: Tensor) -> Tensor:
        w = theta[layer.weight.offset:layer.weight.stop][view.param].unsqueeze(-1)  # type: ignore[union-attr]
        z = ops.u_mul_e_sum(view.fwd, a_src.contiguous(), w)
        if view.bias_fwd is not None and layer.bias is not None:
            bias = theta[layer.bias.offset:layer.bias.stop].unsqueeze(-1)
            z = z + ops.copy_u_sum(view.bias_fwd, bias)
        return z

    def reference(self, inp: BlockInput) -> BlockGrad:
        view, b, layer = inp.view, inp.b, inp.layer
        per_use = ops.u_dot_v(view.fwd, inp.a_src.unsqueeze(1).contiguous(), b)  # (E, d, 1)
        out = BlockGrad(weight=ops.copy_e_sum(view.to_param, per_use.squeeze(-1)) / inp.batch)
        if layer.bias is not None and view.bias_bwd is not None:
            out.bias = ops.copy_u_sum(view.bias_bwd, b.sum(-1)) / inp.batch
        if inp.want_messages and inp.coef is not None:
            out.messages = inp.coef.messages(view.bwd, b, view.param)
        elif inp.want_messages:
            assert inp.udf is not None
            out.messages = inp.udf()
        return out

    def accepts_dense(self, inp: BlockInput) -> bool:
        return inp.coef is not None or not inp.want_messages  # non-linear messages: the rule's UDFs


class FixedKind(Kind):
    """A parameter-free kind whose block is linear in its inputs with coefficients on its edges:
    ``z_j = Σ_{i→j} c·a_i``, backward ``M_i = Σ_{i→j} c·b_j``. The coefficients are static
    (``edata['coef']``) unless :meth:`edge_coef` makes them per sample ``(E, B)``."""

    def edge_coef(self, inp: BlockInput) -> Tensor:
        """Coefficient of each edge, ``(E, 1, 1)`` (static) or ``(E, 1, B)`` (per sample)."""
        assert inp.view.coef is not None
        return inp.view.coef.to(inp.b.dtype).view(-1, 1, 1)

    def forward_graph(self, layer: "Layer", view: "LayerView", a_src: Tensor, theta: Tensor) -> Tensor:
        assert view.coef is not None
        return ops.u_mul_e_sum(view.fwd, a_src.contiguous(), view.coef.to(a_src.dtype).unsqueeze(-1))

    def reference(self, inp: BlockInput) -> BlockGrad:
        return BlockGrad(messages=ops.u_mul_e_sum(inp.view.bwd, inp.b, self.edge_coef(inp)))
