"""Where the training loop is: one object, saved in every checkpoint and restored on --resume."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from segtrain.history import is_better


@dataclass
class LoopState:
    """Global step, epochs done, the running loss of the current epoch, the best monitored value, the history.

    `epoch` counts completed epochs; `loss_sum` / `loss_steps` cover the steps of the epoch under way,
    so a run resumed mid-epoch reports the same epoch loss as an uninterrupted one. With `total_steps` (a
    budgeted run's plan) the last epoch ends there, which may be before its `steps_per_epoch`.
    """

    monitor: str
    steps_per_epoch: int
    epoch: int = 0
    global_step: int = 0
    loss_sum: float = 0.0
    loss_steps: int = 0
    best: Optional[float] = None
    best_epoch: int = 0
    rows: list = field(default_factory=list)
    total_steps: Optional[int] = None

    @property
    def step_in_epoch(self) -> int:
        return self.global_step - self.epoch * self.steps_per_epoch

    @property
    def epoch_steps(self) -> int:
        """Steps of the epoch under way: steps_per_epoch, or fewer for a last epoch that ends at total_steps."""
        if self.total_steps is None:
            return self.steps_per_epoch
        return max(0, min(self.steps_per_epoch, self.total_steps - self.epoch * self.steps_per_epoch))

    @property
    def steps_left_in_epoch(self) -> int:
        return self.epoch_steps - self.step_in_epoch

    @property
    def mean_loss(self) -> Optional[float]:
        return self.loss_sum / self.loss_steps if self.loss_steps else None

    def add_step_losses(self, losses) -> None:
        """Count a call's steps (their losses, one per step) towards the epoch under way."""
        self.loss_sum += float(sum(float(v) for v in losses))
        self.loss_steps += len(losses)
        self.global_step += len(losses)

    def finish_epoch(self, row: dict) -> bool:
        """Record the epoch's history row, start the next epoch; True when the monitored value improved."""
        self.rows.append(row)
        self.epoch += 1
        self.loss_sum, self.loss_steps = 0.0, 0
        value = row.get(self.monitor)
        improved = is_better(self.monitor, value, self.best)
        if improved:
            self.best, self.best_epoch = value, self.epoch
        return improved

    def epochs_without_improvement(self) -> int:
        """Validated epochs after the best one (epochs that did not validate do not count)."""
        return sum(1 for r in self.rows if int(r["epoch"]) > self.best_epoch and r.get(self.monitor) not in (None, ""))

    def best_text(self) -> str:
        return "none" if self.best is None or math.isnan(self.best) else f"{self.best:.4f}"
