"""CPU priority of a local Ray cluster's own processes, below its training workers.

Data-parallel workers step in lockstep: each waits for every other at each gradient
all-reduce, so whenever a core runs something else, one worker falls behind and the
others wait for it. A local cluster runs some twenty processes of its own (GCS, raylet,
dashboard, the Train controller, Ray Data's actors ...), each waking a few times a second;
on a machine with as many training threads as cores, their CPU time becomes the workers'
waiting time. At the lowest priority (nice 19) they get a small share of a busy core
(measured on the 2-core machine: README, "Training").

What this lowers is each process's main thread (psutil's ``nice``; Linux keeps the value
per thread), and Ray starts the workers themselves at nice 15. Lowering every thread and
starting the workers at nice 0 was measured (README, "Tests and benchmarks"): no gain
beyond run-to-run spread, and the GCS then logged failed actor kills at the start of each
panoptic training, so it was not kept.

Only for a cluster the train stage started itself (``pipeline.train.init_ray``): its
processes all descend from the stage's process. A cluster that was joined is left alone.
"""

from __future__ import annotations

from collections.abc import Collection

import psutil

BACKGROUND_NICE = 19     # the lowest priority a process may give itself or its own children


def lower_background(root: int, keep: Collection[int], nice: int = BACKGROUND_NICE) -> list[int]:
    """Set ``nice`` on every descendant of process ``root`` except those in ``keep`` (the
    training workers); ``root`` itself, idle in its wait for the result, is left as it is.
    Returns the pids lowered. A process that exits meanwhile, or that is not this user's,
    is skipped: priority is an optimisation, never a reason to fail a training."""
    lowered = []
    try:
        descendants = psutil.Process(root).children(recursive=True)
    except psutil.Error:
        return lowered
    for process in descendants:
        if process.pid in keep:
            continue
        try:
            if process.nice() < nice:
                process.nice(nice)
            lowered.append(process.pid)
        except psutil.Error:
            continue
    return lowered
