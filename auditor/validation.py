"""Readable pydantic validation errors: one line per problem with the key path and a close match (no torch)."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from auditor.registry import did_you_mean

_ALIASES = {"class_": "class"}


def _model_fields_at(model: type[BaseModel], loc: tuple[str | int, ...]) -> list[str]:
    """Field names of the (nested) model found at ``loc``; empty when ``loc`` is not a model."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or not isinstance(part, str):
            return []
        field = current.model_fields.get(part)
        if field is None:
            return []
        current = _model_in(field.annotation)
    return list(current.model_fields) if isinstance(current, type) and issubclass(current, BaseModel) else []


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def format_validation_error(err: ValidationError, source: str, model: type[BaseModel]) -> str:
    """One line per problem: ``source: key.path: message (got value); did you mean ...``.

    ``model`` is the validated model (for the allowed keys of an unknown-key error).
    """
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p in ("function-after", "function-before")))
        # pydantic adds the union member / literal tag to the location; keep the config's own keys
        keys = [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith(("literal", "list"))))]
        path = ".".join(keys) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            known = _model_fields_at(model, tuple(keys[:-1]))
            known = [_ALIASES.get(k, k) for k in known]
            msg = f"unknown key{did_you_mean(keys[-1], known)}" + (f" (allowed: {', '.join(known)})" if known else "")
            lines.append(f"{source}: {path}: {msg}")
            continue
        given = e.get("input")
        shown = "" if isinstance(given, dict) or e["type"] == "missing" else f" (got {given!r})"
        lines.append(f"{source}: {path}: {msg}{shown}")
    return "\n".join(dict.fromkeys(lines))
