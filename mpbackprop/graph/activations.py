"""Activation functions as properties of neurons.

An activation is not a layer in mpbackprop: a neuron stores its pre-activation
``z`` and applies ``a = f(z)``. The engine needs ``f`` and its derivative ``f'``
in closed form (differentiable, exact in float64), so each supported activation
is registered here with both. ``Activation`` is a small frozen value object
(name + keyword arguments) that serialises to JSON with the graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Activation", "ACTIVATION_IDS", "IDENTITY"]


def _identity(z: Tensor, **_: Any) -> Tensor:
    return z


def _identity_d(z: Tensor, **_: Any) -> Tensor:
    return torch.ones_like(z)


def _relu_d(z: Tensor) -> Tensor:
    return (z > 0).to(z.dtype)


def _leaky(z: Tensor, negative_slope: float = 0.01) -> Tensor:
    return F.leaky_relu(z, negative_slope)


def _leaky_d(z: Tensor, negative_slope: float = 0.01) -> Tensor:
    return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, negative_slope))


def _elu(z: Tensor, alpha: float = 1.0) -> Tensor:
    return F.elu(z, alpha)


def _elu_d(z: Tensor, alpha: float = 1.0) -> Tensor:
    return torch.where(z > 0, torch.ones_like(z), alpha * torch.exp(torch.clamp(z, max=0)))


def _gelu(z: Tensor, approximate: str = "none") -> Tensor:
    return F.gelu(z, approximate=approximate)


def _gelu_d(z: Tensor, approximate: str = "none") -> Tensor:
    if approximate == "tanh":
        k = math.sqrt(2.0 / math.pi)
        inner = k * (z + 0.044715 * z**3)
        t = torch.tanh(inner)
        return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * k * (1 + 3 * 0.044715 * z * z)
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return cdf + z * pdf


def _silu_d(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _tanh_d(z: Tensor) -> Tensor:
    t = torch.tanh(z)
    return 1 - t * t


def _sigmoid_d(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1 - s)


def _softplus(z: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    return F.softplus(z, beta, threshold)


def _softplus_d(z: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    return torch.where(z * beta > threshold, torch.ones_like(z), torch.sigmoid(beta * z))


# name -> (id, f, f')
_REGISTRY: dict[str, tuple[int, Callable[..., Tensor], Callable[..., Tensor]]] = {
    "identity": (0, _identity, _identity_d),
    "relu": (1, lambda z: F.relu(z), _relu_d),
    "leaky_relu": (2, _leaky, _leaky_d),
    "elu": (3, _elu, _elu_d),
    "gelu": (4, _gelu, _gelu_d),
    "silu": (5, lambda z: F.silu(z), _silu_d),
    "tanh": (6, torch.tanh, _tanh_d),
    "sigmoid": (7, torch.sigmoid, _sigmoid_d),
    "softplus": (8, _softplus, _softplus_d),
}

#: Integer id of each activation, as stored in ``g.nodes['neuron'].data['act']``.
ACTIVATION_IDS: dict[str, int] = {name: entry[0] for name, entry in _REGISTRY.items()}


@dataclass(frozen=True)
class Activation:
    """An elementwise activation ``a = f(z)`` with its closed-form derivative.

    Parameters
    ----------
    name : str
        One of :data:`ACTIVATION_IDS`.
    kwargs : dict
        Hyper-parameters (``negative_slope``, ``alpha``, ``approximate``, ``beta``, ``threshold``).
    """

    name: str = "identity"
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name not in _REGISTRY:
            raise ValueError(f"unknown activation {self.name!r}; known: {', '.join(_REGISTRY)}")

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.kwargs.items()))))

    @property
    def id(self) -> int:
        """Integer id stored on neurons."""
        return _REGISTRY[self.name][0]

    @property
    def is_identity(self) -> bool:
        return self.name == "identity"

    def __call__(self, z: Tensor) -> Tensor:
        return _REGISTRY[self.name][1](z, **self.kwargs)

    def derivative(self, z: Tensor) -> Tensor:
        """``f'(z)``, elementwise, differentiable in ``z``."""
        return _REGISTRY[self.name][2](z, **self.kwargs)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Activation":
        return cls(data["name"], dict(data.get("kwargs", {})))

    def __str__(self) -> str:
        if not self.kwargs:
            return self.name
        args = ", ".join(f"{k}={v}" for k, v in sorted(self.kwargs.items()))
        return f"{self.name}({args})"


IDENTITY = Activation()
