import pytest
import yaml

from pipeline.params import (
    DownloadParams,
    ParamsError,
    PrepareParams,
    load_params,
    parse_section,
    read_params_file,
)


def write(tmp_path, data):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_repository_params_file_is_valid():
    # The committed params.yaml must load with every registered section.
    data = read_params_file()
    assert isinstance(load_params(DownloadParams), DownloadParams)
    assert isinstance(load_params(PrepareParams), PrepareParams)
    assert {"download", "prepare"} <= set(data)


def test_unknown_key_names_the_key_and_the_allowed_keys(tmp_path):
    path = write(tmp_path, {"prepare": {"strickt": False}})
    with pytest.raises(ParamsError) as err:
        load_params(PrepareParams, path)
    msg = str(err.value)
    assert "prepare.strickt: unknown key" in msg
    assert "strict" in msg and "images_per_shard" in msg
    assert str(path) in msg


def test_unknown_nested_key_lists_the_nested_fields(tmp_path):
    path = write(tmp_path, {"prepare": {"train_resize": {"mode": "none", "height": 3}}})
    with pytest.raises(ParamsError) as err:
        load_params(PrepareParams, path)
    assert "prepare.train_resize.height: unknown key; allowed keys: mode, size" in str(err.value)


def test_wrong_type_names_key_and_value(tmp_path):
    path = write(tmp_path, {"prepare": {"images_per_shard": "many"}})
    with pytest.raises(ParamsError, match=r"prepare\.images_per_shard: .*integer.*'many'"):
        load_params(PrepareParams, path)


def test_out_of_range_names_the_bound(tmp_path):
    path = write(tmp_path, {"prepare": {"val_fraction": 0.7}})
    with pytest.raises(ParamsError, match=r"prepare\.val_fraction: .*less than 0\.5.*0\.7"):
        load_params(PrepareParams, path)


def test_enum_lists_allowed_values(tmp_path):
    path = write(tmp_path, {"download": {"dataset": "imagenet"}})
    with pytest.raises(ParamsError) as err:
        load_params(DownloadParams, path)
    msg = str(err.value)
    assert "download.dataset" in msg and "'camvid'" in msg and "'folder'" in msg and "imagenet" in msg


def test_unknown_section_is_refused(tmp_path):
    path = write(tmp_path, {"prepair": {}})
    with pytest.raises(ParamsError, match="unknown section.*'prepair'.*allowed: download, prepare"):
        read_params_file(path)


def test_cross_field_rules():
    with pytest.raises(ParamsError, match="needs download.folder"):
        parse_section(DownloadParams, {"dataset": "folder"})
    with pytest.raises(ParamsError, match="only used with dataset 'folder'"):
        parse_section(DownloadParams, {"dataset": "camvid", "folder": "/x"})
    with pytest.raises(ParamsError, match=r"mode 'fixed' needs size: \[height, width\]"):
        parse_section(PrepareParams, {"train_resize": {"mode": "fixed", "size": 64}})
    with pytest.raises(ParamsError, match="mask_format 'color' needs palette"):
        parse_section(PrepareParams, {"classes": ["a", "b"], "mask_format": "color"})
    with pytest.raises(ParamsError, match="one \\[r, g, b\\] per entry"):
        parse_section(PrepareParams, {"classes": ["a", "b"], "palette": [[0, 0, 0]]})


def test_valid_sections_parse_to_typed_values():
    cfg = parse_section(PrepareParams, {"train_resize": {"mode": "fixed", "size": [64, 96]},
                                        "eval_resize": {"mode": "shorter_side", "size": 128}})
    assert cfg.train_resize.size == (64, 96)
    assert cfg.eval_resize.size == 128
    assert cfg.strict is True
