"""A train stage killed mid-run (driver, workers and all) resumes when it is run again."""

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import only_run, write_params


def start_stage(env, prepared) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipeline.train", "--data", str(prepared), "--out", str(env / "model"),
           "--metrics", str(env / "metrics.json"), "--params", str(env / "params.yaml"),
           "--storage", str(env / "ray_results")]
    # Its own session, so that killing the group takes the local Ray cluster down with it.
    return subprocess.Popen(cmd, cwd=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def kill_session(proc: subprocess.Popen) -> None:
    sid = os.getsid(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for p in psutil.process_iter():          # Ray daemons that left the group, if any
        try:
            if os.getsid(p.pid) == sid:
                p.kill()
        except (psutil.Error, ProcessLookupError, PermissionError):
            pass


@pytest.mark.slow          # a real Ray Train run killed or repeated: 80-110 s
def test_stage_killed_mid_run_resumes_from_its_checkpoint_and_mlflow_run(prepared, env):
    write_params(env / "params.yaml", epochs=4, num_workers=1)
    proc = start_stage(env, prepared)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        snapshots = list((env / "ray_results").glob("train-*/checkpoint_manager_snapshot.json"))
        if snapshots and "checkpoint_" in snapshots[0].read_text():
            break
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    else:
        raise AssertionError("no checkpoint within 240 s")
    kill_session(proc)
    assert not (env / "metrics.json").exists()
    client, first = only_run(os.environ["MLFLOW_TRACKING_URI"])

    rerun = start_stage(env, prepared)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out[-3000:]

    client, run = only_run(os.environ["MLFLOW_TRACKING_URI"])         # the same run, continued
    assert run.info.run_id == first.info.run_id
    starts = [m.value for m in client.get_metric_history(run.info.run_id, "start_epoch")]
    assert starts[0] == 0 and starts[-1] >= 1
    assert sorted({m.step for m in client.get_metric_history(run.info.run_id, "val_miou")}) == [0, 1, 2, 3]
    # The resumed stage prints the epochs it trains, each once, and not the earlier ones again.
    printed = re.findall(r"^epoch (\d+)/4  ", out, re.MULTILINE)
    assert printed == [str(e + 1) for e in range(int(starts[-1]), 4)], out[-3000:]
    assert (env / "metrics.json").is_file() and (env / "model" / "model.pt").is_file()
