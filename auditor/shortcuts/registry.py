"""The analysis registry: each shortcut analysis is one module that registers one :class:`Analysis`.

An analysis declares what it needs, a measurement function (numbers for ``summary.json``), optionally an
intervention step planned from its own measurement (never from a verdict), a flag function (numbers ->
verdicts) and the evidence keys that hold sample ids. :func:`run_analyses` runs every registered analysis
in registration order: measure, intervene, then flag. Adding a flag kind = one module + its test.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import pandas as pd

from auditor.io.sources import keyed_order
from auditor.registry import Registry
from auditor.shortcuts.examples import ExamplesHook
from auditor.shortcuts.findings import Cause
from auditor.shortcuts.flags import Flag
from auditor.shortcuts.grids import CHUNK, GRID, grid_maps
from auditor.shortcuts.removals import counterfactual_summary
from auditor.shortcuts.thresholds import SharedParams
from auditor.stats import bh_adjust
from auditor.store.rows import DiskRows, write_rows
from auditor.store.rundir import SCRATCH, RunDir, one_row_per_sample

NEEDS = ("maps", "masks", "counterfactuals", "model", "mprt")
LOG_EVERY = 10.0  # seconds between two progress lines of one loop
log = logging.getLogger("auditor.analyses")
T = TypeVar("T")


def tracked(items: Iterable[T], what: str, every: float = LOG_EVERY, total: int | None = None) -> Iterator[T]:
    """``items``, logging ``<what>: 37/1000, 12 s, ETA 5 min`` at most every ``every`` seconds: an analysis
    looping over 1,000 classes shows where it is (the map stage has its own bar). With ``total``, the items are
    consumed as they arrive (work items finishing on other processes); else they are listed first to count."""
    if total is None:
        items = list(items)
        total = len(items)
    start = last = time.perf_counter()
    for i, item in enumerate(items):
        now = time.perf_counter()
        if i and now - last >= every:
            left = (total - i) * (now - start) / i
            log.info("%s: %d/%d, %.0f s, ETA %.0f s", what, i, total, now - start, left)
            last = now
        yield item


class Intervener(Protocol):
    """What an analysis may ask of the model: one object, built once per run by the run stage
    (``run.access.ModelAccess``) from the plan. Analyses call it and import no torch."""

    def region_test(
        self,
        own_rows: Sequence[int],
        other_rows: Sequence[int],
        cls: int,
        region: Sequence[float] | Sequence[Sequence[float]],
        control: Sequence[float] | Sequence[Sequence[float]],
        seed: int,
    ) -> dict[str, Any]:
        """Remove a region (a box or a union of boxes) and a control from ``own_rows`` images and paste both
        into ``other_rows`` images (``interventions.region_intervention``, imputation noise keyed by sample id
        and ``seed``); the paired test-minus-control numbers."""
        ...

    def scan(self, rows: Sequence[int], cls: int | Sequence[int], boxes: Sequence[Sequence[float]]) -> np.ndarray:
        """``[n, len(boxes)]`` drops of p(``cls``) when each normalized box of each image is filled in (``cls``: one
        class for every image, or one per image)."""
        ...

    def shift_test(
        self,
        own_rows: Sequence[int],
        other_rows: Sequence[int],
        cls: int,
        delta: Sequence[float],
        method: str | None,
        outside: bool = True,
    ) -> dict[str, Any]:
        """Shift the images' mean colour by ``+delta`` / ``-delta`` (``interventions.shift_intervention``); where an
        image has no mask, ``method``'s hot places stand in for the object the spared test leaves alone;
        ``outside=False`` runs the whole-image test only (``outside`` is None)."""
        ...

    def graft_test(
        self,
        own_rows: Sequence[int],
        other_rows: Sequence[int],
        cls: int,
        method: str | None,
        spare: Mapping[int, Sequence[Sequence[float]]] | None = None,
    ) -> dict[str, Any]:
        """Graft ``own_rows``' backgrounds behind ``other_rows``' objects, against other classes' backgrounds
        (``interventions.graft_intervention``); an image's object is its mask with a margin, else ``method``'s
        hot places, as the colour shift spares them; ``spare`` adds normalized boxes per row to what an image
        keeps (where the model, not the map, found the object). Adds ``own_compact`` and ``other_compact``
        (``None`` where every image has a mask): how much the hot pixels of each side's maps lie in one place."""
        ...

    @property
    def has_activations(self) -> bool:
        """Whether :meth:`activations` can run (a hookable model with a target layer)."""
        ...

    def activations(self, rows: Sequence[int]) -> np.ndarray:
        """``[n, K, h, w]`` float32 activations of the run's analysis layer."""
        ...

    @property
    def forwards(self) -> int:
        """Images forwarded through the model by the calls above so far (the analyses' cost, counted)."""
        ...


def keyed_rows(frame: pd.DataFrame, n: int, seed: int, salt: str, first: pd.Series | None = None) -> np.ndarray:
    """``row`` values of ``n`` rows of ``frame`` in an order keyed by sample id, seed and ``salt`` (rows where
    ``first`` is True come first): a draw that no batch size, order or shard can move."""
    order = keyed_order(frame["id"].tolist(), seed, salt)
    if first is not None:
        order = order[np.argsort(~first.to_numpy(dtype=bool)[order], kind="stable")]
    return frame["row"].to_numpy()[order][:n]


@dataclass
class AnalysisInputs:
    """What a measurement may read: the finished pass's table, maps and (optionally) the model.

    Attributes:
        table: ``samples.parquet`` rows of the analysed target (every method).
        target: the explained target analysed (``label`` unless the run explained predictions only).
        methods: the map methods whose maps support claims (class-sensitive, not pixel-space).
        classes: class names in model order.
        metadata: metadata columns.
        rundir: the run directory (maps, object grid).
        thresholds: flag thresholds (interventions read their sample counts from here).
        seed: seed of bootstraps, clustering and intervention draws.
        mprt: ``summary.sanity.mprt`` or None.
        intervener: model access, or None (interventions are then skipped).
    """

    table: pd.DataFrame
    target: str
    methods: list[str]
    classes: list[str]
    metadata: list[str]
    rundir: RunDir
    thresholds: SharedParams
    seed: int = 0
    mprt: dict[str, Any] | None = None
    intervener: Intervener | None = None
    _memo: dict[str, Any] = field(default_factory=dict, repr=False)

    def memo(self, key: str, make: Callable[[], T]) -> T:
        """``make()``, computed once per inputs object under ``key``: what every work item of an analysis reads
        (a class's ceiling of p, say) is computed once in each process that runs items, not once per item."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    @cached_property
    def first(self) -> pd.DataFrame:
        """One row per audited sample, whatever the methods (not the first method's rows: an expensive
        method has rows only for its subset)."""
        return one_row_per_sample(self.table)

    @cached_property
    def grids(self) -> dict[str, tuple[pd.DataFrame, DiskRows]]:
        """Per map method: its rows and ``[n, 32, 32]`` L1-normalized maps (computed once, shared), on disk: a
        float32 grid is 4 KiB a map, 4 GB at a million rows, so the analyses read them by class or by chunk. The
        files live in a directory of the run's own (same disk, removed with these inputs or at exit)."""
        out = {}
        for m in self.methods:
            sub = self.table[self.table["method"] == m]
            maps = self.rundir.map_rows(m, self.target)
            if maps is not None:
                rows = sub["row"].to_numpy()
                chunks = (grid_maps(maps[rows[i : i + CHUNK]]) for i in range(0, len(rows), CHUNK))
                out[m] = (sub, write_rows(self._scratch / f"{m}.npy", len(rows), (GRID, GRID), "float32", chunks))
        return out

    @cached_property
    def _scratch(self) -> Path:
        """A directory for this object's files in the run directory, removed by :meth:`release`, with the object,
        or at exit."""
        path = Path(tempfile.mkdtemp(prefix=SCRATCH, dir=self.rundir.root))
        self._memo["_release"] = weakref.finalize(self, shutil.rmtree, path, ignore_errors=True)
        return path

    def release(self) -> None:
        """Remove the grid files now (the analyses are done); a later read of :attr:`grids` writes them again."""
        done = self._memo.pop("_release", None)
        if done is not None:
            done()
        for name in ("grids", "objects", "_scratch"):
            self.__dict__.pop(name, None)

    @property
    def hot_method(self) -> str | None:
        """The map method whose hot places stand in for an image's object where it has no mask (the colour
        shifts and the background graft spare them): the finest class-sensitive one, ``layer_cam`` where it ran."""
        return "layer_cam" if "layer_cam" in self.methods else (self.methods[0] if self.methods else None)

    @cached_property
    def objects(self) -> DiskRows | None:
        """``[n, 32, 32]`` object masks on the analysis grid, read by selection (None when no sample had one)."""
        return self.rundir.object_rows()

    @cached_property
    def counterfactual(self) -> dict[str, Any]:
        """``removals.counterfactual_summary`` of the run, computed once: several analyses check their map or
        colour evidence against it."""
        return counterfactual_summary(self.first, self.classes, self.thresholds.counterfactual_min_kept)


@dataclass(frozen=True)
class FlagContext:
    """What a flag function may read besides its measurement.

    Attributes:
        family: the run's q-values, ``{"<analysis>/<test>": q}``: one Benjamini-Hochberg family over every
            test of every analysis that can raise a flag (:func:`run_analyses`); None when a flag function is
            called on its own measurement (tests), which then adjusts within its own tests.
    """

    thresholds: SharedParams
    unreliable: set[str] = field(default_factory=set)
    mprt: dict[str, Any] | None = None
    family: dict[str, float] | None = None

    def q_values(self, analysis: str, tests: dict[str, float]) -> dict[str, float]:
        """``{test: q}`` for an analysis's ``{test: p}`` (:attr:`Analysis.tests`)."""
        if self.family is None:
            return dict(zip(tests, bh_adjust(list(tests.values())), strict=True))
        return {k: self.family[f"{analysis}/{k}"] for k in tests}


Measurement = dict[str, Any]


@dataclass(frozen=True)
class PerClass:
    """An analysis's interventions as one work item per class: what an executor (this process's loop, the Ray
    actors) runs, item by item, wherever the model and the run directory are.

    Attributes:
        classes: ``classes(measurement, inputs) -> classes`` to intervene on, in order.
        run: ``run(measurement, inputs, cls) -> result``: one class's work through ``inputs.intervener``. It reads
            the measurement and the inputs only, so items run in any order, in any process, and give the same
            result; the result is JSON (numbers, strings, lists, dicts with string keys; NaN allowed).
        gather: ``gather(measurement, {cls: result}) -> {summary key: value}``: the results, in ``classes``
            order, into the measurement's update (with ``triage``, as ``intervene`` returns).
        what: the progress line's label (``"region scan, classes"``).
    """

    classes: Callable[[Measurement, AnalysisInputs], list[str]]
    run: Callable[[Measurement, AnalysisInputs, str], dict[str, Any]]
    gather: Callable[[Measurement, dict[str, dict[str, Any]]], Measurement]
    what: str


def gather_entries(summary_key: str, entry: str) -> Callable[[Measurement, dict[str, dict[str, Any]]], Measurement]:
    """A :attr:`PerClass.gather` for items that return ``{entry: value or None, "triage": reason or None}``:
    ``{summary_key: {class: value}, "triage": {class: reason}}``, each without the Nones."""

    def gather(measured: Measurement, results: dict[str, dict[str, Any]]) -> Measurement:
        found = {c: r[entry] for c, r in results.items() if r[entry] is not None}
        return {summary_key: found, "triage": {c: r["triage"] for c, r in results.items() if r["triage"] is not None}}

    return gather


def intervene_here(work: PerClass, measured: Measurement, inputs: AnalysisInputs) -> Measurement:
    """Every work item of ``work`` in this process, in order, gathered (what tests of one analysis call)."""
    keys = work.classes(measured, inputs)
    return work.gather(measured, {k: work.run(measured, inputs, k) for k in tracked(keys, work.what)})


class Executor(Protocol):
    """Runs an analysis's work items: ``execute(analysis, measurement, inputs, classes) -> ({class: result},
    images forwarded)``; every class in ``classes`` gets its :attr:`PerClass.run` result, equal to this
    process's (``run.work``: the item store, the Ray actors)."""

    def __call__(
        self, analysis: Analysis, measured: Measurement, inputs: AnalysisInputs, keys: list[str]
    ) -> tuple[dict[str, dict[str, Any]], int]: ...


def execute_here(
    analysis: Analysis, measured: Measurement, inputs: AnalysisInputs, keys: list[str]
) -> tuple[dict[str, dict[str, Any]], int]:
    """The default :class:`Executor`: every item in this process, in order, through ``inputs.intervener``."""
    assert analysis.per_class is not None and inputs.intervener is not None
    work, before = analysis.per_class, inputs.intervener.forwards
    results = {k: work.run(measured, inputs, k) for k in tracked(keys, work.what)}
    return results, inputs.intervener.forwards - before


@dataclass(frozen=True)
class Analysis:
    """A registered analysis.

    Attributes:
        name: registry key.
        kinds: the flag kinds it emits, each with the cause its flags are evidence of (how findings group
            them, :class:`~auditor.shortcuts.findings.Cause`).
        examples: ``examples(finding, flags by id, first, cited ids, maker, n) -> examples``: the intervention
            images of a finding its flags lead (``shortcuts.examples``; the run stage carries them out).
        params: its thresholds, a pydantic model extending ``SharedParams`` (flat keys of the config's
            ``thresholds``, which holds every analysis's: ``catalog.Thresholds``); the analysis reads them with
            ``params_of(ctx.thresholds, Params)``.
        needs: what it cannot run without, from :data:`NEEDS`; ``run_analyses`` skips an analysis whose needs
            the run does not meet and records why (``analyses.skipped``). ``intervene`` runs only where the
            model is available, so an analysis that can judge without it does not list ``model``.
        measure: ``measure(inputs) -> {summary key: value}`` (``summary.json`` ``analyses``).
        flag: ``flag(measurement, ctx) -> flags``.
        evidence_ids: evidence keys whose values are lists of sample ids (report galleries, the deep dive
            and the flagged second pass read them).
        intervene: ``intervene(measurement, inputs) -> {summary key: value}``, run only with a model, in the
            process that reduces the run (an analysis that fits one model across classes, as the concepts do).
        per_class: the interventions as one work item per class (:class:`PerClass`), run only with a model, by
            the run's executor (the Ray actors under ``--backend ray``); an analysis gives this or ``intervene``.
        tests: ``tests(measurement) -> {test name: p-value}``, every test whose p-value can raise a flag;
            they join the run's one Benjamini-Hochberg family and the flag function reads their q-values
            with ``ctx.q_values(name, tests(measurement))``.
    """

    name: str
    kinds: Mapping[str, Cause]
    needs: frozenset[str]
    measure: Callable[[AnalysisInputs], Measurement]
    flag: Callable[[Measurement, FlagContext], list[Flag]]
    evidence_ids: tuple[str, ...] = ()
    intervene: Callable[[Measurement, AnalysisInputs], Measurement] | None = None
    per_class: PerClass | None = None
    tests: Callable[[Measurement], dict[str, float]] | None = None
    params: type[SharedParams] = SharedParams
    examples: ExamplesHook | None = None


ANALYSES: Registry[Analysis] = Registry("analysis")


def register_analysis(analysis: Analysis) -> Analysis:
    bad = set(analysis.needs) - set(NEEDS)
    if analysis.intervene is not None and analysis.per_class is not None:
        raise ValueError(f"analysis {analysis.name!r} gives both intervene and per_class; give one")
    if bad:
        raise ValueError(f"analysis {analysis.name!r} needs unknown inputs {sorted(bad)}; known: {list(NEEDS)}")
    ANALYSES.add(analysis.name, analysis)
    return analysis


def unreliable_methods(mprt: dict[str, Any] | None) -> set[str]:
    return {m for m, r in (mprt or {}).get("methods", {}).items() if r["unreliable"]}
