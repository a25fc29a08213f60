"""The intervention images of each finding: the image before and after, with p(class) on both.

The most convincing evidence of a shortcut is the intervention itself: the tag removed and the class
gone, the tag pasted into another class's image and the class appearing, the object removed and the
class still called. Computed at the end of a run (it needs the model) for the most severe findings and
saved to ``maps/findings.npz`` (uint8 pairs), so ``auditor report`` re-renders without the model.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from auditor.ops import from_pixels, to_pixels
from auditor.shortcuts.catalog import evidence_ids
from auditor.shortcuts.findings import Example, Finding
from auditor.shortcuts.flags import Flag
from auditor.shortcuts.interventions import region_mask
from auditor.shortcuts.probes import inpaint, margin_masks
from auditor.store.rundir import RunDir, atomic_write_bytes

MAX_FINDINGS = 6
PER_FINDING = 3
SIDE = 128  # stored image side (pixels)

Loader = Callable[[int], dict[str, Any]]


def _pixels(x: Tensor, mean: Tensor | None, std: Tensor | None) -> np.ndarray:
    """``[3, S, S]`` normalized -> ``[SIDE, SIDE, 3]`` uint8."""
    img = to_pixels(x[None], mean, std)[0].clamp(0, 1)
    img = torch.nn.functional.interpolate(img[None], size=(SIDE, SIDE), mode="bilinear", align_corners=False)[0]
    return (img.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def _prob(model: nn.Module, x: Tensor, cls: int) -> float:
    with torch.no_grad():
        return float(model(x[None]).float().softmax(1)[0, cls])


def _rows(first: pd.DataFrame, cls: str, ids: Sequence[str], own: bool, n: int) -> list[tuple[int, str]]:
    """``(row, id)`` of the class's (or other classes') samples: correctly predicted first, cited ids first."""
    sub = first[(first["label"] == cls) == own]
    cited = sub[sub["id"].isin(ids)]
    rest = sub[~sub["id"].isin(ids)].sort_values("id")
    # images the model gets right first (an intervention on a misclassified image shows nothing), cited first
    both = pd.concat([cited, rest]).sort_values("correct", ascending=False, kind="stable").head(n)
    return list(zip(both["row"].astype(int), both["id"].astype(str), strict=True))


def _pair(before: np.ndarray, after: np.ndarray, key: str, pairs: dict[str, np.ndarray]) -> str:
    pairs[key] = np.stack([before, after])
    return key


def _region_examples(
    model: nn.Module, load: Loader, norm: tuple[Tensor | None, Tensor | None], f: Finding, first: pd.DataFrame,
    ids: Sequence[str], classes: list[str], pairs: dict[str, np.ndarray], n: int,
) -> list[Example]:  # fmt: skip
    cls = f["classes"][0]
    c = classes.index(cls)
    out: list[Example] = []
    own = _rows(first, cls, ids, True, n - 1)
    donors = []
    for row, sid in own:
        item = load(row)
        if not item["ok"]:
            continue
        x = item["image"]
        mask = region_mask(f["region"] or [0, 0, 0, 0], x.shape[-1]).to(x.device)
        removed = inpaint(x[None], mask[None])[0]
        donors.append(x)
        key = _pair(_pixels(x, *norm), _pixels(removed, *norm), f"{f['id']}|{sid}|removed", pairs)
        out.append({"key": key, "id": sid, "what": "region removed", "cls": cls,
                    "p_before": _prob(model, x, c), "p_after": _prob(model, removed, c)})  # fmt: skip
    for row, sid in _rows(first, cls, [], False, 1):
        item = load(row)
        if not donors or not item["ok"]:
            break
        x = item["image"]
        mask = region_mask(f["region"] or [0, 0, 0, 0], x.shape[-1]).to(x.device)
        pasted = torch.where(mask[None], donors[0], x)
        key = _pair(_pixels(x, *norm), _pixels(pasted, *norm), f"{f['id']}|{sid}|pasted", pairs)
        out.append({"key": key, "id": sid, "what": "region pasted", "cls": cls,
                    "p_before": _prob(model, x, c), "p_after": _prob(model, pasted, c)})  # fmt: skip
    return out


def _background_examples(
    model: nn.Module, load: Loader, norm: tuple[Tensor | None, Tensor | None], f: Finding, first: pd.DataFrame,
    ids: Sequence[str], classes: list[str], pairs: dict[str, np.ndarray], n: int,
) -> list[Example]:  # fmt: skip
    out: list[Example] = []
    per_class = max(1, n // max(len(f["classes"]), 1))
    for cls in f["classes"]:
        c = classes.index(cls)
        mine = 0
        for row, sid in _rows(first, cls, ids, True, 4 * n):
            if mine >= per_class:
                break
            item = load(row)
            if not item.get("ok") or not item.get("has_mask") or not bool(item["mask"].any()):
                continue
            x = item["image"]
            removed = inpaint(x[None], margin_masks(item["mask"][None].to(x.device)))[0]
            key = _pair(_pixels(x, *norm), _pixels(removed, *norm), f"{f['id']}|{sid}|object", pairs)
            out.append({"key": key, "id": sid, "what": "object removed (with a margin)", "cls": cls,
                        "p_before": _prob(model, x, c), "p_after": _prob(model, removed, c)})  # fmt: skip
            mine += 1
    return out


def _shift_examples(
    model: nn.Module, load: Loader, norm: tuple[Tensor | None, Tensor | None], f: Finding, first: pd.DataFrame,
    ids: Sequence[str], classes: list[str], pairs: dict[str, np.ndarray], n: int, delta: Sequence[float],
) -> list[Example]:  # fmt: skip
    """The class's images shifted toward the other classes' colour, and one other image shifted toward its."""
    cls = f["classes"][0]
    c = classes.index(cls)
    mean, std = norm
    out: list[Example] = []
    for own, sign, what in ((True, 1.0, "colour shifted away"), (False, -1.0, "colour shifted toward")):
        for row, sid in _rows(first, cls, ids, own, n - 1 if own else 1):
            item = load(row)
            if not item["ok"]:
                continue
            x = item["image"]
            d = torch.tensor(list(delta), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            shifted = from_pixels((to_pixels(x[None], mean, std) + sign * d).clamp(0, 1), mean, std)[0]
            key = _pair(_pixels(x, *norm), _pixels(shifted, *norm), f"{f['id']}|{sid}|{what}", pairs)
            out.append({"key": key, "id": sid, "what": what, "cls": cls,
                        "p_before": _prob(model, x, c), "p_after": _prob(model, shifted, c)})  # fmt: skip
    return out


def finding_examples(
    findings: list[Finding],
    flags: Sequence[Flag],
    first: pd.DataFrame,
    model: nn.Module,
    load: Loader,
    norm: tuple[Tensor | None, Tensor | None],
    classes: list[str],
    rundir: RunDir,
) -> list[Finding]:
    """Add ``examples`` to the most severe findings (region and background causes) and save their images.

    Args:
        findings: grouped findings (most severe first).
        flags: the run's flags (their evidence ids pick the images).
        first: one row per sample (``row``, ``id``, ``label``, ``correct``).
        model: the classifier in eval mode.
        load: row -> ``auditor.io.dataset.AuditDataset.load`` output (normalized image on the model's device).
        norm: ``(mean, std)`` of the normalization, or ``(None, None)``.
        classes: class names in model order.
        rundir: where ``maps/findings.npz`` goes.
    """
    by_id = {f["id"]: f for f in flags}
    pairs: dict[str, np.ndarray] = {}
    out = []
    for i, f in enumerate(findings):
        f = {**f, "examples": []}
        if i < MAX_FINDINGS and f["severity"] in ("high", "medium"):
            ids = [s for fid in f["flags"] if fid in by_id for s in evidence_ids(by_id[fid])]
            args = (model, load, norm, f, first, ids, classes, pairs, PER_FINDING)
            if f["cause"] == "region" and f["region"] is not None:
                f["examples"] = _region_examples(*args)
            elif f["cause"] == "background":
                f["examples"] = _background_examples(*args)
            elif f["cause"] == "property":
                cue = next(by_id[i] for i in f["flags"] if i in by_id and by_id[i]["kind"] == "global_cue")
                f["examples"] = _shift_examples(*args, cue["evidence"]["delta"])
        out.append(f)
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k.replace("/", "~"): v for k, v in pairs.items()})  # type: ignore[arg-type]
    atomic_write_bytes(rundir.findings_arrays_path, buf.getvalue())
    return out
