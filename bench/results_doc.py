"""``docs/results.md``: one section per benchmark script, each rewritten by its own script.

A section sits between ``<!-- section: NAME -->`` and ``<!-- /section: NAME -->``; ``write_section``
replaces the named one (or appends it) and leaves the others as they are, writing the file to a
temporary name and renaming it into place.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.utils.io import write_text_atomic

HEADER = ("# Results\n\nMeasured on this repository's benchmarks; each section is written by the script "
          "it names (do not edit by hand).\n")


def markers(name: str) -> tuple[str, str]:
    if not re.fullmatch(r"[a-z0-9-]+", name):
        raise ValueError(f"section name {name!r}: lower-case letters, digits and dashes only")
    return f"<!-- section: {name} -->", f"<!-- /section: {name} -->"


def write_section(path: Path, name: str, body: str) -> None:
    """Put ``body`` (markdown) in ``path`` as section ``name``."""
    start, end = markers(name)
    text = path.read_text() if path.exists() else HEADER
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    write_text_atomic(path, text)


def read_section(path: Path, name: str) -> str | None:
    """The body of section ``name`` of ``path``, or None."""
    start, end = markers(name)
    if not path.exists():
        return None
    found = re.search(re.escape(start) + r"\n(.*?)\n" + re.escape(end), path.read_text(), re.DOTALL)
    return found.group(1) if found else None
