"""Tasks and task families (method.md §4): dataset × architecture × init seed × batch size.

Datasets ship offline: scikit-learn's digits (8×8, also as 1×8×8 images), wine, breast
cancer and iris, plus synthetic Gaussian mixtures, two moons and teacher–student
regression generated from a seed. Nothing is downloaded.

A :class:`TaskFamily` samples :class:`TaskSpec` s for three disjoint task sets —
``train`` (meta-training), ``valid`` (checkpoint choice) and ``heldout`` (evaluation
only) — that never share an initialisation or data seed (each set draws its seeds from
its own range), so a held-out task is never seen in meta-training.

Datasets, architectures and families live in one registry (:data:`DATASETS`, :data:`ARCHS`,
:data:`FAMILIES`, filled by :func:`register_dataset`, :func:`register_arch`,
:func:`register_family`); the built-in ones are entries like any other, and task files
(:mod:`mpbackprop.tasks.taskfile`) add theirs the same way.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from ..engine.losses import LossFn
from ..graph.network import CompiledNetwork, compile

__all__ = ["TaskSpec", "Task", "TaskFamily", "FAMILIES", "get_family", "DATASETS", "ARCHS", "load_dataset",
           "register_dataset", "register_arch", "register_family", "forget"]

SPLITS = ("train", "valid", "heldout")
_SEED_BASE = {"train": 0, "valid": 1_000_003, "heldout": 2_000_003}
_SEED_SPAN = 1_000_000

_ACTS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU, "elu": nn.ELU,
         "leaky_relu": nn.LeakyReLU, "sigmoid": nn.Sigmoid, "softplus": nn.Softplus}


@dataclass
class Dataset:
    """Standardised arrays: ``x`` float32 ``(n, *shape)``, ``y`` int64 class ids or float32 targets."""

    name: str
    x: Tensor
    y: Tensor
    kind: str  # "classification" or "regression"

    @property
    def num_outputs(self) -> int:
        return int(self.y.max()) + 1 if self.kind == "classification" else int(self.y.shape[1])


def _sk(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets as skd

    loader = {"digits": skd.load_digits, "wine": skd.load_wine, "breast_cancer": skd.load_breast_cancer,
              "iris": skd.load_iris}[name]
    x, y = loader(return_X_y=True)
    return x.astype(np.float64), y.astype(np.int64)


def _gauss_mixture(seed: int, n: int = 1200, dim: int = 10, classes: int = 4, spread: float = 1.3):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes * 2, dim)) * spread  # two modes per class: not linearly separable
    labels = rng.integers(0, classes * 2, size=n)
    x = centers[labels] + rng.normal(size=(n, dim))
    return x, (labels % classes).astype(np.int64)


def _moons(seed: int, n: int = 1000):
    from sklearn.datasets import make_moons

    return make_moons(n_samples=n, noise=0.2, random_state=seed)


def _teacher(seed: int, n: int = 1200, dim: int = 8, out: int = 2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    w1 = torch.randn(dim, 32, generator=gen, dtype=torch.float64) / math.sqrt(dim)
    w2 = torch.randn(32, out, generator=gen, dtype=torch.float64) / math.sqrt(32)
    y = torch.tanh(x @ w1 * 2) @ w2
    y = y + 0.05 * torch.randn(y.shape, generator=gen, dtype=torch.float64)
    return x.numpy(), y.numpy()


# ----------------------------------------------------------------------------- the registry
# One registry of datasets and architectures: the built-in families below and task files
# (:mod:`mpbackprop.tasks.taskfile`) add entries through the same two functions.

#: Dataset name → (per-sample input shape, kind).
DATASETS: dict[str, tuple[tuple[int, ...], str]] = {}
_LOADERS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {}
_LOSSES: dict[str, str | LossFn] = {}
#: Architecture name → ``build(spec, input_shape, num_outputs) -> nn.Module`` (called after the init seed is set).
ARCHS: dict[str, Callable[["TaskSpec", tuple[int, ...], int], nn.Module]] = {}


def register_dataset(name: str, shape: tuple[int, ...], kind: str, load: Callable[[], tuple[np.ndarray, np.ndarray]],
                     loss: str | LossFn | None = None) -> None:
    """Add (or replace) dataset ``name``: ``load()`` returns raw ``(x, y)`` arrays (``x`` ``(n, *shape)``,
    standardised per feature on each task's training split; ``y`` class ids, or ``(n, k)`` regression
    targets); ``kind`` is ``classification`` or ``regression``; ``loss`` defaults to cross-entropy or MSE."""
    if kind not in ("classification", "regression"):
        raise ValueError(f"kind must be classification or regression, got {kind!r}")
    DATASETS[name] = (tuple(int(s) for s in shape), kind)
    _LOADERS[name] = load
    if loss is None:
        _LOSSES.pop(name, None)
    else:
        _LOSSES[name] = loss


def register_arch(name: str, build: Callable[["TaskSpec", tuple[int, ...], int], nn.Module]) -> None:
    """Add (or replace) architecture ``name``: ``build(spec, input_shape, num_outputs)`` returns the model
    (any network ``mpbackprop.compile`` accepts), drawing its initialisation from torch's global RNG."""
    ARCHS[name] = build


def forget(names: Iterable[str] = ()) -> None:
    """Drop registry entries (datasets and architectures) and every cached task built from any entry."""
    for name in names:
        for table in (DATASETS, _LOADERS, _LOSSES, ARCHS):
            table.pop(name, None)  # type: ignore[attr-defined]
    _raw.cache_clear()
    load_dataset.cache_clear()
    _compiled.cache_clear()
    for hook in ON_FORGET:
        hook()


#: Called by :func:`forget` (caches of tasks kept elsewhere register their ``clear`` here).
ON_FORGET: list[Callable[[], None]] = []


def _mlp(spec: "TaskSpec", shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    act = _ACTS[spec.activation]
    layers: list[nn.Module] = []
    width = math.prod(shape)
    if len(shape) > 1:
        layers.append(nn.Flatten())
    for h in spec.widths:
        layers += [nn.Linear(width, h), act()]
        width = h
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)


def _conv(spec: "TaskSpec", shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    act = _ACTS[spec.activation]
    layers: list[nn.Module] = []
    ch, hw = shape[0], shape[1:]
    for c in spec.widths:
        layers += [nn.Conv2d(ch, c, 3, padding=1), act(), nn.AvgPool2d(2)]
        ch, hw = c, (hw[0] // 2, hw[1] // 2)
    layers += [nn.Flatten(), nn.Linear(ch * hw[0] * hw[1], num_outputs)]
    return nn.Sequential(*layers)


def _lenet(spec: "TaskSpec", shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """LeNet-style: per width, Conv3x3 → BatchNorm2d (batch statistics) → activation → MaxPool2d(2);
    then global average pooling and a Linear classifier."""
    act = _ACTS[spec.activation]
    layers: list[nn.Module] = []
    ch = shape[0]
    for c in spec.widths:
        layers += [nn.Conv2d(ch, c, 3, padding=1), nn.BatchNorm2d(c), act(), nn.MaxPool2d(2)]
        ch = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, num_outputs)]
    return nn.Sequential(*layers)


for _name, _shape, _kind, _load in [
    ("digits", (64,), "classification", lambda: _sk("digits")),
    ("digits-image", (1, 8, 8), "classification", lambda: _sk("digits")),
    ("wine", (13,), "classification", lambda: _sk("wine")),
    ("breast_cancer", (30,), "classification", lambda: _sk("breast_cancer")),
    ("iris", (4,), "classification", lambda: _sk("iris")),
    ("gauss", (10,), "classification", lambda: _gauss_mixture(7)),
    ("moons", (2,), "classification", lambda: _moons(7)),
    ("teacher", (8,), "regression", lambda: _teacher(7)),
]:
    register_dataset(_name, _shape, _kind, _load)
register_arch("mlp", _mlp)
register_arch("conv", _conv)
register_arch("lenet", _lenet)


@functools.lru_cache(maxsize=32)
def _raw(name: str) -> tuple[np.ndarray, np.ndarray]:
    return _LOADERS[name]()


@functools.lru_cache(maxsize=256)
def load_dataset(name: str, split_seed: int, valid_fraction: float = 0.3) -> tuple[Dataset, Dataset]:
    """Train and validation splits of ``name``, split by ``split_seed``, standardised on train."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    shape, kind = DATASETS[name]
    x, y = _raw(name)
    perm = np.random.default_rng(split_seed).permutation(len(x))
    n_val = int(round(len(x) * valid_fraction))
    tr, va = perm[n_val:], perm[:n_val]
    mean, std = x[tr].mean(0), x[tr].std(0)
    std[std < 1e-8] = 1.0
    xs = ((x - mean) / std).astype(np.float32)
    if kind == "regression":
        ys = torch.tensor(y, dtype=torch.float32)
    else:
        ys = torch.tensor(y, dtype=torch.int64)
    xt = torch.tensor(xs).reshape(len(x), *shape)
    return (Dataset(name, xt[tr], ys[tr], kind), Dataset(name, xt[va], ys[va], kind))


@dataclass(frozen=True)
class TaskSpec:
    """One inner problem. ``widths`` are hidden widths (MLP) or channels (conv)."""

    dataset: str = "digits"
    arch: str = "mlp"
    widths: tuple[int, ...] = (32,)
    activation: str = "relu"
    batch_size: int = 32
    init_seed: int = 0
    data_seed: int = 0
    input_scale: float = 1.0  # task augmentation: inputs multiplied by this
    init_scale: float = 1.0  # task augmentation: initial weights (not biases) multiplied by this

    @property
    def name(self) -> str:
        w = "-".join(map(str, self.widths))
        net = f"{self.arch}-{w}-{self.activation}" if self.widths or self.activation else self.arch
        aug = "".join(f"/{k[0]}{v:.3g}" for k, v in (("xscale", self.input_scale), ("wscale", self.init_scale))
                      if v != 1.0)
        return f"{self.dataset}/{net}/b{self.batch_size}/s{self.init_seed}{aug}"

    @property
    def loss(self) -> str | LossFn:
        if self.dataset in _LOSSES:
            return _LOSSES[self.dataset]
        return "mse" if DATASETS[self.dataset][1] == "regression" else "cross_entropy"

    def to_json(self) -> dict[str, Any]:
        """Plain fields; the augmentation scales only when not 1 (so specs, and the evaluation cache
        keys made from them, read as they did before augmentation existed)."""
        d = asdict(self)
        d["widths"] = list(self.widths)
        for key in ("input_scale", "init_scale"):
            if d[key] == 1.0:
                del d[key]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TaskSpec":
        return cls(**{**d, "widths": tuple(d["widths"])})

    def build_model(self, num_outputs: int) -> nn.Module:
        """The target network, initialised from ``init_seed`` (PyTorch's default initialisation)."""
        shape = DATASETS[self.dataset][0]
        try:
            build = ARCHS[self.arch]
        except KeyError:
            raise ValueError(f"unknown arch {self.arch!r}") from None
        torch.manual_seed(self.init_seed)
        model = build(self, shape, num_outputs)
        if self.init_scale != 1.0:
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() > 1:
                        p.mul_(self.init_scale)
        return model


@functools.lru_cache(maxsize=64)
def _compiled(dataset: str, arch: str, widths: tuple[int, ...], activation: str, n_out: int) -> CompiledNetwork:
    spec = TaskSpec(dataset, arch, widths, activation)
    return compile(spec.build_model(n_out), DATASETS[dataset][0])


class Task:
    """A :class:`TaskSpec` made concrete: compiled network, initial parameters, data, batches."""

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec
        self.train, self.valid = load_dataset(spec.dataset, spec.data_seed)
        if spec.input_scale != 1.0:
            self.train = replace(self.train, x=self.train.x * spec.input_scale)
            self.valid = replace(self.valid, x=self.valid.x * spec.input_scale)
        n_out = self.train.num_outputs if self.train.kind == "classification" else self.train.y.shape[1]
        self.num_outputs = n_out
        # the graph depends on the architecture only: share it between tasks
        self.net = _compiled(spec.dataset, spec.arch, spec.widths, spec.activation, n_out)
        self.theta0 = self.net.values_of(spec.build_model(n_out))

    @property
    def loss(self) -> str | LossFn:
        return self.spec.loss

    def batch_generator(self, stream: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.spec.data_seed * 7919 + stream)

    def batch(self, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, self.train.x.shape[0], (self.spec.batch_size,), generator=gen)
        return self.train.x[idx], self.train.y[idx]

    def evaluate(self, theta: Tensor, max_examples: int | None = None) -> tuple[Tensor, Tensor]:
        """Validation ``(loss, accuracy)`` at ``theta`` (accuracy NaN for regression); differentiable."""
        from ..engine.losses import resolve_loss

        x, y = self.valid.x, self.valid.y
        if max_examples is not None:
            x, y = x[:max_examples], y[:max_examples]
        x, y = x.to(theta.device), y.to(theta.device)  # theta's device (no copy on the CPU)
        out = self.net(x.to(theta.dtype), theta)
        loss = resolve_loss(self.loss)(out, y.to(theta.dtype) if self.train.kind == "regression" else y)
        if self.train.kind == "classification":
            acc = (out.argmax(1) == y).to(theta.dtype).mean()
        else:
            acc = torch.tensor(float("nan"))
        return loss, acc


@dataclass
class TaskFamily:
    """A sampler over datasets, architectures, activations, batch sizes and seeds."""

    name: str
    datasets: tuple[str, ...]
    arch: str = "mlp"
    widths: tuple[tuple[int, ...], ...] = ((32,), (64,))
    activations: tuple[str, ...] = ("relu",)
    batch_sizes: tuple[int, ...] = (32,)
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    members: tuple[str, ...] = ()  # a mixture: draw a member family first, then its task
    augment: bool = False  # task augmentation (wider nets, input and initial-weight rescaling)
    augment_depth: bool = False  # with augment: also 4x wider and 2x deeper MLPs (see _deepened)
    # task files (mpbackprop.tasks.taskfile): architectures drawn per task, in place of arch/widths/activations;
    # log-uniform ranges of the input and initial-weight scales; the file and its fingerprint
    archs: tuple[str, ...] = ()
    scales: dict[str, tuple[float, float]] = field(default_factory=dict)
    source: str = ""
    sha256: str = ""

    def sample(self, rng: random.Random, split: str) -> TaskSpec:
        """A task of ``split`` (``train``/``valid``/``heldout``), drawn with ``rng``."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}")
        if self.members:
            spec = FAMILIES[rng.choice(self.members)].sample(rng, split)
        else:
            spec = self._sample_own(rng, split)
        if not self.augment:
            return spec
        spec = _augmented(spec, rng)
        return _deepened(spec, rng) if self.augment_depth else spec

    def _sample_own(self, rng: random.Random, split: str) -> TaskSpec:
        base = _SEED_BASE[split]
        if self.archs:
            spec = TaskSpec(dataset=rng.choice(self.datasets), arch=rng.choice(self.archs), widths=(), activation="",
                            batch_size=rng.choice(self.batch_sizes), init_seed=base + rng.randrange(_SEED_SPAN),
                            data_seed=base + rng.randrange(_SEED_SPAN))
            scale = {k: round(math.exp(rng.uniform(math.log(lo), math.log(hi))), 4) if lo != hi else lo
                     for k, (lo, hi) in sorted(self.scales.items())}
            return replace(spec, input_scale=scale.get("input", 1.0), init_scale=scale.get("init", 1.0))
        return TaskSpec(
            dataset=rng.choice(self.datasets),
            arch=self.arch,
            widths=tuple(rng.choice(self.widths)),
            activation=rng.choice(self.activations),
            batch_size=rng.choice(self.batch_sizes),
            init_seed=base + rng.randrange(_SEED_SPAN),
            data_seed=base + rng.randrange(_SEED_SPAN),
        )

    def tasks(self, split: str, n: int, seed: int = 0) -> list[TaskSpec]:
        """A fixed list of ``n`` tasks of ``split`` (same ``seed`` → same list)."""
        rng = random.Random(f"{self.name}/{split}/{seed}")
        return [self.sample(rng, split) for _ in range(n)]


FAMILIES: dict[str, TaskFamily] = {
    f.name: f
    for f in [
        TaskFamily("digits-mlp", ("digits",), "mlp", ((32,), (64,), (32, 32)), ("relu", "tanh"), (16, 32),
                   "scikit-learn digits, MLP 64-h(-h)-10, small batches"),
        TaskFamily("tabular-mlp", ("wine", "breast_cancer", "iris"), "mlp", ((16,), (32,), (16, 16)),
                   ("relu", "tanh"), (8, 16), "wine / breast cancer / iris, small MLPs"),
        TaskFamily("synthetic", ("gauss", "moons", "teacher"), "mlp", ((32,), (32, 32)), ("relu", "tanh", "gelu"),
                   (16, 32), "Gaussian mixtures, two moons, teacher-student regression"),
        TaskFamily("mixed", ("digits", "wine", "breast_cancer", "gauss", "moons", "teacher"), "mlp",
                   ((32,), (64,), (32, 32)), ("relu", "tanh"), (16, 32), "all of the above"),
        TaskFamily("digits-conv", ("digits-image",), "conv", ((4,), (8,), (4, 8)), ("relu", "tanh"), (16, 32),
                   "digits as 1x8x8 images, Conv3x3-AvgPool stacks"),
        TaskFamily("digits-lenet", ("digits-image",), "lenet", ((4,), (8,), (4, 8)), ("relu", "tanh"), (16, 32),
                   "digits as 1x8x8 images, LeNet-style: Conv3x3-BatchNorm-MaxPool stacks, global average "
                   "pooling (batch statistics in training and in validation)"),
    ]
}


FAMILIES["augmented"] = TaskFamily(
    "augmented", (), "mlp", members=("digits-mlp", "tabular-mlp", "synthetic", "digits-conv"), augment=True,
    description="digits-mlp, tabular-mlp, synthetic and digits-conv tasks, augmented: widths x2 (p=0.3), inputs "
                "and initial weights rescaled (log-uniform in [0.5, 2] and [0.7, 1.4])")


def _augmented(spec: TaskSpec, rng: random.Random) -> TaskSpec:
    """Task augmentation: widths doubled with probability 0.3, inputs rescaled by a log-uniform factor in
    [0.5, 2], initial weights by one in [0.7, 1.4] (Celo-style reparametrisation of the task)."""
    widths = tuple(2 * w for w in spec.widths) if rng.random() < 0.3 else spec.widths
    x_scale = round(math.exp(rng.uniform(math.log(0.5), math.log(2.0))), 4)
    w_scale = round(math.exp(rng.uniform(math.log(0.7), math.log(1.4))), 4)
    return replace(spec, widths=widths, input_scale=x_scale, init_scale=w_scale)


FAMILIES["augmented-depth"] = TaskFamily(
    "augmented-depth", (), "mlp", members=FAMILIES["augmented"].members, augment=True, augment_depth=True,
    description="the augmented family, and MLPs also made 4x wider (p=0.1) or 2x deeper (p=0.25)")


def _deepened(spec: TaskSpec, rng: random.Random) -> TaskSpec:
    """Width and depth augmentation on top of :func:`_augmented` (its draws come first, so the
    ``augmented`` family's tasks are unchanged): an MLP's hidden widths are doubled once more with
    probability 0.1 (4x in all when already doubled), and its hidden layers repeated (2x deeper) with
    probability 0.25 — the shapes of the long suite's 4x wider and 2x deeper nets."""
    wider, deeper = rng.random() < 0.1, rng.random() < 0.25
    if spec.arch != "mlp":
        return spec
    widths = tuple(2 * w for w in spec.widths) if wider else spec.widths
    return replace(spec, widths=widths * 2 if deeper else widths)


def register_family(family: TaskFamily) -> None:
    """Add (or replace) ``family`` in :data:`FAMILIES` (its datasets and architectures must be registered)."""
    FAMILIES[family.name] = family


def get_family(name: str) -> TaskFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown task family {name!r}; known: {', '.join(FAMILIES)}") from None
