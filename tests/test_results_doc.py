"""``bench/results_doc.py``: docs/results.md as sections, each rewritten by its own script."""

import pytest

from bench.results_doc import HEADER, read_section, write_section


def test_a_section_is_replaced_and_the_others_are_left_as_they_are(tmp_path):
    doc = tmp_path / "docs" / "results.md"
    write_section(doc, "archs", "## Architectures\n\n| a | b |")
    write_section(doc, "refine", "## Refinement\n\nfirst")
    write_section(doc, "refine", "## Refinement\n\nsecond")
    text = doc.read_text()
    assert text.startswith(HEADER) and text.count("<!-- section: refine -->") == 1
    assert read_section(doc, "refine") == "## Refinement\n\nsecond"
    assert read_section(doc, "archs") == "## Architectures\n\n| a | b |"
    assert text.index("archs") < text.index("refine") and read_section(doc, "losses") is None
    assert not list(doc.parent.glob(".*.tmp"))


def test_a_section_name_is_a_plain_word(tmp_path):
    with pytest.raises(ValueError, match="lower-case letters, digits and dashes only"):
        write_section(tmp_path / "r.md", "a -->", "x")
