"""``Task.targets_of``: one target per row from a task's target columns."""

from __future__ import annotations

from pipeline.tasks.instance import InstanceTask
from pipeline.tasks.semantic import SemanticTask


class TwoColumnTask(SemanticTask):
    target_columns = ("panoptic", "segments")


def test_one_target_column_is_passed_through_as_it_is():
    column = [b"m0", b"m1"]
    assert SemanticTask().targets_of({"image": [b"i0", b"i1"], "mask": column}) is column
    assert InstanceTask().targets_of({"instances": [[], [{"class": 0}]]}) == [[], [{"class": 0}]]


def test_several_target_columns_become_a_tuple_per_row_in_column_order():
    batch = {"image": [b"i0", b"i1"], "segments": [["s0"], []], "panoptic": [b"p0", b"p1"]}
    assert TwoColumnTask().targets_of(batch) == [(b"p0", ["s0"]), (b"p1", [])]
