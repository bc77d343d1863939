"""pipeline.engine.allocator: freed memory is reused instead of faulted in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline.engine import allocator

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings")

# Allocate, touch and free 64 MiB five times in a thread; print the page faults taken.
PROBE = r"""
import ctypes, resource, sys, threading
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "mallopt":
    from pipeline.engine.allocator import keep_freed_memory
    assert keep_freed_memory()
def touch():
    p = libc.malloc(64 << 20); ctypes.memset(p, 1, 64 << 20); libc.free(p)
def run():
    touch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        touch()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=run); t.start(); t.join()
"""


def faults(mode: str, env: dict[str, str]) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True,
                         check=True)
    return int(out.stdout)


def test_default_allocator_faults_the_block_in_each_time():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    assert faults("default", env) > 5 * 10_000          # 64 MiB is 16384 pages


def test_worker_env_makes_a_new_process_reuse_freed_memory():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | allocator.worker_env({})
    assert faults("default", env) < 1_000


def test_keep_freed_memory_applies_to_the_running_process():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    assert faults("mallopt", env) < 1_000


def test_worker_env_keeps_the_callers_tunables_last():
    env = allocator.worker_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"})
    assert env["GLIBC_TUNABLES"].startswith("glibc.malloc.mmap_max=0:")
    assert env["GLIBC_TUNABLES"].endswith(":glibc.malloc.arena_max=4")
