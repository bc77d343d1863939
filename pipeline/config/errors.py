"""Readable params errors: one line per dotted key (``model.family: unknown 'x'; ...``)
from a pydantic ``ValidationError`` of a section."""

from __future__ import annotations

from pydantic import BaseModel, ValidationError


def format_errors(exc: ValidationError, model: type[BaseModel], source: str) -> str:
    """One line per dotted key: the alternatives of a union (``int | tuple``) share a line."""
    found: dict[str, list[str]] = {}
    for err in exc.errors():
        inner, names = _walk(model, err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        # A validator's message may start with the key it blames ("tile_size: ...").
        blamed, sep, rest = msg.partition(": ")
        if sep and inner is not None and blamed.split(".")[0] in inner.model_fields:
            names, msg = [*names, *blamed.split(".")], rest
        key = ".".join([model.section, *names])
        if err["type"] in ("union_tag_not_found", "union_tag_invalid"):   # the model.family key
            tag = err["ctx"]["discriminator"].strip("'")
            key = ".".join([model.section, tag])
            msg = ("missing key; params.yaml must set it (the code has no defaults)"
                   if err["type"] == "union_tag_not_found" else
                   f"unknown {err['ctx']['tag']!r}; allowed: {err['ctx']['expected_tags']}")
        elif err["type"] == "extra_forbidden":
            parent, _ = _walk(model, err["loc"][:-1])
            msg = f"unknown key; allowed keys: {', '.join(parent.model_fields if parent else ())}"
        elif err["type"] == "missing" and str(err["loc"][-1]) in getattr(
                _walk(model, err["loc"][:-1])[0], "model_fields", ()):
            msg = "missing key; params.yaml must set it (the code has no defaults)"
        else:
            given = err.get("input")
            msg += "" if isinstance(given, dict) or blamed in names else f" (got {given!r})"
        found.setdefault(key, [])
        if msg not in found[key]:
            found[key].append(msg)
    lines = [f"{source}: invalid section '{model.section}':"]
    lines += [f"  {key}: {'; or: '.join(msgs)}" for key, msgs in found.items()]
    return "\n".join(lines)


def _walk(model: type[BaseModel], loc: tuple) -> tuple[type[BaseModel] | None, list[str]]:
    """Follow ``loc`` from ``model``: (the nested model it ends in, or None inside a plain
    field; the names that make its dotted key). pydantic's union-branch and validator tags
    (``int``, ``tuple[int, int]``, ``function-after[...]``, ``[key]``) are left out."""
    names: list[str] = []
    current: type[BaseModel] | None = model
    for part in loc:
        variants = getattr(current, "variants", None) or {}
        if str(part) in variants:      # the branch of a discriminated union: its class, no name
            current = variants[str(part)]
        elif current is not None and str(part) in current.model_fields:
            names.append(str(part))
            ann = current.model_fields[str(part)].annotation
            current = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        elif isinstance(part, int) or not _is_tag(part):
            names.append(str(part))
            current = None
    return current, names


def _is_tag(part: str) -> bool:
    # "int", "tuple[int, int]", "literal['auto']", "constrained-float", "function-after[...]", "[key]"
    return part in ("int", "float", "str", "bool", "none") or "[" in part or "-" in part
