"""The typed shape of ``summary.json`` (``flags.json`` is :class:`auditor.shortcuts.flags.FlagsFile`).

TypedDicts only, no torch: the report, ``gate`` and ``compare`` read these files. Bump
:data:`SCHEMA_VERSION` when a key changes meaning or disappears; adding a key does not.
"""

from __future__ import annotations

from typing import Any, TypedDict

SCHEMA_VERSION = 1


class Stats(TypedDict):
    """One aggregate: bootstrap CI of the mean of the finite values."""

    mean: float
    median: float
    ci_low: float
    ci_high: float
    n: int


class DatasetInfo(TypedDict):
    n: int
    n_requested: int
    classes: list[str]
    per_class: dict[str, int]
    with_mask: int
    skipped: list[dict[str, str]]
    skip_counts: dict[str, int]
    warning_counts: dict[str, int]
    warnings: list[dict[str, Any]]
    id: str


class RunInfo(TypedDict):
    model: str
    device: str
    layer: Any
    limit: int | None
    per_class: int | None
    only_classes: list[str] | None
    expensive_samples: int
    memory_format: str
    localization: dict[str, Any]
    skipped_methods: dict[str, str]


class Summary(TypedDict, total=False):
    """``summary.json``; ``aggregates[method][target][class][metric]`` is a :class:`Stats`."""

    schema_version: int
    versions: dict[str, str]
    config: dict[str, Any]
    run: RunInfo
    dataset: DatasetInfo
    metric_columns: dict[str, dict[str, str | bool | None]]
    accuracy: dict[str, dict[str, float]]
    aggregates: dict[str, dict[str, dict[str, dict[str, Stats]]]]
    groups: dict[str, dict[str, Any]]
    analyses: dict[str, Any]
    sanity: dict[str, Any] | None
    deep_dive: list[str]
    timings: dict[str, float]
