import copy
import re

import annotated_types
import pytest
import yaml
from pydantic import BaseModel

from pipeline.config import paths
from pipeline.config.params import (
    SECTIONS,
    DownloadParams,
    EvaluateParams,
    LossParams,
    ModelParams,
    ParamsError,
    PrepareParams,
    Section,
    TrainParams,
    default_params,
    load_params,
    parse_section,
    read_params_file,
)

REPO = yaml.safe_load(paths.REPO_PARAMS_FILE.read_text())


def write(tmp_path, data):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def repo_section(name, **overrides):
    """A full section of the repository's params.yaml with ``overrides``, as a raw mapping."""
    return copy.deepcopy(REPO[name]) | overrides


def nested_model(field) -> type[Section] | None:
    ann = field.annotation
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def schema_keys(model: type[BaseModel], prefix: str):
    """(dotted key, model, field name) for every field of ``model`` and of its nested sections."""
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}"
        yield key, model, name
        if (inner := nested_model(field)) is not None:
            yield from schema_keys(inner, key)


def file_keys(data: dict, model: type[BaseModel], prefix: str):
    """Dotted keys that ``data`` sets, following the schema into nested sections only (the
    entries of a mapping-valued field such as loss.terms are values, not keys)."""
    for name, value in data.items():
        key = f"{prefix}.{name}"
        yield key
        field = model.model_fields.get(name)
        inner = nested_model(field) if field is not None else None
        if inner is not None and isinstance(value, dict):
            yield from file_keys(value, inner, key)


def chosen_model(section: str, model: type[Section]) -> type[Section]:
    """The class that validates the repository's ``section``: for a discriminated union
    (``model.family``) the variant that params.yaml chooses."""
    variants = getattr(model, "variants", None)
    return variants[REPO[section]["family"]] if variants else model


CHOSEN = {s: chosen_model(s, m) for s, m in SECTIONS.items()}
ALL_FIELDS = [k for s, m in CHOSEN.items() for k in schema_keys(m, s)]
FILE_KEYS = [k for s, m in CHOSEN.items() for k in file_keys(REPO.get(s) or {}, m, s)]
SECTION_MODELS = [(s, m) for s, m in CHOSEN.items()] + [
    (key, nested_model(model.model_fields[name])) for key, model, name in ALL_FIELDS
    if nested_model(model.model_fields[name]) is not None
]


def deleted(data: dict, dotted: str) -> dict:
    data = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        node = node[part]
    del node[last]
    return data


def replaced(data: dict, dotted: str, value) -> dict:
    data = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        node = node[part]
    node[last] = value
    return data


def load_section_of(key: str, data: dict, tmp_path):
    section = key.split(".")[0]
    return load_params(SECTIONS[section], write(tmp_path, data))


def test_repository_params_file_is_valid():
    # The committed params.yaml must load with every registered section.
    data = read_params_file(paths.REPO_PARAMS_FILE)
    assert set(data) == set(SECTIONS)
    for model in SECTIONS.values():
        assert isinstance(load_params(model, paths.REPO_PARAMS_FILE), model)


# --- params.yaml is the only source of values ---------------------------------------------


def test_params_yaml_sets_every_field_and_nothing_else():
    assert sorted(FILE_KEYS) == sorted(key for key, _, _ in ALL_FIELDS)


@pytest.mark.parametrize("key", FILE_KEYS)
def test_deleting_any_key_from_params_yaml_is_an_error_naming_it(key, tmp_path):
    with pytest.raises(ParamsError) as err:
        load_section_of(key, deleted(REPO, key), tmp_path)
    assert f"  {key}: missing key" in str(err.value)


@pytest.mark.parametrize("section", list(SECTIONS))
def test_deleting_a_whole_section_is_an_error_naming_it(section, tmp_path):
    path = write(tmp_path, deleted(REPO, section))
    with pytest.raises(ParamsError, match=f"{path}: missing section '{section}'"):
        load_params(SECTIONS[section], path)


@pytest.mark.parametrize(("key", "model", "name"), ALL_FIELDS, ids=[k for k, _, _ in ALL_FIELDS])
def test_the_code_has_no_defaults(key, model, name):
    # Every field, nested sections included, must come from params.yaml.
    assert model.model_fields[name].is_required(), f"{key} has a default in code"


def test_section_defaults_read_the_repository_params_file_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)            # no params.yaml here
    assert TrainParams.defaults() == parse_section(TrainParams, REPO["train"])
    cfg = TrainParams.defaults(epochs=1, warmup_epochs=0)
    assert (cfg.epochs, cfg.warmup_epochs, cfg.crop_size) == (1, 0, tuple(REPO["train"]["crop_size"]))
    with pytest.raises(ParamsError, match=r"train\.epochs: .*greater than or equal to 1"):
        TrainParams.defaults(epochs=0)
    with pytest.raises(ParamsError, match=r"train\.epoch: unknown key"):
        TrainParams.defaults(epoch=3)


def test_nested_overrides_replace_the_whole_value():
    cfg = EvaluateParams.defaults(overlays={"samples": 1, "worst_per_class": 0})
    assert (cfg.overlays.samples, cfg.overlays.worst_per_class) == (1, 0)
    with pytest.raises(ParamsError, match=r"evaluate\.overlays\.worst_per_class: missing key"):
        EvaluateParams.defaults(overlays={"samples": 1})
    assert LossParams.defaults(terms={"focal": 1.0}).terms == {"focal": 1.0}   # not merged


def test_default_params_is_the_whole_file_with_section_overrides(tmp_path):
    data = default_params({"train": {"epochs": 2}, "loss": {"terms": {"ce": 1.0}}})
    assert set(data) == set(SECTIONS)
    assert data["train"] == REPO["train"] | {"epochs": 2}
    assert data["loss"]["terms"] == {"ce": 1.0}
    assert data["model"] == REPO["model"]
    path = write(tmp_path, data)                          # a params file every stage can load
    assert load_params(TrainParams, path).epochs == 2
    with pytest.raises(ParamsError, match="unknown section.*'trian'"):
        default_params({"trian": {"epochs": 2}})
    with pytest.raises(ParamsError, match=r"train\.epochs: .*greater than or equal to 1"):
        default_params({"train": {"epochs": 0}})
    assert default_params() == REPO


# --- validation of every section ----------------------------------------------------------


@pytest.mark.parametrize(("where", "model"), SECTION_MODELS, ids=[w for w, _ in SECTION_MODELS])
def test_every_section_refuses_an_unknown_key_and_lists_the_allowed(where, model, tmp_path):
    data = replaced(REPO, f"{where}.bogus_key", 1)
    with pytest.raises(ParamsError) as err:
        load_section_of(where, data, tmp_path)
    msg = str(err.value)
    assert f"  {where}.bogus_key: unknown key; allowed keys: {', '.join(model.model_fields)}" in msg


@pytest.mark.parametrize("key", [k for k, _, _ in ALL_FIELDS])
def test_every_field_refuses_a_wrong_type_naming_the_key(key, tmp_path):
    with pytest.raises(ParamsError) as err:
        load_section_of(key, replaced(REPO, key, [[["nested"]]]), tmp_path)
    lines = str(err.value).splitlines()[1:]
    # A list's items are named by position (prepare.classes.0).
    assert lines and all(line.startswith((f"  {key}: ", f"  {key}.")) for line in lines), lines
    assert "nested" in lines[0]


# A valid item for each list field whose length is bounded, to build too short or too long values.
ITEMS = {"prepare.classes": "c", "evaluate.scales": 1.0, "serve.scales": 1.0}


def sized(key, n):
    if key == "loss.terms":
        return {}                          # its only length bound: at least one term
    return [ITEMS[key]] * n if key in ITEMS else "a" * n


def out_of_range(key, model, name):
    """(value, bound) pairs just beyond each numeric or length bound of the field."""
    for bound in model.model_fields[name].metadata:
        if isinstance(bound, annotated_types.Ge):
            yield bound.ge - 1, bound.ge
        elif isinstance(bound, annotated_types.Gt):
            yield bound.gt, bound.gt
        elif isinstance(bound, annotated_types.Le):
            yield bound.le + 1, bound.le
        elif isinstance(bound, annotated_types.Lt):
            yield bound.lt, bound.lt
        elif isinstance(bound, annotated_types.MinLen):
            yield sized(key, bound.min_length - 1), bound.min_length
        elif isinstance(bound, annotated_types.MaxLen):
            yield sized(key, bound.max_length + 1), bound.max_length


BOUNDED = [(key, value, bound) for key, model, name in ALL_FIELDS
           for value, bound in out_of_range(key, model, name)]


def test_bounded_fields_are_found():
    # The walk below must see the bounds: a few of them by name.
    keys = {key for key, _, _ in BOUNDED}
    assert {"train.epochs", "train.lr", "prepare.val_fraction", "serve.port", "register.model_name",
            "evaluate.scales", "loss.terms", "evaluate.overlays.samples"} <= keys


@pytest.mark.parametrize(("key", "value", "bound"), BOUNDED,
                         ids=[f"{k}={str(v)[:12]}" for k, v, _ in BOUNDED])
def test_every_bounded_field_refuses_a_value_out_of_range_naming_the_key_and_bound(key, value, bound,
                                                                                     tmp_path):
    with pytest.raises(ParamsError) as err:
        load_section_of(key, replaced(REPO, key, value), tmp_path)
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == 1 and lines[0].startswith(f"  {key}: "), lines
    assert f"{bound:g}" in lines[0] if isinstance(bound, float) else str(bound) in lines[0]


# Ranges that a validator checks, beyond a single field's bounds: (key, section, values, message).
CROSS_FIELD = [
    ("download.folder", "download", {"dataset": "folder", "folder": None}, "'folder' needs a directory"),
    ("download.folder", "download", {"dataset": "camvid", "folder": "/x"}, "only used with dataset 'folder'"),
    ("prepare.train_resize", "prepare", {"train_resize": {"mode": "fixed", "size": 64}},
     r"mode 'fixed' needs size: \[height, width\]"),
    ("prepare.eval_resize", "prepare", {"eval_resize": {"mode": "none", "size": 64}},
     "size must be null when mode is 'none'"),
    ("prepare.eval_resize", "prepare", {"eval_resize": {"mode": "shorter_side", "size": 4}},
     "an integer of at least 8"),
    ("prepare.mask_format", "prepare", {"classes": ["a", "b"], "mask_format": "color"}, "needs palette"),
    ("prepare.palette", "prepare", {"classes": ["a", "b"], "palette": [[0, 0, 0]]}, "per entry of classes"),
    ("prepare.palette", "prepare", {"classes": ["a", "b"], "palette": [[0, 0, 0], [0, 0, 256]]}, "0..255"),
    ("prepare", "prepare", {"val_fraction": 0.45, "test_fraction": 0.45}, "below 0.9"),
    ("loss.terms", "loss", {"terms": {"ce": 0.0}}, "must be positive"),
    ("loss.class_weights", "loss", {"terms": {"weighted_ce": 1.0}, "class_weights": None}, "needs median"),
    ("train.crop_size", "train", {"crop_size": [16, 320]}, r"\[height, width\], each at least 32"),
    ("train.scale_range", "train", {"scale_range": [1.5, 1.25]}, "0 < low <= high"),
    ("train.warmup_epochs", "train", {"epochs": 2, "warmup_epochs": 2}, "less than epochs"),
    ("evaluate.tile_size", "evaluate", {"tile_size": [16, 512]}, "each at least 32"),
    ("evaluate.scales", "evaluate", {"scales": [1.0, 5.0]}, "between 0.25 and 4"),
    ("serve.tile_size", "serve", {"tile_size": [512, 8]}, "each at least 32"),
    ("serve.max_replica_pixels", "serve", {"max_pixels": 2_000_000, "max_replica_pixels": 1_000_000},
     "at least max_pixels"),
    ("serve.max_ongoing_requests", "serve", {"max_batch_size": 16, "max_ongoing_requests": 8},
     "at least max_batch_size"),
    ("serve.gpus_per_replica", "serve", {"gpus_per_replica": -1}, "greater than or equal to 0"),
    ("model.kwargs.aux_params", "model", {"kwargs": {"aux_params": {"classes": 3}}}, "classification head"),
]


@pytest.mark.parametrize(("key", "section", "values", "message"), CROSS_FIELD,
                         ids=[f"{k}-{m[:20]}" for k, _, _, m in CROSS_FIELD])
def test_cross_field_rules_name_the_key(key, section, values, message, tmp_path):
    data = copy.deepcopy(REPO)
    data[section] |= values
    with pytest.raises(ParamsError) as err:
        load_section_of(section, data, tmp_path)
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == 1 and lines[0].startswith(f"  {key}: "), lines
    assert re.search(message, lines[0]), lines[0]


# --- messages -------------------------------------------------------------------------------


def test_unknown_key_names_the_key_the_file_and_the_allowed_keys(tmp_path):
    path = write(tmp_path, replaced(REPO, "prepare.strickt", False))
    with pytest.raises(ParamsError) as err:
        load_params(PrepareParams, path)
    msg = str(err.value)
    assert "prepare.strickt: unknown key" in msg
    assert "strict" in msg and "images_per_shard" in msg
    assert str(path) in msg


def test_wrong_type_names_key_and_value(tmp_path):
    path = write(tmp_path, replaced(REPO, "prepare.images_per_shard", "many"))
    with pytest.raises(ParamsError, match=r"prepare\.images_per_shard: .*integer.*'many'"):
        load_params(PrepareParams, path)


def test_a_union_gives_one_line_for_the_key_not_one_per_alternative(tmp_path):
    path = write(tmp_path, replaced(REPO, "prepare.train_resize", {"mode": "fixed", "size": 3.5}))
    with pytest.raises(ParamsError) as err:
        load_params(PrepareParams, path)
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == 1 and lines[0].startswith("  prepare.train_resize.size: "), lines
    assert "integer" in lines[0] and "tuple" in lines[0] and "3.5" in lines[0]


def test_enum_lists_allowed_values(tmp_path):
    path = write(tmp_path, replaced(REPO, "download.dataset", "imagenet"))
    with pytest.raises(ParamsError) as err:
        load_params(DownloadParams, path)
    msg = str(err.value)
    assert "download.dataset" in msg and "'camvid'" in msg and "'folder'" in msg and "imagenet" in msg


def test_unknown_section_is_refused(tmp_path):
    path = write(tmp_path, REPO | {"prepair": {}})
    with pytest.raises(ParamsError, match="unknown section.*'prepair'.*allowed: download, prepare"):
        read_params_file(path)


def test_valid_sections_parse_to_typed_values():
    cfg = parse_section(PrepareParams, repo_section(
        "prepare", train_resize={"mode": "fixed", "size": [64, 96]},
        eval_resize={"mode": "shorter_side", "size": 128}))
    assert cfg.train_resize.size == (64, 96)
    assert cfg.eval_resize.size == 128
    assert cfg.strict is REPO["prepare"]["strict"]


def test_model_kwargs_aux_params_is_refused_naming_the_key(tmp_path):
    # smp's classification head makes the network return (masks, labels): the losses and the
    # training loop take masks only, so it must fail here and not inside the workers.
    path = write(tmp_path, replaced(REPO, "model.kwargs", {"aux_params": {"classes": 3}}))
    with pytest.raises(ParamsError) as err:
        load_params(ModelParams, path)
    line = str(err.value).splitlines()[1]
    assert line.startswith("  model.kwargs.aux_params: ") and "classification head" in line


@pytest.mark.parametrize("recipe", sorted((paths.REPO_PARAMS_FILE.parent / "recipes").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_recipe_is_a_whole_valid_params_file(recipe):
    """recipes/*.yaml replace params.yaml whole (README): every section present and valid."""
    data = read_params_file(recipe)
    for name, model in SECTIONS.items():
        parse_section(model, data.get(name), str(recipe))
