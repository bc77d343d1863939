"""Clear outputs, execution counts, run timings and the kernel's version details from
notebooks, in place: they are committed clean (tests/test_notebooks.py checks) and
executed by the tests instead.

    python notebooks/strip_outputs.py notebooks/*.ipynb
"""

import sys

import nbformat


def strip(path: str) -> None:
    nb = nbformat.read(path, as_version=4)
    nb.metadata["language_info"] = {"name": "python"}     # the kernel fills in the rest when run
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.write(nb, path)


def main() -> None:
    for path in sys.argv[1:]:
        strip(path)
        print("stripped", path)


if __name__ == "__main__":
    main()
