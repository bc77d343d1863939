"""The services a cluster whose nodes share no disk needs, on the shared storage of
``pipeline.artifacts.storage`` (``$SEG_STORAGE_URI``, ``$SEG_S3_ENDPOINT_URL``):

    python -m pipeline.cluster check           # the storage answers and takes writes
    python -m pipeline.cluster dvc-remote      # DVC's default remote: <storage>/dvc (.dvc/config.local)
    python -m pipeline.cluster mlflow-server   # MLflow server: SQL backend, artifacts in <storage>/mlflow

(``make storage-check``, ``make storage-remote``, ``make mlflow-server``; README, "Running on a
cluster"). The MLflow server proxies artifacts (``--serve-artifacts``): the nodes send models and
evaluation outputs to it over HTTP, and only the server needs the object store's credentials.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from pipeline.artifacts.storage import Storage, StorageError, check, storage_from_env
from pipeline.config import paths

DVC_REMOTE = "storage"                      # the remote's name in .dvc/config.local
DVC_PREFIX = "dvc"                          # its folder in the shared storage
MLFLOW_PREFIX = "mlflow"                    # the MLflow server's artifact folder in it
MLFLOW_BACKEND = "sqlite:///mlflow-server.db"


def required_storage() -> Storage:
    store = storage_from_env()
    if store is None:
        raise StorageError(f"{paths.ENV_STORAGE_URI} is not set: name the shared storage "
                           "(s3://bucket/prefix or a folder every node mounts)")
    check(store)
    return store


def dvc_remote_commands(store: Storage) -> list[list[str]]:
    """The ``dvc remote`` commands that make ``<storage>/dvc`` the default remote, in the
    repository's local (uncommitted) config: where a cluster keeps its data is the cluster's."""
    commands = [["remote", "add", "--local", "--force", "--default", DVC_REMOTE, store.uri_of(DVC_PREFIX)]]
    if store.remote and store.endpoint:
        commands.append(["remote", "modify", "--local", DVC_REMOTE, "endpointurl", store.endpoint])
    return commands


def mlflow_server_command(store: Storage | None, backend: str, host: str,
                          port: int) -> tuple[list[str], dict[str, str]]:
    """``mlflow server``'s command line and environment: the SQL ``backend`` store, the
    artifacts in ``<storage>/mlflow`` (``./mlartifacts`` without shared storage) proxied by the
    server."""
    destination = store.uri_of(MLFLOW_PREFIX) if store is not None else str(Path("mlartifacts").resolve())
    env = {"MLFLOW_DISABLE_TELEMETRY": "true"}
    if store is not None and store.remote and store.endpoint:
        env["MLFLOW_S3_ENDPOINT_URL"] = store.endpoint        # boto3's endpoint inside the server
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow if mlflow.exists() else "mlflow"), "server", "--backend-store-uri", backend,
               "--artifacts-destination", destination, "--serve-artifacts",
               "--host", host, "--port", str(port)]
    return command, env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check", help="the shared storage answers and takes writes")
    commands.add_parser("dvc-remote", help="make <storage>/dvc DVC's default remote (.dvc/config.local)")
    server = commands.add_parser("mlflow-server", help="an MLflow server, artifacts in <storage>/mlflow")
    server.add_argument("--backend", default=MLFLOW_BACKEND,
                        help=f"SQL backend store URI (default {MLFLOW_BACKEND})")
    server.add_argument("--host", default="0.0.0.0", help="where it listens (default every interface)")
    server.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    try:
        if args.command == "mlflow-server":
            store = storage_from_env()
            if store is not None:
                check(store)
            command, env = mlflow_server_command(store, args.backend, args.host, args.port)
            print(" ".join(command), flush=True)
            os.execvpe(command[0], command, os.environ | env)
        store = required_storage()
        if args.command == "check":
            print(f"{store.uri}: reachable and writable")
        else:
            for command in dvc_remote_commands(store):
                subprocess.run([sys.executable, "-m", "dvc", *command], check=True)
            print(f"dvc remote {DVC_REMOTE!r} (default): {store.uri_of(DVC_PREFIX)}")
    except StorageError as exc:
        raise SystemExit(f"cluster: {exc}") from None


if __name__ == "__main__":
    main()
