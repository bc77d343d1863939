"""``train.max_minutes``: a wall-clock budget for a training's epochs.

The budget covers the epochs themselves, training and validation, counted over the whole
run (a resumed run goes on from the time its checkpoint recorded); starting Ray and reading
the data before the first epoch are not in it. After each epoch the run plans how many
epochs fit: the epochs done, plus as many more as the time left holds at the last epoch's
pace, never more than ``train.epochs``. Training stops when the next epoch would not end
within the budget, so it ends within it (at least one epoch always runs), and the learning
rate schedule is stretched or shrunk to end with the planned epochs, so the last epoch
trains at the schedule's low end as an un-budgeted run's would. Ray Train keeps the best
epoch's checkpoint as always.
"""

from __future__ import annotations


def planned_epochs(max_epochs: int, done: int, elapsed_s: float, epoch_s: float,
                   budget_s: float | None) -> int:
    """How many epochs the run trains in all, given ``done`` epochs in ``elapsed_s`` seconds, the
    last one lasting ``epoch_s``: ``max_epochs`` without a budget; else the done ones plus the
    ones that fit in what is left of ``budget_s`` at that pace, between ``done`` and ``max_epochs``."""
    if budget_s is None:
        return max_epochs
    more = int((budget_s - elapsed_s) // epoch_s) if epoch_s > 0 else max_epochs
    return max(done, min(max_epochs, done + max(0, more)))
