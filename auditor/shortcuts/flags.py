"""Flags: the typed record every analysis emits, the severity scale, and the helpers that build flags.

A flag is ``{id, kind, class, attribute, region, severity, score, methods, message, evidence}`` (the
README's "Shortcut flags"); ``id = kind/class/attribute`` is stable across runs, so baselines can match
flags. A finding supported only by methods that failed the randomization test is downgraded one level.
This module imports no torch: ``auditor gate`` and the report read flags through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypedDict

import numpy as np

SCHEMA_VERSION = 1
SEVERITIES = ("low", "medium", "high")
SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}

Flag = TypedDict(
    "Flag",
    {
        "id": str,
        "kind": str,
        "class": str | None,
        "attribute": str | None,
        "region": list[float] | None,
        "severity": str,
        "score": float,
        "methods": list[str],
        "message": str,
        "evidence": dict[str, Any],
    },
)


class FlagsFile(TypedDict):
    """``flags.json``: the flags and the findings that group them by cause (``shortcuts.findings``)."""

    schema_version: int
    flags: list[Flag]
    findings: list[Any]


def flags_file(flags: list[Flag], findings: Sequence[Any] = ()) -> FlagsFile:
    return {"schema_version": SCHEMA_VERSION, "flags": flags, "findings": list(findings)}


def downgrade(severity: str) -> str:
    """One level lower (``low`` stays ``low``)."""
    return SEVERITIES[max(0, SEVERITY_RANK[severity] - 1)]


def level(value: float, medium: float, high: float, smaller_is_worse: bool = False) -> str:
    """The severity of ``value`` against the ``medium`` and ``high`` thresholds."""
    if smaller_is_worse:
        return "high" if value <= high else "medium" if value <= medium else "low"
    return "high" if value >= high else "medium" if value >= medium else "low"


def pct(value: float | None) -> str:
    """A share as ``42%``; ``n/a`` where it is undefined (a message never prints ``nan%``)."""
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.0%}"


def change(delta: float, what: str) -> str:
    """``raises p(a) by 0.31`` / ``lowers p(a) by 0.12`` / ``leaves p(a) unchanged`` for a probability change."""
    if abs(delta) < 0.005:
        return f"leaves {what} unchanged"
    return f"{'raises' if delta > 0 else 'lowers'} {what} by {abs(delta):.2f}"


def make_flag(
    kind: str,
    cls: str | None,
    attribute: str | None,
    severity: str,
    score: float,
    message: str,
    evidence: dict[str, Any],
    methods: Sequence[str] = (),
    region: Sequence[float] | None = None,
) -> Flag:
    """A flag (the unreliable-method downgrade is applied to every flag by :func:`downgrade_unreliable`)."""
    methods = list(methods)
    return {
        "id": f"{kind}/{cls or '*'}/{attribute or '*'}",
        "kind": kind,
        "class": cls,
        "attribute": attribute,
        "region": [round(float(v), 4) for v in region] if region is not None else None,
        "severity": severity,
        "score": float(np.clip(score, 0.0, 1.0)),
        "methods": methods,
        "message": message,
        "evidence": evidence,
    }


def order_flags(flags: list[Flag]) -> list[Flag]:
    """Most severe first, then by score."""
    return sorted(flags, key=lambda f: (-SEVERITY_RANK[f["severity"]], -f["score"], f["id"]))


def downgrade_unreliable(flag: Flag, unreliable: set[str]) -> Flag:
    """``flag`` one level down when every method that supports it failed the randomization test.

    Applied by the analysis registry to every flag of every kind that names methods, so no analysis can
    forget it (``cluster`` flags once were never downgraded)."""
    methods = flag["methods"]
    if flag["kind"] == "unreliable_method" or not methods or not all(m in unreliable for m in methods):
        return flag
    why = "only methods that failed the randomization test support it"
    return {**flag, "severity": downgrade(flag["severity"]), "evidence": {**flag["evidence"], "downgraded": why}}
