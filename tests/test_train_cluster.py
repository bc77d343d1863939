"""Training across a two-node Ray cluster on one machine (``ray.cluster_utils.Cluster``).

The cluster and the training run in a fresh Python process, so that no Ray state of
other tests in this session can leak in.
"""

import os
import subprocess
import sys
import textwrap

from tests.conftest import only_run, write_params

SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import ray
    from ray.cluster_utils import Cluster
    from pipeline import train

    data, out = Path(sys.argv[1]), Path(sys.argv[2])
    # Two CPUs a node: half for the worker, one whole CPU left for Ray Data's read tasks.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        train.train(data, out / "model", out / "metrics.json", out / "params.yaml", out / "ray_results")
    finally:
        ray.shutdown()
        cluster.shutdown()
""")


def test_two_node_cluster_one_worker_per_node(prepared, env):
    write_params(env / "params.yaml", epochs=1, placement_strategy="STRICT_SPREAD")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(prepared), str(env)], cwd=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, run = only_run(os.environ["MLFLOW_TRACKING_URI"])
    assert client.get_metric_history(run.info.run_id, "nodes")[-1].value == 2
    assert (env / "model" / "model.pt").is_file()
