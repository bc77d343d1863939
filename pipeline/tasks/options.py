"""Task-specific query parameters of ``/predict`` (``Task.query_options``).

A task declares each parameter its answers read as a ``QueryOption``: a number in a closed
range, or one of a few words (``CHOICE``), with a default.
``pipeline.serving.api.parse_options`` refuses unknown, repeated and malformed values with a
400 that names the parameter and what it accepts, and hands the parsed values (defaults filled
in) to ``Task.answer`` as ``Options.task_options``; ``/metadata`` lists them (``describe``).
``REFINE`` (semantic segmentation's ``refine``) also changes how the image is predicted
(``pipeline.serving.service.Service.predictor_for``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

INTEGER = "integer"
NUMBER = "number"
CHOICE = "choice"
REFINE = "refine"       # the query parameter that picks a refinement (``Service`` predicts with it)
_INTEGER_TEXT = re.compile(r"[+-]?[0-9]+")


@dataclass(frozen=True)
class QueryOption:
    """One query parameter: an ``INTEGER`` or a ``NUMBER`` from ``minimum`` to ``maximum``
    (both included), or a ``CHOICE`` of ``choices`` (``choice``); ``default`` when the query
    leaves it out (None: the answer applies none)."""

    kind: str
    minimum: float = 0
    maximum: float = 0
    default: float | int | str | None = None
    description: str = ""
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in (INTEGER, NUMBER, CHOICE):
            raise ValueError(f"QueryOption kind {self.kind!r} is not {INTEGER!r}, {NUMBER!r} or {CHOICE!r}")
        if (self.kind == CHOICE) != bool(self.choices):
            raise ValueError("QueryOption: choices go with kind choice, and only with it")

    @classmethod
    def choice(cls, choices: tuple[str, ...], description: str = "") -> QueryOption:
        return cls(CHOICE, description=description, choices=choices)

    def accepted(self) -> str:
        """What the parameter takes, in words (for error messages)."""
        if self.kind == CHOICE:
            return "one of " + ", ".join(self.choices)
        what = "an integer" if self.kind == INTEGER else "a number"
        return f"{what} from {self.minimum:g} to {self.maximum:g}"

    def parse(self, name: str, raw: str) -> float | int | str:
        """The value of ``name=raw``; ``ValueError`` saying what is accepted otherwise."""
        value: float | int | None = None
        text = raw.strip()
        if self.kind == CHOICE:
            if text not in self.choices:
                raise ValueError(f"{name}={raw!r} is not {self.accepted()}")
            return text
        if self.kind == INTEGER:
            value = int(text) if _INTEGER_TEXT.fullmatch(text) else None
        else:
            try:
                value = float(text)
            except ValueError:
                value = None
        if value is None or not math.isfinite(value) or not self.minimum <= value <= self.maximum:
            raise ValueError(f"{name}={raw!r} is not {self.accepted()}")
        return value

    def describe(self) -> dict[str, Any]:
        """JSON-ready, for ``/metadata``."""
        if self.kind == CHOICE:
            return {"type": "string", "enum": list(self.choices), "default": self.default,
                    "description": self.description}
        return {"type": self.kind, "minimum": self.minimum, "maximum": self.maximum, "default": self.default,
                "description": self.description}
