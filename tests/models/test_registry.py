"""Model families: ``model.family`` picks the params class (a discriminated union) and the builder."""

import json

import pytest
import torch

from pipeline.artifacts.model_dir import CONFIG_FILE, load_model, save_model
from pipeline.config.params import ModelParams, ParamsError, SmpModelParams, parse_section
from pipeline.models import registry
from pipeline.models.base import ModelMeta, SegmentationModel


def raw(**overrides):
    return ModelParams.defaults(encoder_weights=None).model_dump(mode="json") | overrides


def test_the_family_key_chooses_the_params_class():
    cfg = ModelParams.model_validate(raw(arch="FPN"))
    assert type(cfg) is SmpModelParams and isinstance(cfg, ModelParams) and cfg.arch == "FPN"


def test_an_unknown_family_names_the_key_and_the_families():
    with pytest.raises(ParamsError) as err:
        parse_section(ModelParams, raw(family="detectron"), "params.yaml")
    assert "model.family: unknown 'detectron'; allowed: 'smp'" in str(err.value)


def test_a_missing_family_is_a_missing_key():
    data = raw()
    del data["family"]
    with pytest.raises(ParamsError, match=r"model.family: missing key"):
        parse_section(ModelParams, data, "params.yaml")


def test_a_family_s_own_key_is_named_in_full():
    with pytest.raises(ParamsError) as err:
        parse_section(ModelParams, raw(in_channels=0), "params.yaml")
    assert "  model.in_channels: " in str(err.value) and "model.smp" not in str(err.value)
    with pytest.raises(ParamsError, match=r"model.colour: unknown key"):
        parse_section(ModelParams, raw(colour="red"), "params.yaml")


def test_build_model_goes_through_the_family():
    cfg = ModelParams.model_validate(raw(encoder_name="resnet18"))
    model = registry.build_model(cfg, num_classes=3)
    assert isinstance(model, SegmentationModel) and model.multiple == 32
    assert registry.normalisation(cfg) == (model.meta.mean, model.meta.std)


def test_without_pretrained_weights_keeps_everything_else():
    cfg = ModelParams.defaults()
    plain = cfg.without_pretrained_weights()
    assert plain.encoder_weights is None
    assert plain.model_dump() | {"encoder_weights": cfg.encoder_weights} == cfg.model_dump()


def test_a_model_folder_saved_before_families_loads_as_smp(tmp_path):
    cfg = ModelParams.model_validate(raw(encoder_name="resnet18"))
    model = registry.build_model(cfg, 3, ModelMeta(class_names=("a", "b", "c"))).eval()
    save_model(tmp_path, model, cfg, 3)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    del config["model"]["family"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    loaded = load_model(tmp_path)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
