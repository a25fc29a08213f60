"""Where the analyses' work items run, and the run directory's record of them.

An analysis's interventions are one work item per class (:class:`~auditor.shortcuts.registry.PerClass`).
A *runner* carries items out: :func:`run_here` in this process through its
:class:`~auditor.run.access.ModelAccess`, or the Ray actor pool (``run.raydriver``), whose actors hold the
model. :func:`stored` wraps a runner into the executor ``run_analyses`` takes: each item's result is written
to ``items/<analysis>/<key>.json`` as it arrives, and an item already there (same analysis, class, measurement,
thresholds, seed and audited population) is read back instead of run, so an analysis stage that was
interrupted resumes where it stopped. Every result, wherever it ran, goes through the same JSON encoding
before any analysis reads it, so the executors cannot differ by a type.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from auditor.shortcuts.registry import Analysis, AnalysisInputs, Executor, Measurement, tracked
from auditor.store.rundir import RunDir, atomic_write_bytes

log = logging.getLogger("auditor.analyses")

Runner = Callable[[Analysis, Measurement, AnalysisInputs, list[str]], Iterator[tuple[str, str, int]]]
"""``runner(analysis, measurement, inputs, classes)`` yields ``(class, encoded result, images forwarded)`` for
every class, in any order, as each finishes."""


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"a work item's result holds a {type(value).__name__}, which is not JSON: {value!r}")


def encode(result: Any) -> str:
    """A work item's result as JSON text (numpy values as Python ones; NaN and infinities kept)."""
    return json.dumps(result, default=_plain, allow_nan=True)


def decode(text: str) -> Any:
    return json.loads(text)


def run_here(
    analysis: Analysis, measured: Measurement, inputs: AnalysisInputs, keys: list[str]
) -> Iterator[tuple[str, str, int]]:
    """The items in this process, in order, through ``inputs.intervener`` (a :data:`Runner`)."""
    assert analysis.per_class is not None and inputs.intervener is not None
    for key in keys:
        before = inputs.intervener.forwards
        result = analysis.per_class.run(measured, inputs, key)
        yield key, encode(result), inputs.intervener.forwards - before


def _population(inputs: AnalysisInputs) -> str:
    """A digest of the audited population the items read (every column of one row per sample)."""
    hashed = pd.util.hash_pandas_object(inputs.first.reset_index(drop=True), index=False).to_numpy()
    return hashlib.sha256(hashed.tobytes()).hexdigest()


def fingerprint(analysis: Analysis, measured: Measurement, inputs: AnalysisInputs) -> str:
    """What an analysis's items depend on besides their class: a stored item with another is run again."""
    what = [
        analysis.name,
        encode(measured),
        inputs.thresholds.model_dump_json(),
        inputs.seed,
        inputs.target,
        inputs.methods,
        inputs.classes,
        inputs.memo("population", lambda: _population(inputs)),
    ]
    return hashlib.sha256(json.dumps(what, default=str).encode()).hexdigest()


def _read(path: Path, key: str, digest: str) -> tuple[Any, int] | None:
    """A stored item's (result, images forwarded), or None where it is missing, unreadable or from other inputs."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("key") != key or stored.get("fingerprint") != digest:
        return None
    return stored["result"], int(stored["forwards"])


def stored(rundir: RunDir, runner: Runner = run_here) -> Executor:
    """The executor of a run: items already in ``rundir`` are read back, the rest go to ``runner`` and are
    written as they finish. Every result is decoded from its JSON, stored or fresh."""

    def execute(
        analysis: Analysis, measured: Measurement, inputs: AnalysisInputs, keys: list[str]
    ) -> tuple[dict[str, dict[str, Any]], int]:
        assert analysis.per_class is not None
        digest = fingerprint(analysis, measured, inputs)
        results: dict[str, dict[str, Any]] = {}
        images = 0
        for key in keys:
            found = _read(rundir.item_path(analysis.name, key), key, digest)
            if found is not None:
                results[key], n = found
                images += n
        todo = [k for k in keys if k not in results]
        if len(todo) < len(keys):
            kept = len(keys) - len(todo)
            log.info("%s: %d of %d work items read back from %s", analysis.name, kept, len(keys), rundir.root)
        arriving = runner(analysis, measured, inputs, todo) if todo else iter(())
        for key, text, n in tracked(arriving, analysis.per_class.what, total=len(todo)):
            record = {"key": key, "fingerprint": digest, "forwards": n}
            body = json.dumps(record)[:-1] + f', "result": {text}}}'
            atomic_write_bytes(rundir.item_path(analysis.name, key), body.encode("utf-8"))
            results[key] = decode(text)
            images += n
        missing = [k for k in keys if k not in results]
        if missing:
            raise RuntimeError(f"analysis {analysis.name}: the runner returned no result for {missing[:5]}")
        return results, images

    return execute
