"""``pipeline.artifacts.storage``: the shared storage, a local folder or S3 (a real moto server
on loopback)."""

import pytest

from pipeline.artifacts import storage as st
from pipeline.config import paths
from tests.s3_server import S3Server, authenticating


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        server.make_bucket("seg")
        yield server


@pytest.fixture
def s3_env(s3, monkeypatch):
    for key, value in s3.env("s3://seg/team/run").items():
        monkeypatch.setenv(key, value)
    return s3


def test_unset_means_the_repository_folders(monkeypatch):
    monkeypatch.delenv(paths.ENV_STORAGE_URI, raising=False)
    assert st.storage_from_env() is None


@pytest.mark.parametrize("uri, message", [
    ("gs://bucket/x", "expected s3://bucket/prefix or a local folder, not a gs:// URI"),
    ("s3:///prefix", "the URI names no bucket"),
])
def test_a_uri_of_the_wrong_kind_is_refused_naming_the_setting(monkeypatch, uri, message):
    monkeypatch.setenv(paths.ENV_STORAGE_URI, uri)
    with pytest.raises(st.StorageError, match=f"SEG_STORAGE_URI='{uri}': {message}"):
        st.storage_from_env()


def test_an_endpoint_must_be_a_url(monkeypatch):
    monkeypatch.setenv(paths.ENV_STORAGE_URI, "s3://b/p")
    monkeypatch.setenv(paths.ENV_S3_ENDPOINT_URL, "127.0.0.1:9000")
    with pytest.raises(st.StorageError, match="SEG_S3_ENDPOINT_URL='127.0.0.1:9000': expected an http"):
        st.storage_from_env()


def test_files_round_trip_on_s3_and_appear_whole(s3_env):
    store = st.storage_from_env()
    assert store.remote and store.root() == "seg/team/run" and store.uri_of("x") == "s3://seg/team/run/x"
    st.check(store)
    run = store.location("ray_results", "train-abc")
    assert not run.exists() and run.files() == []
    run.child("mlflow_run_id").write_text("1234")
    run.child("progress", "000001.json").write_text("{}")
    assert run.child("mlflow_run_id").read_text() == "1234" and run.child("mlflow_run_id").is_file()
    assert run.files() == ["mlflow_run_id"] and run.child("progress").files() == ["000001.json"]
    assert "team/run/ray_results/train-abc/mlflow_run_id" in s3_env.keys("seg")
    run.delete()
    assert not run.exists() and s3_env.keys("seg", "team/run/ray_results/train-abc") == []
    assert not [k for k in s3_env.keys("seg") if ".probe-" in k]        # the check cleans up


def test_a_local_folder_works_the_same(tmp_path, monkeypatch):
    monkeypatch.setenv(paths.ENV_STORAGE_URI, str(tmp_path / "shared"))
    store = st.storage_from_env()
    assert not store.remote
    st.check(store)
    file = store.location("ray_results", "r", "mlflow_run_id")
    file.write_text("1")
    assert (tmp_path / "shared" / "ray_results" / "r" / "mlflow_run_id").read_text() == "1"
    assert not list((tmp_path / "shared" / "ray_results" / "r").glob(".*.tmp"))


def test_a_folder_is_published_once_per_content(s3_env, tmp_path):
    data = tmp_path / "prepared"
    (data / "train").mkdir(parents=True)
    (data / "train" / "part-0.parquet").write_bytes(b"a" * 10)
    (data / "val.parquet").write_bytes(b"b")
    files = sorted(p for p in data.rglob("*") if p.is_file())
    store = st.storage_from_env()
    first = st.publish_dir(data, files, store, "prepared")
    assert first.files() == [st.COMPLETE_MARKER, "val.parquet"]
    assert first.child("train", "part-0.parquet").read_bytes() == b"a" * 10
    assert first.child(st.COMPLETE_MARKER).read_text() == "train/part-0.parquet\nval.parquet"
    stamp = s3_env.client().head_object(Bucket="seg", Key=first.path.partition("/")[2] + "/val.parquet")
    again = st.publish_dir(data, files, store, "prepared")
    assert again.path == first.path           # the same content: nothing uploaded again
    assert s3_env.client().head_object(Bucket="seg", Key=first.path.partition("/")[2] + "/val.parquet")[
        "LastModified"] == stamp["LastModified"]
    (data / "val.parquet").write_bytes(b"c")
    assert st.publish_dir(data, files, store, "prepared").path != first.path


def test_a_missing_bucket_is_refused_naming_the_uri(s3, monkeypatch):
    for key, value in s3.env("s3://no-such-bucket/x").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(st.StorageError, match=r"SEG_STORAGE_URI=s3://no-such-bucket/x: bucket "
                                              r"'no-such-bucket' does not exist at "
                                              r"SEG_S3_ENDPOINT_URL=http://127.0.0.1:\d+"):
        st.check(st.storage_from_env())


def test_an_unreachable_endpoint_is_refused_naming_it(monkeypatch):
    from tests.factories import free_port

    monkeypatch.setenv(paths.ENV_STORAGE_URI, "s3://seg/x")
    monkeypatch.setenv(paths.ENV_S3_ENDPOINT_URL, f"http://127.0.0.1:{free_port()}")
    for key, value in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(st.StorageError, match=r"SEG_STORAGE_URI=s3://seg/x: the endpoint at "
                                              r"SEG_S3_ENDPOINT_URL=http://127.0.0.1:\d+ cannot be reached"):
        st.check(st.storage_from_env())


def test_denied_credentials_are_refused_naming_the_bucket(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
    with authenticating(), pytest.raises(st.StorageError, match=r"SEG_STORAGE_URI=s3://seg/team/run: access "
                                                                r"denied to bucket 'seg'"):
        st.check(st.storage_from_env())
