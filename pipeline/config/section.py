"""The base of every params section, and the error a bad params file raises."""

from __future__ import annotations

from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict

from pipeline.config.paths import REPO_PARAMS_FILE


class ParamsError(ValueError):
    """A params file or section that does not match its schema."""


class Section(BaseModel):
    """Base for a params section: unknown keys are errors, values are checked on assignment.

    Every field is declared without a default (``Field(...)``): its value comes from
    params.yaml. A validator that blames one key starts its message with that key
    (``"tile_size: ..."``), which the error then names in full (``evaluate.tile_size``).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True)
    section: ClassVar[str]

    @classmethod
    def defaults(cls, **overrides: Any) -> Self:
        """This section of the repository's params.yaml (``paths.REPO_PARAMS_FILE``), whatever
        the current directory, with ``overrides`` replacing whole values; validated."""
        from pipeline.config.params import parse_section, read_params_file

        if not hasattr(cls, "section"):
            raise TypeError(f"{cls.__name__} is nested in a section: take that section's defaults")
        raw = read_params_file(REPO_PARAMS_FILE).get(cls.section)
        if raw is None:
            raise ParamsError(f"{REPO_PARAMS_FILE}: missing section '{cls.section}'")
        source = f"{REPO_PARAMS_FILE}" + (f" with {sorted(overrides)} replaced" if overrides else "")
        return parse_section(cls, raw | overrides, source)
