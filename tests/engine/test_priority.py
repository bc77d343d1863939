"""The local cluster's own processes go below the training workers' CPU priority."""

import os
import subprocess
import sys
import time

import psutil

from pipeline.engine import priority

TREE = """
import subprocess, sys, time
kids = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
print(" ".join(str(k.pid) for k in kids), flush=True)
time.sleep(60)
"""


def test_every_descendant_but_the_workers_is_lowered():
    root = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    try:
        worker, other = map(int, root.stdout.readline().split())
        lowered = priority.lower_background(root.pid, keep={worker})
        assert lowered == [other]
        assert psutil.Process(other).nice() == priority.BACKGROUND_NICE
        assert psutil.Process(worker).nice() == psutil.Process(root.pid).nice() == os.nice(0)
    finally:
        for process in psutil.Process(root.pid).children(recursive=True) + [psutil.Process(root.pid)]:
            process.kill()
        root.wait(timeout=30)


def test_a_process_that_is_gone_is_no_error():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=30)
    time.sleep(0.1)
    assert priority.lower_background(gone.pid, keep=set()) == []
