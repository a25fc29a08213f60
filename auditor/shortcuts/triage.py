"""Triage: which classes an intervention analysis examines in full, so that an audit's cost follows the evidence.

The region scan, the border test and the colour shifts cost a fixed number of forwards per class (about 580,
130 and 210 at ten images a class), whatever the class shows. Two steps decide, per class and analysis,
whether the full test runs (``triage``, on by default); each class left out gets a reason
(``summary.json`` ``analyses.triage``, the report):

1. **Out of reach** (exact, no forward): every flag of these analyses needs an intervention on the class's
   own images to lower p(class) by at least a threshold (removal effect, scan drop) or needs images the
   model calls the class. An intervention cannot lower p(class) by more than p(class): where no image of the
   class has p(class) that high (an untrained model, a class the model never calls), no flag can stand,
   and the test is not run. Nothing is lost.
   The background graft has a step of its own here that is **not exact**: its flag needs the class's backgrounds
   to raise p(class) by ``high_effect`` on *other* classes' images, which no bound on the class's own images
   limits. It is skipped where no image of the class reaches p(class) ``high_effect`` (:func:`not_recognized`),
   on the assumption that a background alone does not make an image more the class than the class's own
   images, background and object together, ever are. Its recall is measured, not assumed (tests,
   ``benchmarks/detection.py``).
2. **Probe** (a few forwards): the test's own measurement on the first images of its keyed draw (the
   full test's draw starts with the same images), against half of the flag's least effect. The scan's
   probe is the scan of its first :data:`SCAN_PROBE_IMAGES` images, which the full scan reuses; the border
   and shift probes are the same tests on :data:`PROBE_IMAGES` images of the class and of other classes.
   A probe is a screen: a cue the model reads on half a class's images can miss the probe's few, so the
   recall of this step is measured (tests, ``benchmarks/detection.py``), not assumed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

PROBE_IMAGES = 8  # images of the class, and of other classes, of the border and shift probes
SCAN_PROBE_IMAGES = 4  # images of the region scan's probe (the full scan reuses their drops)
PROBE_SHARE = 0.5  # a probe passes when it reaches this share of the flag's least effect


def label_ceiling(first: pd.DataFrame, target: str) -> pd.Series:
    """Per image, an upper bound of p(label): ``target_prob`` where the run explained labels; else the top
    probability where the prediction is right and ``min(top, 1 - top)`` where it is wrong (another class
    holds the top probability).

    Args:
        first: one row per sample (``label``, ``prob``, ``correct``, ``target_prob``).
        target: the explained target (``label`` or ``pred``).

    Returns:
        ``[n]`` bounds, indexed as ``first``.
    """
    if target == "label" and "target_prob" in first.columns:
        return first["target_prob"].astype(np.float64)
    top = first["prob"].astype(np.float64)
    return top.where(first["correct"].astype(bool), np.minimum(top, 1.0 - top))


def class_ceilings(first: pd.DataFrame, target: str) -> dict[str, float]:
    """Per class, the highest :func:`label_ceiling` of its images (computed once per analysis, not per class)."""
    return {str(c): float(v) for c, v in label_ceiling(first, target).groupby(first["label"]).max().items()}


def _below(ceilings: dict[str, float], cls: str, least: float) -> float | None:
    """``cls``'s highest p(``cls``) where every image of it is below ``least``; None where one reaches it, or
    where the class has no image."""
    top = ceilings.get(cls)
    return None if top is None or top >= least else top


def out_of_reach(ceilings: dict[str, float], cls: str, least: float) -> str | None:
    """Why no intervention on ``cls``'s images can lower p(``cls``) by ``least`` (every image's p is below
    it: ``ceilings``, :func:`class_ceilings`), or None where one could (or the class has no image)."""
    top = _below(ceilings, cls, least)
    if top is None:
        return None
    return (
        f"no {cls} image has p({cls}) of {least:.2f} or more (highest {top:.3f}): no intervention can lower it "
        f"by the {least:.2f} a flag needs"
    )


def not_recognized(ceilings: dict[str, float], cls: str, least: float) -> str | None:
    """Why the background graft skips ``cls`` (no image of it reaches p(``cls``) ``least``), or None: not exact
    (see the module), so the reason says what it assumes."""
    top = _below(ceilings, cls, least)
    if top is None:
        return None
    return (
        f"no {cls} image has p({cls}) of {least:.2f} or more (highest {top:.3f}): the model does not recognise "
        f"{cls} on its own images, so its backgrounds were not grafted (assumed unable to raise p({cls}) by "
        f"the {least:.2f} a flag needs on other images)"
    )


def too_few_called(first: pd.DataFrame, cls: str, least: int) -> str | None:
    """Why a test on the images the model calls ``cls`` cannot run (fewer than ``least`` of them), or None."""
    own = first[first["label"] == cls]
    called = int((own["pred"] == cls).sum()) if "pred" in own.columns else len(own)
    if called >= least:
        return None
    return f"the model calls {called} of the {len(own)} {cls} images {cls}; a test needs {least}"


def probe_reason(what: str, got: float, least: float, n: int) -> str | None:
    """The probe's verdict: None where ``got`` reaches ``PROBE_SHARE`` of ``least`` (or is NaN: nothing
    told, the full test runs), else why the full test did not run."""
    if not np.isfinite(got) or got >= PROBE_SHARE * least:
        return None
    return (
        f"probe on {n} images: {what} {got:.3f}, under half of the {least:.2f} a flag needs; the full test did not run"
    )


def record(triaged: dict[str, str], cls: str, reason: str | None) -> bool:
    """Add ``cls``'s reason to ``triaged``; True where the class is left out (``reason`` given)."""
    if reason is None:
        return False
    triaged[cls] = reason
    return True
