"""CPU priority of a local Ray cluster's own processes, below its training workers.

Data-parallel workers step in lockstep: each waits for every other at each gradient
all-reduce, so whenever a core runs something else, one worker falls behind and the
others wait for it. A local cluster runs some twenty processes of its own (GCS, raylet,
dashboard, the Train controller, Ray Data's actors ...), each waking a few times a second;
on a machine with as many training threads as cores, their CPU time becomes the workers'
waiting time. At the lowest priority they run when a core is idle instead of preempting
a worker (measured on the 2-core machine: README, "Training").

Nice 19 alone is not enough: each of Ray's actor processes wakes about 75 times a second
(its signal check), and a thread waking at nice 19 still preempts the running worker at
once. Under the SCHED_BATCH policy a waking thread does not preempt: it runs at the next
scheduler tick or on an idle core, and keeps nice 19's small share, so it is delayed but
never starved. (SCHED_IDLE, which gives it only idle cores, starved the cluster's own
queries: Ray Train's placement-group cleaner logged failed State API calls and some
fifteen threads stayed queued.) A process may set either on its own processes without
privilege.

Linux keeps a nice value and a policy per thread, and a daemon's work runs in its other
threads (gRPC, asio, ...), so every thread of a lowered process goes down, not only its
main one. The workers themselves must run at normal priority (``RAY_worker_niceness=0``
for a cluster the stage starts: Ray's default of 15 put their compute below the daemons'
threads).

Only for a cluster the train stage started itself (``pipeline.train.init_ray``): its
processes all descend from the stage's process. A cluster that was joined is left alone.
"""

from __future__ import annotations

import os
from collections.abc import Collection

import psutil

BACKGROUND_NICE = 19     # the lowest priority a process may give itself or its own children
# Left at normal priority: the raylet starts every later worker process (a replacement
# training worker, a Ray Data task's), which inherits its nice value, and it serves the
# workers' object and lease requests.
WORKER_LAUNCHERS = frozenset({"raylet"})


def lower_background(root: int, keep: Collection[int], nice: int = BACKGROUND_NICE) -> list[int]:
    """Set ``nice`` on every thread of every descendant of process ``root`` except those in
    ``keep`` (the training workers) and the ``WORKER_LAUNCHERS``; ``root`` itself, idle in
    its wait for the result, is left as it is. Returns the pids lowered. A process or thread that exits meanwhile, or
    that is not this user's, is skipped: priority is an optimisation, never a reason to
    fail a training."""
    lowered = []
    try:
        descendants = psutil.Process(root).children(recursive=True)
    except psutil.Error:
        return lowered
    for process in descendants:
        if process.pid in keep:
            continue
        try:
            if process.name() in WORKER_LAUNCHERS:
                continue
            threads = [thread.id for thread in process.threads()]
        except psutil.Error:
            continue
        if any([_lower(tid, nice) for tid in threads]):     # every thread, no short cut
            lowered.append(process.pid)
    return lowered


def _lower(tid: int, nice: int) -> bool:
    """Thread ``tid`` under SCHED_BATCH (where the platform has it) at ``nice`` at least (on
    Linux a thread id names one thread for ``setpriority`` and ``sched_setscheduler``);
    whether it is there now."""
    try:
        if hasattr(os, "SCHED_BATCH") and os.sched_getscheduler(tid) == os.SCHED_OTHER:
            os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))     # keeps the nice value
        if os.getpriority(os.PRIO_PROCESS, tid) < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        return True
    except OSError:
        return False
