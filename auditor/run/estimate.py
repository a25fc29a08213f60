"""``auditor run --dry-run``: what an audit will cost, before it runs.

The run is planned as a real one (config, model, data and layers checked; in a scratch folder, so ``--out``
is not touched). Then each stage's passes through the model are counted from the plan: the main pass's
forward + backward per image, the expensive subset's deletion/insertion forwards, the randomization test,
and per analysis the most forwards its interventions can take (:func:`analysis_bounds`; the triage runs the
full tests only where a flag is within reach, so a run takes fewer). A short probe times one forward and one
forward + backward of a batch of the audit's own images on the run's device, and the counts become seconds.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from auditor.config import AuditConfig
from auditor.metrics import FAST_METRICS, METRICS
from auditor.shortcuts.backdrop import object_windows
from auditor.shortcuts.catalog import Thresholds
from auditor.shortcuts.cues import BOX, scan_split
from auditor.shortcuts.triage import PROBE_IMAGES
from auditor.shortcuts.windows import edge_bands, grid_boxes

FAITHFULNESS = ("deletion_auc", "insertion_auc")


@dataclass(frozen=True)
class StageCost:
    """One stage: images forwarded (at most, for the analyses) and forward + backward passes."""

    stage: str
    forwards: int
    backwards: int
    note: str


def _scan_windows(window: float) -> tuple[int, int]:
    """(coarse windows of the region scan, the half-side boxes a band's peak adds included, most fine windows of
    its localization) at ``window``."""
    coarse = len(grid_boxes(window, window / 2)) + len(edge_bands(window)) + len(edge_bands(min(2 * window, 0.5)))
    coarse += len(grid_boxes(BOX, BOX / 2)) + 1  # scanned where a band is the peak: its own plain forward too
    side = min(2 * window, 1.0)
    fine = len(grid_boxes(window / 2, window / 4, (0.0, 0.0, side, side)))
    return coarse, max(fine, len(grid_boxes(BOX / 2, BOX / 4)))  # a box's neighbourhood may be the whole image


def analysis_bounds(per_class: dict[str, int], t: Thresholds) -> dict[str, int]:
    """The most images each model-using analysis forwards, from the class sizes and the thresholds.

    Per class of ``n`` images among ``N`` (a region test on ``a`` + ``b`` images forwards ``3 (a + b)``, a scan
    of ``k`` windows ``n (k + 1)``, a colour shift ``5 (a + b)``, ``3 (a + b)`` on the whole image only):

    - ``cues``: the coarse scan and its localization on the scanned images, and 4 region tests on the held-out
      ones (``cues.scan_split``): with ``triage``, removals only, then one with the transplant;
    - ``frame``: its probe (``PROBE_IMAGES``) and one band test; ``properties``: its probe (whole image only) and
      one shift test;
    - ``backdrop``: one graft (of ``a`` class images and ``b`` others: ``2 (a + b)``) and, where it reaches the
      flag's effect sizes on images without masks, a scan of the class images (``backdrop.object_windows``)
      and a second graft; where its reverse does, a scan of the other images and a third graft;
    - ``hotspots``: one region test; ``attributes``: one colour shift of a property group and the rest of its
      class (only where a group's accuracy gap is within reach of a flag); ``subset_cues``: one localization on
      ``subset_images`` carriers and two region tests; ``concepts``: ``min(concept_images, n)`` activation passes.
    """
    total = sum(per_class.values())
    coarse, fine = _scan_windows(t.cue_window)
    sub_fine = len(grid_boxes(t.subset_window / 2, t.subset_window / 4, (0.0, 0.0, 2 * t.subset_window, 1.0)))
    out: Counter[str] = Counter()
    for n in per_class.values():
        own, other = min(t.intervention_images, n), min(t.intervention_images, total - n)
        scanned, held = scan_split(n, t.cue_images)
        if scanned >= 4:
            tested = min(t.intervention_images, held or n)  # none held out: the scanned images
            tests = 4 * 3 * tested + 3 * (tested + other) if t.triage else 4 * 3 * (tested + other)
            out["cues"] += scanned * (coarse + 1) + scanned * (fine + 1) + tests
        if t.frame_width > 0 and min(own, other) >= t.min_group:
            out["frame"] += 3 * min(PROBE_IMAGES, n) + 3 * (own + other)
        if min(n, total - n) >= t.min_group:
            out["properties"] += 3 * (min(PROBE_IMAGES, n) + min(PROBE_IMAGES, total - n)) + 5 * (own + other)
        out["hotspots"] += 3 * (own + other)
        out["attributes"] += 3 * min(n, 2 * t.intervention_images)  # the group and the rest, 32 each at most
        grafted, recipients = min(t.backdrop_images, n), min(t.backdrop_images, total - n)
        if min(grafted, recipients) >= t.min_group:
            graft = 2 * (grafted + recipients)
            found = (grafted + recipients) * (len(object_windows()) + 1)  # both sides' objects, by the model
            out["backdrop"] += 3 * graft + found  # the graft, redone sparing each side's objects
        carriers, others = min(t.subset_images, n), min(t.subset_images, total - n)
        out["subset_cues"] += carriers * (sub_fine + 1) + 3 * (carriers + others) + 3 * (carriers + 1)
        if min(t.concept_images, n) >= t.min_group:
            out["concepts"] += min(t.concept_images, n)
    return dict(out)


def stage_costs(cfg: AuditConfig, per_class: dict[str, int], expensive: int, methods: list[str]) -> list[StageCost]:
    """Every stage's passes for an audit of ``per_class`` images with ``expensive`` samples in the subset."""
    n = sum(per_class.values())
    stages = [StageCost("main pass", n, n, "the class-sensitive default methods share one forward + backward")]
    metrics = FAST_METRICS if cfg.metrics == "fast" else tuple(METRICS) if cfg.metrics == "all" else cfg.metrics
    curves = [m for m in FAITHFULNESS if m in metrics]
    if curves and expensive:
        whose = cfg.expensive.faithfulness
        k = len(methods) if whose == "all" else len(whose) if isinstance(whose, list) else 1
        per_image = k * sum(_curve_forwards(cfg, m) for m in curves)
        note = f"{' and '.join(curves)} on {expensive} samples, {k} method(s)"
        stages.append(StageCost("expensive subset", expensive * per_image, 0, note))
    if cfg.sanity is not None:
        k = cfg.sanity.n_images * (cfg.sanity.n_blocks + 1) * len(cfg.sanity.methods)
        stages.append(StageCost("randomization test (MPRT)", k, k, f"{cfg.sanity.n_images} images"))
    for name, forwards in analysis_bounds(per_class, cfg.thresholds).items():
        stages.append(StageCost(f"analysis {name}", forwards, 0, "at most (the triage runs less)"))
    return stages


def _curve_forwards(cfg: AuditConfig, metric: str) -> int:
    """Forwards per image of a deletion / insertion curve: one per step and the curve's start."""
    step = float((cfg.metric_options.get(metric) or {}).get("step", METRICS[metric].options.get("step", 0.02)))
    return math.ceil(1 / step) + 1


def probe_seconds(model: nn.Module, images: torch.Tensor, repeats: int = 2) -> tuple[float, float]:
    """(seconds per image of a forward, of a forward + backward) of ``model`` on ``images`` (after a warm-up)."""

    def forward() -> None:
        with torch.no_grad():
            model(images)

    def backward() -> None:
        x = images.clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        model(x).max(1).values.sum().backward()

    out = []
    for step in (forward, backward):
        step()
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - start) / (repeats * len(images)))
    return out[0], out[1]


def dry_run(cfg: AuditConfig, selection: Any) -> dict[str, Any]:
    """Plan the run (in a scratch folder), count every stage's passes and time them with a probe.

    Returns:
        ``{device, images, classes, t_forward, t_forward_backward, stages: [{stage, forwards, backwards,
        seconds, note}], seconds}`` (seconds estimated on this device).
    """
    from auditor.run.setup import plan_run

    with tempfile.TemporaryDirectory() as scratch:
        plan = plan_run(cfg, scratch, force=True, selection=selection)
        per_class = Counter(plan.classes[s.label] for s in plan.samples)
        read = (plan.dataset[i] for i in range(min(len(plan.dataset), max(32, 4 * plan.cfg.batch_size))))
        batch = [item["image"] for item in read if item["ok"]][: plan.cfg.batch_size]  # set-up read one in the first 32
        images = torch.stack(batch).to(plan.device)
        t_f, t_fb = probe_seconds(plan.loaded.module, images)
    stages = stage_costs(plan.cfg, dict(per_class), int(plan.stratified.sum()), plan.methods)
    rows = [{**s.__dict__, "seconds": (s.forwards - s.backwards) * t_f + s.backwards * t_fb} for s in stages]
    return {
        "device": str(plan.device),
        "images": len(plan.samples),
        "classes": len(plan.classes),
        "t_forward": t_f,
        "t_forward_backward": t_fb,
        "stages": rows,
        "seconds": sum(r["seconds"] for r in rows),
    }


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def format_plan(plan: dict[str, Any]) -> str:
    """The dry run's table, as ``auditor run --dry-run`` prints it."""
    lines = [
        f"{plan['images']} images, {plan['classes']} classes on {plan['device']}: a forward takes "
        f"{plan['t_forward'] * 1e3:.2f} ms an image, a forward + backward {plan['t_forward_backward'] * 1e3:.2f} ms "
        "(probe on a batch of the audit's images)",
        f"{'stage':<28} {'forwards':>12} {'of them + backward':>19} {'estimate':>9}  note",
    ]
    for r in plan["stages"]:
        lines.append(
            f"{r['stage']:<28} {r['forwards']:>12,} {r['backwards']:>19,} {_duration(r['seconds']):>9}  {r['note']}"
        )
    lines.append(
        f"total: ~{_duration(plan['seconds'])} on this {plan['device']} device (at most: the triage runs fewer "
        "analysis forwards; decoding images, the maps' own work and the report are not counted)"
    )
    return "\n".join(lines)
