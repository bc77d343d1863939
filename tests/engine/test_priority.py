"""The local cluster's own processes go below the training workers' CPU priority."""

import os
import shutil
import subprocess
import sys
import time

import psutil

from pipeline.engine import priority

# Each child runs threads besides its main one, as every Ray daemon does (gRPC, asio, ...).
CHILD = "import threading, time; [threading.Thread(target=time.sleep, args=(60,), daemon=True).start() for _ in range(3)]; time.sleep(60)"
TREE = f"""
import os, subprocess, sys, time
kids = [subprocess.Popen([sys.executable, "-c", {CHILD!r}]) for _ in range(2)]
while any(len(os.listdir(f"/proc/{{k.pid}}/task")) < 4 for k in kids):   # their threads started
    time.sleep(0.05)
print(" ".join(str(k.pid) for k in kids), flush=True)
time.sleep(60)
"""


def thread_nices(pid: int) -> list[int]:
    """The nice value of each thread of process ``pid``."""
    return sorted(os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir(f"/proc/{pid}/task"))


def thread_policies(pid: int) -> list[int]:
    """The scheduling policy of each thread of process ``pid``."""
    return sorted(os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{pid}/task"))


def test_every_descendant_but_the_workers_is_lowered():
    root = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    try:
        worker, other = map(int, root.stdout.readline().split())
        lowered = priority.lower_background(root.pid, keep={worker})
        assert lowered == [other]
        assert psutil.Process(other).nice() == priority.BACKGROUND_NICE
        assert psutil.Process(worker).nice() == psutil.Process(root.pid).nice() == os.nice(0)
        # Linux keeps a nice value per thread: every thread of a lowered process goes down
        # (a daemon's work runs in its other threads), none of a worker's.
        assert thread_nices(other) == [priority.BACKGROUND_NICE] * 4
        assert thread_nices(worker) == [os.nice(0)] * 4
        # A waking background thread must not preempt a worker: SCHED_BATCH, not SCHED_OTHER.
        assert thread_policies(other) == [os.SCHED_BATCH] * 4
        assert thread_policies(worker) == [os.SCHED_OTHER] * 4
    finally:
        for process in psutil.Process(root.pid).children(recursive=True) + [psutil.Process(root.pid)]:
            process.kill()
        root.wait(timeout=30)


def test_the_raylet_that_starts_workers_keeps_its_priority(tmp_path):
    """Workers inherit the raylet's nice value: lowered, it would start every later worker
    (a replacement training worker) at the background's priority."""
    raylet = tmp_path / "raylet"
    shutil.copy("/bin/sleep", raylet)
    root = subprocess.Popen([sys.executable, "-c", f"import subprocess; subprocess.run([{str(raylet)!r}, '60'])"])
    try:
        deadline = time.monotonic() + 30
        while not psutil.Process(root.pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        (child,) = psutil.Process(root.pid).children()
        assert child.name() == "raylet"
        assert priority.lower_background(root.pid, keep=set()) == []
        assert child.nice() == os.nice(0)
    finally:
        for process in psutil.Process(root.pid).children(recursive=True) + [psutil.Process(root.pid)]:
            process.kill()
        root.wait(timeout=30)


def test_a_process_that_is_gone_is_no_error():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=30)
    time.sleep(0.1)
    assert priority.lower_background(gone.pid, keep=set()) == []
