"""The registry lock (pipeline.artifacts.registry_lock) against real MLflow stores: exclusive,
released, abandoned locks broken, a live holder waited for up to the timeout."""

import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from pipeline.artifacts.registry_lock import OWNER_TAG, LockTimeout, lock_name, registry_lock


@pytest.fixture(params=["file", "sqlite"])
def client(request, tmp_path, monkeypatch):
    if request.param == "file":
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")   # the deprecated store, still supported
        return MlflowClient((tmp_path / "mlruns").as_uri())
    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def held(client, name="m") -> bool:
    return any(m.name == lock_name(name) for m in client.search_registered_models())


def test_the_lock_is_a_registered_model_while_held_and_gone_after(client):
    with registry_lock(client, "m") as token:
        assert held(client)
        assert client.get_registered_model("m.lock").tags[OWNER_TAG] == token
    assert not held(client)
    with pytest.raises(RuntimeError), registry_lock(client, "m"):   # released on errors too
        raise RuntimeError("boom")
    assert not held(client)


def test_a_live_holder_is_waited_for_until_the_timeout(client):
    client.create_registered_model("m.lock", tags={OWNER_TAG: "other-host:1:abc"})
    start = time.monotonic()
    with pytest.raises(LockTimeout, match=r"'m\.lock'.*other-host:1:abc"), \
            registry_lock(client, "m", timeout_s=0.6, stale_s=60, poll_s=0.05):
        pass
    assert time.monotonic() - start >= 0.6
    assert held(client)                      # not ours to delete


def test_an_abandoned_lock_is_broken_after_the_stale_age(client):
    client.create_registered_model("m.lock", tags={OWNER_TAG: "crashed:1:abc"})
    start = time.monotonic()
    with registry_lock(client, "m", timeout_s=30, stale_s=0.5, poll_s=0.05) as token:
        assert client.get_registered_model("m.lock").tags[OWNER_TAG] == token
        assert time.monotonic() - start >= 0.5
    assert not held(client) and not held(client, "m.lock")          # the break lock is gone too


def test_concurrent_holders_never_overlap(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.search_registered_models()        # create the tables before the threads race
    inside, overlaps, entries = [0], [], []
    guard = threading.Lock()

    def work(i):
        with registry_lock(MlflowClient(client.tracking_uri), "m", timeout_s=60, poll_s=0.01):
            with guard:
                inside[0] += 1
                overlaps.append(inside[0])
            time.sleep(0.05)
            with guard:
                inside[0] -= 1
                entries.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(entries) == [0, 1, 2, 3] and max(overlaps) == 1


def test_a_lock_released_while_its_creation_failed_is_tried_again(tmp_path):
    """The sqlite store answers a create that lost the race by reading the winner, which may
    have released the lock in between: "not found" then means "try again", not an error
    (seen in CI as a register thread dying inside test_concurrent_holders_never_overlap)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    real, calls = client.create_registered_model, []

    def lost_then_released(name, *args, **kwargs):
        calls.append(name)
        if len(calls) == 1:     # what the store raises when the winner is gone before its read
            raise MlflowException(f"Registered Model with name={name} not found", RESOURCE_DOES_NOT_EXIST)
        return real(name, *args, **kwargs)

    client.create_registered_model = lost_then_released
    with registry_lock(client, "m", poll_s=0.01) as token:
        assert client.get_registered_model("m.lock").tags[OWNER_TAG] == token
    assert calls == ["m.lock", "m.lock"] and not held(client)
