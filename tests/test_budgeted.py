"""``bench/budgeted.py``: budgeted ``dvc exp run`` experiments and their ledger."""

import pytest

from bench.budgeted import Experiment, arguments, current, mapping_sets, ran_as, read_ledger, record

LOSS = Experiment("dice", {"loss.terms": {"weighted_ce": 0.5, "dice": 0.5}}, ("loss.focal_gamma=2",))


def test_a_mapping_is_replaced_whole_the_way_hydra_takes_it():
    assert mapping_sets("model.kwargs", {}) == ["model.kwargs={}"]
    assert mapping_sets("loss.terms", {"weighted_ce": 0.5, "hausdorff": 0.002}) == [
        "~loss.terms", "+loss.terms={weighted_ce: 0.5, hausdorff: 0.002}"]


def test_the_arguments_add_the_budget_and_a_plain_evaluation():
    args = arguments(LOSS, 2.5, "cmp-model")
    assert args[::2] == ["-S"] * (len(args) // 2)
    sets = args[1::2]
    assert sets[0] == "loss.focal_gamma=2"
    assert {"train.max_minutes=2.5", "train.epochs=10000", "evaluate.flip_tta=false", "evaluate.scales=[1.0]",
            "evaluate.postprocess=none", "register.onnx=false", "register.model_name=cmp-model"} <= set(sets)


def test_an_entry_or_an_experiment_counts_only_for_the_same_params_and_budget():
    entry = {"loss.terms": {"dice": 0.5, "weighted_ce": 0.5}, "minutes": 10}
    assert current(entry, LOSS, 10)
    assert not current(entry, LOSS, 5)
    assert not current({**entry, "loss.terms": {"dice": 1.0}}, LOSS, 10)
    assert not current(None, LOSS, 10)

    def shown(terms, minutes):
        return {"params": {"params.yaml": {"data": {"loss": {"terms": terms, "focal_gamma": 2},
                                                    "train": {"max_minutes": minutes}}}}}
    assert ran_as(shown({"weighted_ce": 0.5, "dice": 0.5}, 10), LOSS, 10)
    # An experiment of the same name that ran with other params is not taken for this one.
    assert not ran_as(shown({"weighted_ce": 1.0}, 10), LOSS, 10)
    assert not ran_as(shown({"weighted_ce": 0.5, "dice": 0.5}, 3), LOSS, 10)
    assert not ran_as({}, LOSS, 10)


def test_a_record_keeps_every_score_of_the_evaluation(tmp_path, monkeypatch):
    import bench.budgeted as budgeted

    monkeypatch.setattr(budgeted, "git_head", lambda repo: "abc1234")
    monkeypatch.setattr(budgeted, "epochs_trained", lambda name, repo: 7)
    data = {"metrics": {"metrics/evaluate.json": {"data": {
        "miou": 0.5, "boundary_miou": 0.3, "mean_hd95": 12.5, "eval_key": "8d65", "images": 233}}}}
    entry = record(LOSS, "loss-dice", 10, data, tmp_path, 11)
    assert entry["loss.terms"] == LOSS.key["loss.terms"] and entry["commit"] == "abc1234"
    assert entry["miou"] == 0.5 and entry["epochs"] == 7 and entry["experiment"] == "loss-dice"
    assert entry["scores"] == {"miou": 0.5, "boundary_miou": 0.3, "mean_hd95": 12.5, "images": 233}


def test_a_broken_ledger_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "results-archs.json"
    path.write_text("{not json")
    with pytest.raises(SystemExit, match="results-archs.json: not JSON"):
        read_ledger(path)
    path.write_text("[]")
    with pytest.raises(SystemExit, match="expected an object of rows by name"):
        read_ledger(path)
    assert read_ledger(tmp_path / "missing.json") == {}
