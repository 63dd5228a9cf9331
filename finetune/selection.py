"""Honest epoch selection: the metric a task selects on, and the tracker that keeps the epoch with the
best validation figure (and its weights) beside the best test epoch the papers report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


def selection_metric(task: str) -> str:
    return "uar" if task == "classification" else "ccc"


@dataclass
class SelectionTracker:
    """Honest model selection: the epoch with the best VALIDATION metric (ties -> earlier epoch) is
    the reported one, with a copy of its weights; the best epoch on TEST is kept only to report the
    papers' protocol beside it."""

    metric: str
    history: list[dict] = field(default_factory=list)
    best_state: dict | None = None

    def update(self, epoch: int, val: dict, test: dict, state: Callable[[], dict]) -> None:
        previous = self.best_val
        self.history.append({"epoch": epoch, "val": val, "test": test})
        if previous is None or val[self.metric] > previous["val"][self.metric]:
            self.best_state = {k: v.detach().clone().cpu() for k, v in state().items()}

    @property
    def best_val(self) -> dict | None:
        if not self.history:
            return None
        return max(self.history, key=lambda h: (h["val"][self.metric], -h["epoch"]))

    @property
    def best_test(self) -> dict | None:
        if not self.history:
            return None
        return max(self.history, key=lambda h: (h["test"][self.metric], -h["epoch"]))
