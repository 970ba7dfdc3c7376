"""Meta-training on ``torch.distributed``: one outer loop, several workers.

Launch with ``torchrun --nproc-per-node N -m mpbackprop meta-train ...`` (add ``--nnodes`` and
``--rdzv-endpoint HOST:PORT`` for several machines). ``MPBACKPROP_DIST_TIMEOUT`` (seconds, default
1800) bounds how long a collective waits for a silent worker. Each worker runs its own task slots —
worker ``r`` of ``W`` runs slots ``r·M … r·M+M−1`` with ``M = tasks_per_step`` — computes its
meta-gradient estimate, and the estimates are averaged with one all-reduce (gloo on CPU, NCCL
when CUDA is used). Every slot has its own seeded random streams, so W workers reproduce one
process running W·M slots. For ES/PES only scalars travel (see :class:`~.estimators.AntitheticES`).
Rank 0 alone writes files; the other ranks send it their inner
states (``gather_object``) so that ``state.pt`` resumes the whole run. A worker that dies makes
the collective calls of the others fail: they stop with one clear line, and the last checkpoint
(written atomically) stays intact for ``--resume`` (or torchrun's elastic restart).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import MPBackpropError

__all__ = ["Workers", "from_environment", "WorkerFailure"]


class WorkerFailure(MPBackpropError):
    """Another worker of a distributed run stopped answering."""


@dataclass
class Workers:
    """Where this process stands in the run, and how to combine results across workers."""

    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def slots(self, tasks_per_step: int) -> list[int]:
        return list(range(self.rank * tasks_per_step, (self.rank + 1) * tasks_per_step))

    def mean(self, t: Tensor) -> Tensor:
        """Average ``t`` over workers (identity in one process)."""
        return self.sum(t) / self.world_size if self.distributed else t

    def sum(self, t: Tensor) -> Tensor:
        """Sum ``t`` over workers (identity in one process)."""
        if not self.distributed:
            return t
        out = t.detach().clone()
        _collective(lambda: dist.all_reduce(out, op=dist.ReduceOp.SUM))
        return out

    def gather(self, obj: Any) -> list[Any] | None:
        """Every worker's ``obj`` on rank 0 (``None`` elsewhere)."""
        if not self.distributed:
            return [obj]
        bucket: list[Any] | None = [None] * self.world_size if self.is_writer else None
        _collective(lambda: dist.gather_object(obj, bucket, dst=0))
        return bucket

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any worker (every worker gets the same answer)."""
        if not self.distributed:
            return flag
        return bool(self.sum(torch.tensor([1.0 if flag else 0.0]))[0] > 0)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every worker."""
        if not self.distributed:
            return obj
        box = [obj]
        _collective(lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            _collective(dist.barrier)

    def close(self) -> None:
        """Wait for every worker, then leave. The process group is not destroyed: with gloo,
        ``destroy_process_group`` sometimes never returns once a peer is gone (seen with torch 2.2),
        and the group ends with the process anyway."""
        if self.distributed and dist.is_initialized():
            try:
                dist.barrier()
            except RuntimeError:  # a peer already left: nothing to wait for
                pass


def _collective(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except (RuntimeError, ConnectionError) as exc:  # gloo reports a dead peer as RuntimeError
        raise WorkerFailure(f"a worker of the distributed run stopped ({str(exc).splitlines()[0][:120]})") from exc


def from_environment() -> Workers:
    """Join the process group torchrun describes (``WORLD_SIZE``/``RANK``/``MASTER_ADDR``...);
    a plain single-process run needs none of it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Workers()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("MPBACKPROP_BACKEND") == "nccl" else "gloo"
        # collectives wait at most this long for a silent peer (torch's default is 30 minutes)
        timeout = timedelta(seconds=float(os.environ.get("MPBACKPROP_DIST_TIMEOUT", "1800")))
        dist.init_process_group(backend=backend, timeout=timeout)
    return Workers(dist.get_rank(), dist.get_world_size())
