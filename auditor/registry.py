"""A tiny name -> item registry: one per family (CAM methods, metrics, analyses).

Duplicate names are an error at import time; unknown names raise with the closest matches, so a typo in a
config or on the command line says what was probably meant.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def close_matches(name: str, candidates: list[str], n: int = 3) -> list[str]:
    """Return up to ``n`` candidates that look like ``name`` (difflib ratio >= 0.5)."""
    return difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)


def did_you_mean(name: str, candidates: list[str]) -> str:
    """Format a ``; did you mean 'x'?`` suffix, or an empty string when nothing is close."""
    matches = close_matches(name, candidates)
    if not matches:
        return ""
    return "; did you mean " + " or ".join(repr(m) for m in matches) + "?"


def merge_options(owner: str, defaults: Mapping[str, Any], given: Mapping[str, Any] | None) -> dict[str, Any]:
    """``defaults`` overlaid with ``given``; an unknown option name raises with close matches.

    Args:
        owner: what the options belong to, for the message (``method 'occlusion'``).
        defaults: option names and default values.
        given: user-supplied options.
    """
    merged = dict(defaults)
    for key, value in (given or {}).items():
        if key not in defaults:
            raise ValueError(
                f"unknown option {key!r} for {owner}{did_you_mean(key, list(defaults))} "
                f"(options: {', '.join(defaults) or 'none'})"
            )
        merged[key] = value
    return merged


class Registry(Generic[T]):
    """Ordered mapping of snake_case names to items of one family.

    Args:
        family: what the items are, used in error messages ("CAM method", "metric").
    """

    def __init__(self, family: str) -> None:
        self.family = family
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        """Register ``item`` under ``name``; a second registration of the same name raises."""
        if not name.isidentifier() or name != name.lower():
            raise ValueError(f"{self.family} name {name!r} must be a lower-case snake_case identifier")
        if name in self._items:
            raise ValueError(f"{self.family} {name!r} is registered twice")
        self._items[name] = item
        return item

    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(self._items)
            raise ValueError(
                f"unknown {self.family} {name!r}{did_you_mean(name, list(self._items))} (known: {known})"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        """All registered names, in registration order."""
        return list(self._items)

    def items(self) -> list[tuple[str, T]]:
        """All ``(name, item)`` pairs, in registration order."""
        return list(self._items.items())

    def values(self) -> list[T]:
        """Registered items in registration order."""
        return [item for _, item in self.items()]
