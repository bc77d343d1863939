"""Command line: ``python -m pipeline.client IMAGE_OR_DIR... --out DIR``, a batch client of
the served model. Its code is ``pipeline.serving.client``."""

from pipeline.serving.client import main

if __name__ == "__main__":
    main()
