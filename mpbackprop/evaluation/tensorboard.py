"""Optional TensorBoard output (``--tensorboard DIR``): ``pip install 'mpbackprop[tensorboard]'``.

Without the flag nothing here is imported and nothing changes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import MPBackpropError

__all__ = ["TensorBoard"]


class TensorBoard:
    """Writes meta-training rows and evaluation curves as TensorBoard scalars."""

    def __init__(self, logdir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # tensorboard is an optional extra
            raise MPBackpropError("--tensorboard needs the tensorboard package: "
                                  "pip install 'mpbackprop[tensorboard]'") from exc
        self.writer = SummaryWriter(log_dir=str(logdir))

    def meta_step(self, row: dict[str, Any]) -> None:
        """One ``metrics.jsonl`` row of meta-training."""
        step = int(row["step"])
        for key in ("meta_loss", "grad_norm", "seconds", "skipped_total", "valid_log_loss_T", "valid_log_loss_2T"):
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"meta_train/{key}", value, step)
        self.writer.flush()

    def evaluation(self, suite: str, results: list[Any]) -> None:
        """Mean validation-loss curve of each method on each task of an evaluation suite."""
        for res in results:
            for method, curves in res.curves.items():
                for k in range(res.steps):
                    values = [c.loss[k] for c in curves if math.isfinite(c.loss[k])]
                    if values:
                        self.writer.add_scalar(f"evaluate/{suite}/{res.spec.name}/{method}",
                                               sum(values) / len(values), k + 1)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
