"""Readable config errors (no torch): pydantic validation errors, one line per problem with the key path and a
close match; YAML read strictly (a key given twice in one mapping is an error, not the last one winning)."""

from __future__ import annotations

import types
import typing
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from auditor.errors import ConfigError
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


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (plain YAML keeps the last one)."""


def _unique_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(f"key {key!r} is given twice (lines {seen[key]} and {line}); keep one")
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_yaml(text: str, source: str) -> Any:
    """Parse YAML read from ``source``; invalid YAML or a duplicate key is a ``ConfigError`` naming it."""
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
