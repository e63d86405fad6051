"""``best`` and early stopping: the best value of the task's selection metric so far, the step it
was reached at, and ``train.patience`` evaluations in a row without a gain stop the run."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EarlyStopping:
    patience: int | None  # train.patience (0 / None: never stop early)
    best_score: float = -1.0  # best value of the selection metric so far
    best_step: int | None = None  # the step of that evaluation
    checks_without_gain: int = 0  # evaluations since the last gain

    def note(self, score: float | None, step: int) -> bool:
        """Count one evaluation of the selection metric at ``step``: True when it beats the best so far."""
        if score is None:
            return False
        improved = score > self.best_score
        if improved:
            self.best_score, self.best_step, self.checks_without_gain = score, step, 0
        else:
            self.checks_without_gain += 1
        return improved

    @property
    def spent(self) -> bool:
        return bool(self.patience) and self.checks_without_gain >= self.patience
