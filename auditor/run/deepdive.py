"""Per-sample deep dive for flagged samples, computed at the end of a run and saved for the report.

For up to ``DEEP_DIVE`` samples named by the most severe flags: guided backprop, occlusion, and the target
layer's feature maps (the channels with the largest Grad-CAM weights), saved to ``maps/deepdive.npz`` with an
index in ``deepdive.json``, so that ``auditor report`` re-renders without touching the model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from auditor.cams import compute_cams
from auditor.cams.core import model_state
from auditor.cams.layers import layer_pass, resolve_layer
from auditor.errors import MethodNotApplicableError
from auditor.shortcuts.catalog import evidence_ids
from auditor.shortcuts.flags import Flag
from auditor.store.rundir import DEEPDIVE, RunDir, atomic_write_bytes, one_row_per_sample

DEEP_DIVE = 6
CHANNELS = 8


def pick_samples(flags: list[Flag], limit: int = DEEP_DIVE) -> list[str]:
    """Sample ids named in the evidence of the most severe flags (flags are already ordered)."""
    chosen: list[str] = []
    for f in flags:
        # one sample per flag first, so several findings are covered
        new = next((sid for sid in evidence_ids(f) if sid not in chosen), None)
        if new is not None:
            chosen.append(new)
        if len(chosen) >= limit:
            break
    return chosen[:limit]


def compute(
    model: nn.Module, images: Tensor, targets: Tensor, layer: str | None, scripted: bool, occlusion: dict[str, Any]
) -> dict[str, np.ndarray]:
    """Guided backprop ``[n, H, W]``, occlusion ``[n, H, W]`` and top feature maps ``[n, 8, h, w]`` (+ indices)."""
    out: dict[str, np.ndarray] = {}
    res = compute_cams(model, images, targets, methods=["occlusion"], options={"occlusion": occlusion})
    out["occlusion"] = res["occlusion"].low_res.cpu().numpy()
    if scripted:
        return out
    try:
        out["guided_backprop"] = (
            compute_cams(model, images, targets, methods=["guided_backprop"])["guided_backprop"].low_res.cpu().numpy()
        )
    except MethodNotApplicableError as err:  # recorded in deepdive.json and shown in the report
        out["_note_guided_backprop"] = np.array(str(err))
    with model_state(model):
        name = resolve_layer(model, layer if isinstance(layer, str) else None, images)
        _, data = layer_pass(model, images, targets, [name], grad=True)
    acts, grads = data[name].activations, data[name].gradients
    assert grads is not None
    alpha = grads.mean((2, 3))  # Grad-CAM channel weights
    top = alpha.argsort(1, descending=True)[:, :CHANNELS]
    out["feature_maps"] = acts[torch.arange(acts.shape[0], device=acts.device)[:, None], top].cpu().numpy()
    out["feature_channels"] = top.cpu().numpy()
    out["feature_weights"] = torch.gather(alpha, 1, top).cpu().numpy()
    return out


def save(
    rundir: RunDir, ids: Sequence[str], rows: Sequence[int], arrays: dict[str, np.ndarray], layer: str | None
) -> None:
    """Write ``maps/deepdive.npz`` and ``deepdive.json``."""
    import io

    notes = {k.removeprefix("_note_"): str(v) for k, v in arrays.items() if k.startswith("_note_")}
    kept: dict[str, Any] = {k: v for k, v in arrays.items() if not k.startswith("_note_")}
    buf = io.BytesIO()
    np.savez_compressed(buf, **kept)
    atomic_write_bytes(rundir.deepdive_arrays_path, buf.getvalue())
    meta = {"ids": list(ids), "rows": [int(r) for r in rows], "layer": layer, "arrays": sorted(kept), "notes": notes}
    rundir.write_bytes(DEEPDIVE, json.dumps(meta, indent=2).encode())


def run_deepdive(
    rundir: RunDir,
    flags: list[Flag],
    table: Any,
    model: nn.Module,
    load: Callable[[Sequence[int]], Tensor],
    class_index: dict[str, int],
    layer: str | None,
    scripted: bool,
    occlusion: dict[str, Any],
) -> list[str]:
    """Pick the flagged samples, compute their deep dive and save it; returns the ids."""
    ids = pick_samples(flags)
    first = one_row_per_sample(table).set_index("id")
    ids = [i for i in ids if i in first.index]
    if not ids:
        return []
    rows = [int(first.loc[i, "row"]) for i in ids]
    targets = torch.tensor([class_index[first.loc[i, "label"]] for i in ids])
    images = load(rows)
    arrays = compute(model, images, targets.to(images.device), layer, scripted, occlusion)
    save(rundir, ids, rows, arrays, layer)
    return ids
