"""The real CamVid copy from the mirror through download and prepare (slow: 187 MB)."""

import json

import numpy as np
import pytest

from pipeline.config import paths
from pipeline.config.params import PrepareParams
from pipeline.data import shards
from pipeline.data.sources import CAMVID
from pipeline.download import fetch_dataset
from pipeline.prepare import prepare

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mirror():
    root = paths.data_mirror()
    if root is None or not (root / "camvid").is_dir():
        pytest.skip(f"set {paths.ENV_DATA_MIRROR} to a folder holding camvid/")
    return root


def test_camvid_from_the_mirror_is_prepared_into_the_segnet_split(mirror, tmp_path):
    raw, how = fetch_dataset(CAMVID, tmp_path / "raw", mirror)
    assert how.startswith("mirror")
    _, how_again = fetch_dataset(CAMVID, tmp_path / "raw", mirror)
    assert how_again == "already present and verified"

    card = prepare("camvid", raw, tmp_path / "prepared", PrepareParams.defaults())
    assert {s: d["images"] for s, d in card["splits"].items()} == {"train": 367, "val": 101, "test": 233}
    classes = json.loads((tmp_path / "prepared" / "classes.json").read_text())
    assert classes["num_classes"] == 11 and classes["ignore_index"] == 11
    assert card["problems"] == {"errors": 0, "warnings": 0, "strict": True}
    freq = card["train_statistics"]["frequency"]
    assert freq["Road"] > freq["Building"] > freq["Sky"] > freq["Pedestrian"] > freq["Bicyclist"] > 0
    _, image, mask = next(shards.iter_samples(tmp_path / "prepared", "test"))
    assert image.shape == (360, 480, 3) and mask.shape == (360, 480)
    assert set(np.unique(mask)) <= set(range(12))
