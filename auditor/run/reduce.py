"""The reduce stage: committed parts + the model -> aggregates, sanity, analyses, interventions, flags, the
summary and the deep dive (the driver renders the report from them).

It reads only the run directory and the :class:`~auditor.run.setup.Plan` (for the model and the images
the interventions and the deep dive reload), so any driver (local, shards, Ray) ends with it.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import torchvision
import yaml
from torch import Tensor

from auditor.cams import CAMS
from auditor.cams.core import model_state
from auditor.cams.layers import layer_pass, resolve_layer
from auditor.config import dump_resolved
from auditor.io.sources import sample_key
from auditor.metrics.registry import metric_columns
from auditor.ops import from_pixels, to_pixels
from auditor.run import aggregate, sanity
from auditor.run.deepdive import run_deepdive
from auditor.run.examples import finding_examples
from auditor.run.mapstage import MapSpec
from auditor.run.setup import Plan
from auditor.shortcuts.catalog import group_by_cause, run_analyses
from auditor.shortcuts.flags import Flag, flags_file
from auditor.shortcuts.interventions import occlusion_scan, region_intervention, shift_intervention
from auditor.shortcuts.probes import margin_masks
from auditor.shortcuts.registry import AnalysisInputs, Intervener
from auditor.store.rundir import FLAGS, SUMMARY, RunDir, one_row_per_sample
from auditor.store.schema import SCHEMA_VERSION, Summary
from auditor.version import __version__


def loader(plan: Plan) -> Callable[[Sequence[int]], Tensor]:
    """Rows -> ``[n, 3, S, S]`` normalized images on the model's device (reloaded from the files)."""

    def load(rows: Sequence[int]) -> Tensor:
        return torch.stack([plan.dataset.load(int(r))["image"] for r in rows]).to(plan.device)

    return load


def _item_loader(plan: Plan) -> Callable[[int], dict[str, Any]]:
    """Row -> the dataset's sample dict, its image on the model's device."""

    def load(row: int) -> dict[str, Any]:
        item = plan.dataset.load(int(row))
        if item["ok"]:
            item["image"] = item["image"].to(plan.device)
        return item

    return load


def _norm(plan: Plan) -> tuple[Tensor | None, Tensor | None]:
    """The input normalization's ``(mean, std)`` as ``[3, 1, 1]`` tensors on the device, or ``(None, None)``."""
    mean_std = plan.cfg.data.mean_std()
    if not mean_std:
        return None, None
    return (torch.tensor(mean_std[0], device=plan.device), torch.tensor(mean_std[1], device=plan.device))


def intervener(plan: Plan) -> Intervener:
    """Model access for the analyses' interventions (region removal and pasting, see ``interventions``)."""
    mean, std = _norm(plan)
    load = loader(plan)

    def region_test(
        own_rows: Sequence[int],
        other_rows: Sequence[int],
        cls: int,
        region: Sequence[float],
        control: Sequence[float],
        seed: int,
    ) -> dict[str, Any]:
        return region_intervention(
            plan.loaded.module,
            load,
            own_rows,
            other_rows,
            cls,
            region,
            control,
            to_pixels=lambda x: to_pixels(x, mean, std),
            from_pixels=lambda x: from_pixels(x, mean, std),
            noise_keys=[sample_key(plan.samples[r].id, seed, "impute") for r in own_rows],
        )

    def scan(rows: Sequence[int], cls: int, boxes: Sequence[Sequence[float]]) -> np.ndarray:
        return occlusion_scan(plan.loaded.module, load(rows), cls, boxes, chunk=plan.chunk)

    def shift_test(
        own_rows: Sequence[int], other_rows: Sequence[int], cls: int, delta: Sequence[float], method: str | None
    ) -> dict:
        return shift_intervention(
            plan.loaded.module,
            load,
            own_rows,
            other_rows,
            cls,
            delta,
            to_pixels=lambda x: to_pixels(x, mean, std),
            from_pixels=lambda x: from_pixels(x, mean, std),
            keep=_spared(plan, method),
        )

    # the concepts read the run's target layer, which exists (checked at set-up) when a layer method runs
    layered = not plan.loaded.scripted and any(CAMS[m].needs != "nothing" for m in plan.methods)
    return Intervener(region_test, scan, shift_test, _activations(plan) if layered else None)


def _activations(plan: Plan) -> Callable[[Sequence[int]], np.ndarray]:
    """Rows -> ``[n, K, h, w]`` float32 activations of the run's target layer (the deepest, for a list), or of
    the finer layer LayerCAM fuses when the target layer's grid is under 7 x 7 (``run.localization``)."""
    load = loader(plan)
    given = plan.cfg.model.target_layer
    name = given if isinstance(given, str) or given is None else list(given)[-1]
    name = plan.localization.get("fine_layer") or name

    def activations(rows: Sequence[int]) -> np.ndarray:
        parts = []
        layer = None
        with model_state(plan.loaded.module):
            for start in range(0, len(rows), plan.chunk):
                x = load(rows[start : start + plan.chunk])
                layer = layer or resolve_layer(plan.loaded.module, name, x)
                targets = torch.zeros(len(x), dtype=torch.long, device=x.device)  # no gradient: any class
                _, data = layer_pass(plan.loaded.module, x, targets, [layer], grad=False)
                parts.append(data[layer].activations.cpu().numpy())
        return np.concatenate(parts)

    return activations


def _spared(plan: Plan, method: str | None) -> Callable[[Sequence[int]], Tensor]:
    """Rows -> ``[n, S, S]`` bool: each image's object grown by a margin where it has a mask or boxes; else
    the smallest set of pixels holding half of ``method``'s map mass, at most a quarter of the image (where
    the model looks; a diffuse map, as a colour cast gives, spares little); else nothing."""
    found = [plan.store.load_maps(method, t) for t in ("label", "prediction")] if method else []
    maps = next((m for m in found if m is not None), None)
    size = plan.cfg.data.image_size

    def keep(rows: Sequence[int]) -> Tensor:
        out = torch.zeros(len(rows), size, size, dtype=torch.bool)
        for i, row in enumerate(rows):
            item = plan.dataset.load(int(row))
            if item["ok"] and item["has_mask"] and bool(item["mask"].any()):
                out[i] = margin_masks(item["mask"][None])[0]
            elif maps is not None and np.isfinite(maps[row]).all() and float(np.max(maps[row])) > 0:
                low = torch.from_numpy(np.asarray(maps[row], np.float32))[None, None]
                up = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False).flatten().clamp_min(0)
                order = torch.argsort(up, descending=True)
                mass = torch.cumsum(up[order], 0) / up.sum()
                k = min(int((mass < 0.5).sum()) + 1, size * size // 4)
                out[i].view(-1)[order[:k]] = True
        return out

    return keep


def map_methods(methods: Sequence[str], rundir: RunDir, target: str = "label") -> list[str]:
    """Methods whose maps support claims: class-sensitive, not pixel-space (guided) methods, with stored maps."""
    return [m for m in methods if CAMS[m].class_sensitive and CAMS[m].family != "pixel" and rundir.has_maps(m, target)]


def analysis_inputs(plan: Plan, table: pd.DataFrame, methods: Sequence[str], mprt: dict | None) -> AnalysisInputs:
    """What the analyses read; the explained target is the label unless the run only explained predictions.

    The table keeps the prediction rows (null target) of the samples no method explained, so that the
    population is every sample.
    """
    explained = table["target"].dropna()
    target = "label" if explained.empty or (explained == "label").any() else str(explained.iloc[0])
    return AnalysisInputs(
        table=table[(table["target"] == target) | table["target"].isna()],
        target=target,
        methods=map_methods(methods, plan.store, target),
        classes=plan.classes,
        metadata=plan.metadata,
        rundir=plan.store,
        thresholds=plan.cfg.thresholds,
        seed=plan.cfg.seed,
        mprt=mprt,
    )


def _header(plan: Plan, spec: MapSpec) -> Summary:
    return {
        "schema_version": SCHEMA_VERSION,
        "versions": {
            "auditor": __version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "python": platform.python_version(),
        },
        "config": yaml.safe_load(dump_resolved(plan.cfg.model_copy(update={"methods": plan.methods}))),
        "run": {
            "model": plan.loaded.description,
            "device": str(plan.device),
            "layer": plan.cfg.model.target_layer,
            "limit": plan.selection.limit,
            "per_class": plan.selection.per_class,
            "only_classes": plan.selection.only_classes,
            "expensive_samples": int(spec.expensive.sum()),
            "memory_format": plan.memory_format,
            "localization": plan.localization,
            "skipped_methods": plan.skipped_methods,
        },
    }


def _deep_dive(plan: Plan, flags: list[Flag], table: pd.DataFrame) -> list[str]:
    window = max(4, plan.cfg.data.image_size // 8)
    return run_deepdive(
        plan.store,
        flags,
        table,
        plan.loaded.module,
        loader(plan),
        {c: i for i, c in enumerate(plan.classes)},
        plan.layer,
        plan.loaded.scripted,
        {"window": window, "stride": max(2, window // 2)},
    )


def reduce_run(plan: Plan, spec: MapSpec, table: pd.DataFrame, seconds: dict[str, float]) -> Summary:
    """Everything dataset-level, written to ``summary.json`` and ``flags.json``; returns the summary.

    ``seconds`` collects stage timings (``analyses``, ``deep_dive``); the caller adds them to the summary.
    """
    first = one_row_per_sample(table)
    columns = metric_columns(spec.metrics)
    summary = _header(plan, spec)
    summary["dataset"] = aggregate.dataset_info(
        first, plan.store.events(plan.n_batches), plan.classes, len(plan.samples)
    )
    summary["metric_columns"] = columns
    summary["accuracy"] = aggregate.accuracy(first, plan.classes, plan.cfg.seed)
    summary["aggregates"] = aggregate.aggregates(table, plan.store, plan.classes, list(columns), plan.cfg.seed)
    summary["groups"] = aggregate.groups(first, plan.metadata)
    summary["analyses"], summary["sanity"] = {}, None
    if plan.cfg.sanity is not None and not plan.loaded.scripted:
        summary["sanity"] = {
            "mprt": sanity.run_mprt(plan, first),
            "agreement": sanity.agreement(plan.store, table, plan.methods),
        }
    start = time.perf_counter()
    inputs = analysis_inputs(plan, table, plan.methods, summary["sanity"]["mprt"] if summary["sanity"] else None)
    inputs.intervener = intervener(plan)
    summary["analyses"], flags = run_analyses(inputs)
    seconds["analyses"] = time.perf_counter() - start
    start = time.perf_counter()
    findings = finding_examples(
        group_by_cause(flags),
        flags,
        inputs.first,
        plan.loaded.module,
        _item_loader(plan),
        _norm(plan),
        plan.classes,
        plan.store,
    )
    seconds["findings"] = time.perf_counter() - start
    plan.store.write_json(FLAGS, flags_file(flags, findings))
    start = time.perf_counter()
    summary["deep_dive"] = _deep_dive(plan, flags, table)
    seconds["deep_dive"] = time.perf_counter() - start
    return summary


def write_summary(plan: Plan, summary: Summary) -> None:
    """``summary.json`` (the driver then renders the report from the saved files)."""
    plan.store.write_json(SUMMARY, summary)
