"""The intervention images of each finding: the image before and after, with p(class) on both.

Which images and which interventions is the leading analysis's choice (its ``examples`` hook,
:mod:`auditor.shortcuts.examples`); this module carries them out with the model (:class:`Maker`, through the
run's :class:`~auditor.run.access.ModelAccess`) for the most severe findings and saves the pairs to
``maps/findings.npz`` (uint8), so ``auditor report`` re-renders without the model.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from auditor.ops import from_pixels, to_pixels
from auditor.run.access import ModelAccess
from auditor.shortcuts.catalog import causes, evidence_ids, registered
from auditor.shortcuts.examples import Region
from auditor.shortcuts.findings import Example, Finding
from auditor.shortcuts.flags import Flag
from auditor.shortcuts.interventions import region_mask
from auditor.shortcuts.probes import inpaint, margin_masks
from auditor.store.rundir import RunDir, atomic_write_bytes

MAX_FINDINGS = 6
PER_FINDING = 3
SIDE = 128  # stored image side (pixels)
KEY_SUFFIX = {"region removed": "removed", "region pasted": "pasted", "object removed (with a margin)": "object"}


class Maker:
    """Carries out one finding's example interventions (``shortcuts.examples.ExampleMaker``) and keeps the pairs.

    Args:
        access: the run's model access.
        classes: class names in model order.
        finding_id: prefixes the pairs' keys.
        ids: ``row -> sample id``.
        pairs: where the ``[2, SIDE, SIDE, 3]`` uint8 pairs go, by key.
    """

    def __init__(
        self,
        access: ModelAccess,
        classes: list[str],
        finding_id: str,
        ids: dict[int, str],
        pairs: dict[str, np.ndarray],
    ) -> None:
        self.access, self.classes, self.finding_id, self.ids, self.pairs = access, classes, finding_id, ids, pairs

    def _image(self, row: int) -> Tensor | None:
        item = self.access.item(row)
        return item["image"] if item["ok"] else None

    def _example(self, row: int, cls: str, before: Tensor, after: Tensor, what: str) -> Example:
        sid, c = self.ids[row], self.classes.index(cls)
        key = f"{self.finding_id}|{sid}|{KEY_SUFFIX.get(what, what)}"
        self.pairs[key] = np.stack([self._pixels(before), self._pixels(after)])
        with torch.no_grad():
            p = self.access.model(torch.stack([before, after])).float().softmax(1)[:, c].tolist()
        return {"key": key, "id": sid, "what": what, "cls": cls, "p_before": p[0], "p_after": p[1]}

    def _pixels(self, x: Tensor) -> np.ndarray:
        """``[3, S, S]`` normalized -> ``[SIDE, SIDE, 3]`` uint8."""
        img = to_pixels(x[None], self.access.mean, self.access.std)[0].clamp(0, 1)
        img = torch.nn.functional.interpolate(img[None], size=(SIDE, SIDE), mode="bilinear", align_corners=False)[0]
        return (img.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)

    def remove_region(self, row: int, cls: str, region: Region, what: str = "region removed") -> Example | None:
        x = self._image(row)
        if x is None:
            return None
        mask = region_mask(region, x.shape[-1]).to(x.device)
        return self._example(row, cls, x, inpaint(x[None], mask[None])[0], what)

    def paste_region(
        self, row: int, donor: int, cls: str, region: Region, what: str = "region pasted"
    ) -> Example | None:
        x, d = self._image(row), self._image(donor)
        if x is None or d is None:
            return None
        mask = region_mask(region, x.shape[-1]).to(x.device)
        return self._example(row, cls, x, torch.where(mask[None], d, x), what)

    def remove_object(self, row: int, cls: str) -> Example | None:
        item = self.access.item(row)
        if not item.get("ok") or not item.get("has_mask") or not bool(item["mask"].any()):
            return None
        x = item["image"]
        removed = inpaint(x[None], margin_masks(item["mask"][None].to(x.device)))[0]
        return self._example(row, cls, x, removed, "object removed (with a margin)")

    def shift_colour(self, row: int, cls: str, delta: Sequence[float], sign: float, what: str) -> Example | None:
        x = self._image(row)
        if x is None:
            return None
        mean, std = self.access.mean, self.access.std
        d = torch.tensor(list(delta), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        shifted = from_pixels((to_pixels(x[None], mean, std) + sign * d).clamp(0, 1), mean, std)[0]
        return self._example(row, cls, x, shifted, what)


def _lead(finding: Finding, by_id: dict[str, Flag]) -> Flag | None:
    """The flag that leads the finding: the first (most severe) of its cause's leading kinds, else its first."""
    kinds = causes()
    flags = [by_id[i] for i in finding["flags"] if i in by_id]
    leading = [f for f in flags if (c := kinds.get(f["kind"])) is not None and c.leads and c.name == finding["cause"]]
    chosen = leading or flags
    return chosen[0] if chosen else None


def finding_examples(
    findings: list[Finding], flags: Sequence[Flag], first: pd.DataFrame, access: ModelAccess, classes: list[str],
    rundir: RunDir,
) -> list[Finding]:  # fmt: skip
    """Add ``examples`` to the most severe findings (high and medium, at most :data:`MAX_FINDINGS`), chosen by
    the hook of the analysis whose flag leads each, and save their images.

    Args:
        findings: grouped findings (most severe first).
        flags: the run's flags (their evidence ids pick the images).
        first: one row per sample (``row``, ``id``, ``label``, ``correct``).
        access: the run's model access.
        classes: class names in model order.
        rundir: where ``maps/findings.npz`` goes.
    """
    by_id = {f["id"]: f for f in flags}
    hooks = {k: a.examples for a in registered() for k in a.kinds if a.examples is not None}
    ids = dict(zip(first["row"].astype(int), first["id"].astype(str), strict=True))
    pairs: dict[str, np.ndarray] = {}
    out = []
    for i, f in enumerate(findings):
        f = {**f, "examples": []}
        lead = _lead(f, by_id)
        if i < MAX_FINDINGS and f["severity"] in ("high", "medium") and lead is not None and lead["kind"] in hooks:
            cited = [s for fid in f["flags"] if fid in by_id for s in evidence_ids(by_id[fid])]
            maker = Maker(access, classes, f["id"], ids, pairs)
            f["examples"] = hooks[lead["kind"]](f, by_id, first, cited, maker, PER_FINDING)
        out.append(f)
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k.replace("/", "~"): v for k, v in pairs.items()})  # type: ignore[arg-type]
    atomic_write_bytes(rundir.findings_arrays_path, buf.getvalue())
    return out
