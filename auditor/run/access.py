"""One model-access object for everything after the map stage.

The analyses' interventions, the region scan, the colour shifts, the concepts' activations, the findings'
example images and the deep dive all reload images of the audit set and forward them through the model.
:class:`ModelAccess` is built once per run from the :class:`~auditor.run.setup.Plan`: it holds the model,
the device, the normalization tensors (once), the forward chunk and the analysis layer (resolved once, on
first use), and implements :class:`~auditor.shortcuts.registry.Intervener`, what an analysis may ask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor, nn

from auditor.cams import CAMS
from auditor.cams.core import model_state
from auditor.cams.layers import layer_pass, resolve_layer
from auditor.io.sources import sample_key
from auditor.ops import from_pixels, to_pixels
from auditor.run.setup import Plan
from auditor.shortcuts.interventions import (
    Region,
    graft_intervention,
    occlusion_scan,
    region_intervention,
    region_mask,
    shift_intervention,
)
from auditor.shortcuts.probes import margin_masks

HOT_MASS = 0.5  # without a mask, the spared pixels hold this share of the map's mass ...
HOT_AREA = 0.25  # ... and at most this share of the image


class Counted(nn.Module):
    """The model, counting the images forwarded through it (``images``): what the analyses cost, measured
    rather than estimated. It holds the model as a submodule and changes nothing about it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.images = 0

    def forward(self, x: Tensor) -> Tensor:
        self.images += int(x.shape[0])
        return self.model(x)


class ModelAccess:
    """The model and the audit set's images, for the reduce stage (satisfies ``Intervener``).

    Attributes:
        model: the classifier in eval mode on its device.
        device: its device.
        mean, std: ``[3, 1, 1]`` normalization tensors on the device, or None (images are not normalized).
    """

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.model: nn.Module = plan.loaded.module
        self.counted = Counted(self.model)  # the interventions forward through it
        self._activation_images = 0
        self.device = plan.device
        self.mean, self.std = plan.mean, plan.std
        self._layer: str | None = None
        self._compact: dict[tuple[tuple[int, ...], str | None], float | None] = {}  # a class's graft runs 1-3 times

    # -- images ---------------------------------------------------------------------------------------------

    def load(self, rows: Sequence[int]) -> Tensor:
        """Rows -> ``[n, 3, S, S]`` normalized images on the model's device (reloaded from the files)."""
        return torch.stack([self.plan.dataset.load(int(r))["image"] for r in rows]).to(self.device)

    def item(self, row: int) -> dict[str, Any]:
        """Row -> the dataset's sample dict (``ok``, ``image``, ``mask``, ``has_mask``), its image on the device."""
        item = self.plan.dataset.load(int(row))
        if item["ok"]:
            item["image"] = item["image"].to(self.device)
        return item

    def to_pixels(self, x: Tensor) -> Tensor:
        """Normalized images -> pixel space [0, 1]."""
        return to_pixels(x, self.mean, self.std)

    def from_pixels(self, x: Tensor) -> Tensor:
        """Pixel space -> the model's normalization."""
        return from_pixels(x, self.mean, self.std)

    # -- Intervener -----------------------------------------------------------------------------------------

    def region_test(
        self,
        own_rows: Sequence[int],
        other_rows: Sequence[int],
        cls: int,
        region: Region,
        control: Region,
        seed: int,
    ) -> dict[str, Any]:
        keys = [sample_key(self.plan.samples[r].id, seed, "impute") for r in own_rows]
        return region_intervention(
            self.counted, self.load, own_rows, other_rows, cls, region, control,
            to_pixels=self.to_pixels, from_pixels=self.from_pixels, noise_keys=keys,
        )  # fmt: skip

    def scan(self, rows: Sequence[int], cls: int | Sequence[int], boxes: Sequence[Sequence[float]]) -> np.ndarray:
        return occlusion_scan(self.counted, self.load(rows), cls, boxes, chunk=self.plan.chunk)

    def shift_test(
        self,
        own_rows: Sequence[int],
        other_rows: Sequence[int],
        cls: int,
        delta: Sequence[float],
        method: str | None,
        outside: bool = True,
    ) -> dict[str, Any]:
        keep = (lambda rows: self.spared(rows, method)) if outside else None
        return shift_intervention(
            self.counted, self.load, own_rows, other_rows, cls, delta,
            to_pixels=self.to_pixels, from_pixels=self.from_pixels, keep=keep,
        )  # fmt: skip

    def graft_test(
        self,
        own_rows: Sequence[int],
        other_rows: Sequence[int],
        cls: int,
        method: str | None,
        spare: Mapping[int, Sequence[Sequence[float]]] | None = None,
    ) -> dict[str, Any]:
        size = self.plan.cfg.data.image_size

        def keep(rows: Sequence[int]) -> Tensor:
            out = self.spared(rows, method)
            for i, row in enumerate(rows):
                if boxes := (spare or {}).get(int(row)):
                    out[i] |= region_mask([list(b) for b in boxes], size).to(out.device)
            return out

        result = graft_intervention(self.counted, self.load, own_rows, other_rows, cls, keep=keep)
        own, other = self.compactness(own_rows, method), self.compactness(other_rows, method)
        return result | {"own_compact": own, "other_compact": other}

    def compactness(self, rows: Sequence[int], method: str | None) -> float | None:
        """Over the images without a mask, the mean share of their hot pixels (:meth:`spared`) in its largest
        connected part: near 1 where the map points at one place (an object), lower where it spreads over the
        image (a texture); None where every image has a mask or no map. Kept per (rows, method): the graft
        redone with the model-found objects reads the same images' maps again."""
        key = (tuple(int(r) for r in rows), method)
        if key not in self._compact:
            self._compact[key] = self._compactness(rows, method)
        return self._compact[key]

    def _compactness(self, rows: Sequence[int], method: str | None) -> float | None:
        maps = self._maps(method)
        shares = []
        for row in rows:
            item = self.plan.dataset.load(int(row))
            if maps is None or (item["ok"] and item["has_mask"] and bool(item["mask"].any())):
                continue
            if np.isfinite(maps[row]).all() and float(np.max(maps[row])) > 0:
                hot = _hot_pixels(np.asarray(maps[row], np.float32), self.plan.cfg.data.image_size).numpy()
                parts, n = ndimage.label(hot)
                shares.append(float(np.bincount(parts.ravel())[1:].max() / hot.sum()) if n else 0.0)
        return float(np.mean(shares)) if shares else None

    @property
    def has_activations(self) -> bool:
        """A hookable model whose run used a layer method: the analysis layer exists (checked at set-up)."""
        plan = self.plan
        return not plan.loaded.scripted and any(CAMS[m].needs != "nothing" for m in plan.methods)

    def activations(self, rows: Sequence[int]) -> np.ndarray:
        """``[n, K, h, w]`` float32 activations of the run's target layer (the deepest, for a list), or of the
        finer layer LayerCAM fuses when the target layer's grid is under 7 x 7 (``run.localization``)."""
        given = self.plan.cfg.model.target_layer
        name = given if isinstance(given, str) or given is None else list(given)[-1]
        name = self.plan.localization.get("fine_layer") or name
        parts = []
        with model_state(self.model):
            for start in range(0, len(rows), self.plan.chunk):
                x = self.load(rows[start : start + self.plan.chunk])
                self._layer = self._layer or resolve_layer(self.model, name, x)
                targets = torch.zeros(len(x), dtype=torch.long, device=x.device)  # no gradient: any class
                _, data = layer_pass(self.model, x, targets, [self._layer], grad=False)
                self._activation_images += len(x)
                parts.append(data[self._layer].activations.cpu().numpy())
        return np.concatenate(parts)

    @property
    def forwards(self) -> int:
        """Images forwarded by the interventions, scans, shifts and activation passes so far."""
        return self.counted.images + self._activation_images

    # -- the pixels a colour shift spares -------------------------------------------------------------------

    def _maps(self, method: str | None) -> np.ndarray | None:
        """``method``'s stored maps (of the labels, else of the predictions), or None."""
        found = [self.plan.store.load_maps(method, t) for t in ("label", "prediction")] if method else []
        return next((m for m in found if m is not None), None)

    def spared(self, rows: Sequence[int], method: str | None) -> Tensor:
        """``[n, S, S]`` bool: each image's object grown by a margin where it has a mask or boxes; else the
        smallest set of pixels holding half of ``method``'s map mass, at most a quarter of the image (where the
        model looks; a diffuse map, as a colour cast gives, spares little); else nothing."""
        maps = self._maps(method)
        size = self.plan.cfg.data.image_size
        out = torch.zeros(len(rows), size, size, dtype=torch.bool)
        for i, row in enumerate(rows):
            item = self.plan.dataset.load(int(row))
            if item["ok"] and item["has_mask"] and bool(item["mask"].any()):
                out[i] = margin_masks(item["mask"][None])[0]
            elif maps is not None and np.isfinite(maps[row]).all() and float(np.max(maps[row])) > 0:
                out[i] = _hot_pixels(np.asarray(maps[row], np.float32), size)
        return out.to(self.device)


def _hot_pixels(low_res: np.ndarray, size: int) -> Tensor:
    """``[size, size]`` bool: the smallest set of pixels holding :data:`HOT_MASS` of the upsampled map's mass,
    at most :data:`HOT_AREA` of the image."""
    low = torch.from_numpy(low_res)[None, None]
    up = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False).flatten().clamp_min(0)
    order = torch.argsort(up, descending=True)
    mass = torch.cumsum(up[order], 0) / up.sum()
    k = min(int((mass < HOT_MASS).sum()) + 1, int(size * size * HOT_AREA))
    out = torch.zeros(size * size, dtype=torch.bool)
    out[order[:k]] = True
    return out.view(size, size)
