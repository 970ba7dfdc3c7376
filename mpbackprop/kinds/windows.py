"""Index maps of sliding windows, shared by the kinds that read (C, H, W) maps through a window."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ShapeError

__all__ = ["as_maps", "from_maps", "pair", "pooling_windows", "unfold_hw", "window_map"]


def pair(v: Any) -> tuple[int, int]:
    """``v`` as two ints (an int is repeated, a one-element sequence too)."""
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[1] if len(v) > 1 else v[0])
    return int(v), int(v)


def unfold_hw(h: int, w: int, pad: list[int], k: tuple[int, int], stride: Any, dil: Any) -> tuple[int, int]:
    """Output height and width of a window ``k`` over an ``h×w`` map padded by ``(left, right, top, bottom)``."""
    sh, sw = pair(stride)
    dh, dw = pair(dil)
    hh = (h + pad[2] + pad[3] - dh * (k[0] - 1) - 1) // sh + 1
    ww = (w + pad[0] + pad[1] - dw * (k[1] - 1) - 1) // sw + 1
    return hh, ww


def window_map(c: int, h: int, w: int, kernel: tuple[int, int], stride: tuple[int, int],
               padding: tuple[int, int], dilation: tuple[int, int] = (1, 1)) -> Tensor:
    """``(C, kh·kw, L)`` per channel, window tap and output location: 1 + the row-major index of the
    input element the tap reads, 0 where it reads the padding."""
    idx = torch.arange(1, c * h * w + 1, dtype=torch.float64).reshape(c, 1, h, w)
    return F.unfold(idx, kernel, dilation=dilation, padding=padding, stride=stride).long()


def pooling_windows(builder: Any, node: Any, ref: Any, kernel: Any, stride: Any, padding: Any, ceil_mode: bool,
                    dilation: Any = 1) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int],
                                                 Tensor, Tensor, Tensor, Tensor]:
    """What the pooling kinds share when tracing: the refusals (``ceil_mode``, an input that is not a
    ``(C, H, W)`` map), the window sizes and the window map. Returns ``(kernel, stride, padding,
    dilation, cols, keep, src, dst)``: ``cols`` from :func:`window_map`, ``keep`` its taps that read the
    input (not the padding), and for those the input (``src``) and output (``dst``) neuron indices."""
    if ceil_mode:
        raise builder._refuse(node, "ceil_mode=True; use ceil_mode=False")
    if len(ref.shape) != 3:
        raise ShapeError(f"{builder.where(node)} expects input of shape (C, H, W), gets {ref.shape}")
    k, d, p = pair(kernel), pair(dilation), pair(padding)
    s = pair(stride if stride not in (None, []) else kernel)
    c, h, w = ref.shape
    cols = window_map(c, h, w, k, s, p, d)  # (C, kh*kw, L)
    _, taps, locs = cols.shape
    ch, _, lc = torch.meshgrid(torch.arange(c), torch.arange(taps), torch.arange(locs), indexing="ij")
    keep = cols > 0
    return k, s, p, d, cols, keep, (cols - 1)[keep], (ch * locs + lc)[keep]


def as_maps(b: Tensor, shape: tuple[int, int, int], batch: int) -> Tensor:
    """Per-neuron signals ``(C·H·W, d, B)`` of a ``shape = (C, H, W)`` block as ``(d·B, C, H, W)`` maps,
    one per state channel and sample — the layout of torch's pooling backward kernels."""
    c, h, w = shape
    d = b.shape[1]
    return b.view(c, h, w, d, batch).permute(3, 4, 0, 1, 2).reshape(d * batch, c, h, w)


def from_maps(m: Tensor, d: int, batch: int) -> Tensor:
    """The inverse of :func:`as_maps`: ``(d·B, C, H, W)`` maps as per-neuron ``(C·H·W, d, B)``."""
    return m.reshape(d, batch, -1).permute(2, 0, 1)
