"""The map stage: one batch of samples -> its rows of ``samples.parquet``, low-res maps and curves.

:func:`map_batch` reads nothing but its arguments and writes nothing: it returns a :class:`BatchOutput`
that a driver commits to the run directory (:func:`commit`). The local loop calls it today; shard and
Ray drivers call the same function. Per batch: one forward (+ one backward to the target layer) for the
cheap methods, chunked forwards for the perturbation methods on the ``expensive`` subset, metrics on the
upsampled maps, and the per-sample probes of the shortcut analyses.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from auditor.cams import CAMS, CamResult, compute_cams
from auditor.config import AuditConfig
from auditor.io.containers import locator
from auditor.io.dataset import drop
from auditor.io.sources import SampleSpec, sample_key
from auditor.metrics import METRICS, MetricInputs
from auditor.metrics.registry import metric_columns
from auditor.ops import to_pixels
from auditor.shortcuts.probes import Partners, background_colour, counterfactuals, image_properties, mask_grid
from auditor.store.rundir import RunStore, map_key

NONFINITE = "non-finite model output (NaN or inf logits)"
PIXEL_STORE = 64  # pixel-space maps (occlusion, RISE, guided) are stored average-pooled to at most 64 x 64


@dataclass(frozen=True)
class MapSpec:
    """Everything the map stage reads; immutable, so a second pass is a new spec, never a mutation.

    Attributes:
        cfg: the run's configuration (options, seed, target, mixed precision).
        model: the classifier in eval mode.
        device: where the model runs.
        samples: every sample of the run (rows index it).
        classes: class names in model output order.
        methods: resolved method names.
        metrics: resolved metric names.
        layer: target layer name (None: auto).
        expensive: ``[n]`` bool, the samples that get the expensive methods and metrics.
        probe: ``[n]`` bool, the samples that get the counterfactual forwards.
        mean, std: ``[3]`` input normalization or None.
        chunk: images per forward inside methods and metrics.
        faithful: the methods whose maps get the metrics that need the model (``expensive.faithfulness``).
        overlap: leave the host side of each batch pending (the driver runs it while the device computes
            the next batch).
    """

    cfg: AuditConfig
    model: nn.Module
    device: torch.device
    samples: list[SampleSpec]
    classes: list[str]
    methods: list[str]
    metrics: list[str]
    layer: Any
    expensive: np.ndarray
    probe: np.ndarray
    mean: Tensor | None
    std: Tensor | None
    chunk: int
    faithful: tuple[str, ...] = ()
    overlap: bool = False


@dataclass
class BatchOutput:
    """What one batch produced, before it is committed.

    Attributes:
        frame: the batch's rows of ``samples.parquet``.
        maps: ``{map_key: (rows [k], float16 maps [k, h, w])}``.
        curves: ``{(curve, map_key): (rows [k], float32 curves [k, steps])}``.
        objects: ``(rows [k], float16 object grids [k, 32, 32])`` or None.
        images: images audited (skipped files excluded).
        seconds: time per stage.
        skipped: every ``(row, reason)`` skipped in this batch (unreadable files, non-finite outputs).
        nonfinite: how many samples were skipped for non-finite logits.
        finish: the host side (CPU metrics, the frame), pending when the spec overlaps it with the next
            batch's device work; :meth:`complete` runs it.
    """

    frame: pd.DataFrame
    maps: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    curves: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    objects: tuple[np.ndarray, np.ndarray] | None = None
    images: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[tuple[int, str]] = field(default_factory=list)
    nonfinite: int = 0
    finish: Callable[[], None] | None = None

    def complete(self) -> BatchOutput:
        """Run the host side if it is still pending (the driver may do this on another thread)."""
        if self.finish is not None:
            finish, self.finish = self.finish, None
            finish()
        return self

    def tick(self, key: str, start: float) -> float:
        now = time.perf_counter()
        self.seconds[key] = self.seconds.get(key, 0.0) + now - start
        return now


def commit(store: RunStore, out: BatchOutput, batch: int, kind: str) -> None:
    """Write a batch's maps, curves and object grids, then (atomically, last) its parquet part."""
    for key, (rows, values) in out.maps.items():
        store.maps(key, tuple(values.shape[1:]))[rows] = values
    for (curve, key), (rows, values) in out.curves.items():
        store.curves(curve, key, tuple(values.shape[1:]))[rows] = values
    if out.objects is not None:
        rows, values = out.objects
        store.objects(tuple(values.shape[1:]))[rows] = values
    store.write_part(batch, out.frame, kind)


def _low_res(low: Tensor) -> np.ndarray:
    if low.shape[-1] > PIXEL_STORE:
        low = torch.nn.functional.adaptive_avg_pool2d(low[:, None], PIXEL_STORE)[:, 0]
    return low.detach().cpu().numpy().astype(np.float16)


@dataclass
class _Batch:
    """One batch on the device, with what every step of :func:`map_batch` shares."""

    raw: dict[str, Any]
    idx: Tensor
    images: Tensor
    labels: Tensor
    out: BatchOutput
    keys: Tensor  # [B] int64 keys of the samples' random draws (_keys)

    @property
    def rows(self) -> np.ndarray:
        return self.idx.numpy()


def _metric_inputs(
    spec: MapSpec, b: _Batch, maps: Tensor, sel: Tensor, targets: Tensor, base: Tensor | None
) -> Callable[[Tensor], MetricInputs]:
    """A function ``pick -> MetricInputs`` over the positions ``sel`` of the batch, on the maps' device."""
    dev = maps.device
    masks = (b.raw["mask"].to(dev) & b.raw["has_mask"].to(dev)[:, None, None])[sel]
    boxes = [b.raw["boxes"][i].to(dev) for i in sel.tolist()]

    def make(pick: Tensor) -> MetricInputs:
        return MetricInputs(
            maps=maps[pick],
            masks=masks[pick],
            boxes=[boxes[i] for i in pick.tolist()],
            scale=b.raw["scale"][sel][pick].to(dev),
            model=spec.model,
            images=b.images[sel][pick],
            targets=targets[pick],
            mean=spec.mean,
            std=spec.std,
            batch_size=spec.chunk,
            seed=spec.cfg.seed,
            mixed_precision=spec.cfg.mixed_precision,
            cache={} if base is None else {"base_probs": base[pick]},
            sample_keys=b.keys[sel][pick],
        )

    return make


Columns = dict[str, list[tuple[str, np.ndarray]]]  # metric name -> its columns (value first, then extras)


def _metric_columns(
    spec: MapSpec,
    b: _Batch,
    maps: Tensor,
    sel: Tensor,
    targets: Tensor,
    method: str,
    target: str,
    base: Tensor | None,
    host: bool,
) -> Columns:
    """The configured metrics of one side (``host``: computed on the CPU) for the maps of ``sel``.

    NaN where not computed. ``base`` (``[len(sel)]``, the explained class's probability on the unperturbed
    images, from the CAM pass's own forward) spares the faithfulness metrics one forward per image and
    method. Curves go to ``b.out.curves``. Metrics that need the model run only on ``spec.faithful``
    methods' maps.
    """
    names = [name for name in spec.metrics if METRICS[name].host == host]
    if not names:
        return {}
    key = map_key(method, target)
    n = int(sel.numel())
    rows = b.rows[sel.numpy()]
    make = _metric_inputs(spec, b, maps, sel, targets, base)
    every = torch.arange(n)
    subset = torch.from_numpy(spec.expensive[rows]).nonzero().flatten()
    inputs = {"all": make(every), "subset": make(subset) if subset.numel() else None}
    any_mask = bool(b.raw["has_mask"][sel].any())
    cols: Columns = {}
    for name in names:
        metric = METRICS[name]
        pick, given = (subset, inputs["subset"]) if metric.expensive else (every, inputs["all"])
        skip = (metric.needs == "mask" and not any_mask) or (metric.needs == "model" and method not in spec.faithful)
        if skip or given is None:
            cols[name] = [(name, np.full(n, np.nan))]
            continue
        cols[name] = []
        start = time.perf_counter()
        result = metric(given, **spec.cfg.metric_options.get(name, {}))
        b.out.tick(f"metric:{name}", start)
        undeclared = set(result.extras) - set(metric.outputs())
        if undeclared:  # the registry is the one list of columns: aggregates and compare read it
            raise RuntimeError(f"metric {name!r} returned undeclared outputs {sorted(undeclared)}; declare them")
        for col, values in [(name, result.value), *result.extras.items()]:
            v = values.detach().float().cpu().numpy()
            if v.ndim == 2:  # a curve: kept in curves/, not in the table
                b.out.curves[(col, key)] = (rows[pick.numpy()], v)
                continue
            full = np.full(n, np.nan)
            full[pick.numpy()] = v
            cols[name].append((col, full))
    return cols


def _probes(spec: MapSpec, b: _Batch) -> dict[str, np.ndarray]:
    """Per-sample inputs of the shortcut analyses: image properties, object grid, counterfactual predictions."""
    start = time.perf_counter()
    pixels = to_pixels(b.images, spec.mean, spec.std)
    out = {f"prop_{k}": v.float().cpu().numpy() for k, v in image_properties(pixels.clamp(0, 1)).items()}
    masks = b.raw["mask"].to(spec.device)
    usable = b.raw["has_mask"].to(spec.device) & masks.flatten(1).any(1)
    background = background_colour(pixels.clamp(0, 1), masks, usable).float().cpu().numpy()
    out |= {f"bg_{c}": background[:, i] for i, c in enumerate(("red", "green", "blue"))}
    # Counterfactual forwards (6 per image) run on a stratified subset: per-class rates need tens of images.
    in_subset = torch.from_numpy(spec.probe[b.rows]).to(spec.device)
    if bool(usable.any()):
        keep = usable.cpu().numpy()
        b.out.objects = (b.rows[keep], mask_grid(masks[usable]).cpu().numpy().astype(np.float16))
    start = b.out.tick("probes", start)
    partners = None
    if "partner_image" in b.raw:
        raw = b.raw
        partners = Partners(
            raw["partner_image"].to(spec.device),
            raw["partner_mask"].to(spec.device),
            raw["partner_label"],
            raw["has_partner"],
        )
    cf = counterfactuals(spec.model, b.images, masks, b.labels, usable & in_subset, partners)
    for key, value in cf.items():
        v = value.numpy()
        if key.endswith(("_pred", "_label")):
            out[key] = np.array([spec.classes[int(c)] if c >= 0 else "" for c in v], dtype=object)
        else:
            out[key] = v.astype(np.float64)
    b.out.tick("counterfactuals", start)  # forwards on the stratified subset only: a fixed cost
    return out


@dataclass(frozen=True)
class _Explained:
    """The model's outputs on the batch and one explained target's choice of samples."""

    probs: Tensor
    preds: Tensor
    target: str
    targets: Tensor
    sel: Tensor


def _rows(spec: MapSpec, b: _Batch, e: _Explained, sel: Tensor, method: str, valid: Tensor) -> dict[str, Any]:
    """The per-sample columns of one method's rows that are not metrics (CPU values: no device left)."""
    rows = b.rows[sel.numpy()]
    specs = [spec.samples[i] for i in rows.tolist()]
    s = sel.tolist()
    data: dict[str, Any] = {
        "row": rows.astype(np.int64),
        "id": [sp.id for sp in specs],
        "path": [locator(sp.path, sp.member) for sp in specs],
        "label": [spec.classes[int(b.labels[i])] for i in s],
        "pred": [spec.classes[int(e.preds[i])] for i in s],
        "prob": e.probs.max(1).values[sel].cpu().numpy().astype(np.float64),
        "correct": (e.preds[sel] == b.labels[sel]).cpu().numpy(),
        "method": method,
        "target": e.target,
        "target_class": [spec.classes[int(c)] for c in e.targets[sel].tolist()],
        "target_prob": e.probs.gather(1, e.targets[:, None])[:, 0][sel].cpu().numpy().astype(np.float64),
        "map_valid": valid.cpu().numpy(),
        "expensive": spec.expensive[rows],
        "mask_source": [b.raw["mask_source"][i] for i in s],
        "sha1": [b.raw["sha1"][i] for i in s],
    }
    return data


@dataclass
class _Pending:
    """One method's rows, waiting for the host-side metrics before they become a frame."""

    data: dict[str, Any]
    device_cols: Columns
    host_cols: Callable[[], Columns]
    tail: dict[str, Any]  # per-sample probe columns, then metadata


def _finish(spec: MapSpec, out: BatchOutput, pending: list[_Pending]) -> None:
    """The host side of a batch: host metrics, then the frame.

    Every frame has every configured metric column, in the registry's order, NaN where the metric did not run
    (an expensive metric on a batch without an expensive sample): otherwise the parts' columns, and so the
    order of ``samples.parquet``'s columns, depended on which batch held the first expensive sample.
    """
    start = time.perf_counter()
    frames = []
    for p in pending:
        parts = {**p.device_cols, **p.host_cols()}
        cols = {col: arr for name in spec.metrics for col, arr in parts.get(name, [])}
        n = len(p.data["row"])
        every = {col: cols.get(col, np.full(n, np.nan)) for col in metric_columns(spec.metrics)}
        frames.append(pd.DataFrame({**p.data, **every, **cols, **p.tail}))  # (cols: the same keys, in place)
    out.frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    out.tick("host", start)


def _cams(spec: MapSpec, b: _Batch, methods: list[str], sel: Tensor, targets: Tensor) -> CamResult:
    start = time.perf_counter()
    res = compute_cams(
        spec.model,
        b.images[sel],
        targets[sel],
        methods=methods,
        layer=spec.layer,
        options={m: spec.cfg.method_options.get(m, {}) for m in methods},
        batch_size=spec.chunk,
        mixed_precision=spec.cfg.mixed_precision,
        sample_keys=b.keys[sel],
    )
    b.out.tick("cams", start)
    return res


def _keys(spec: MapSpec, rows: np.ndarray) -> Tensor:
    """``[n]`` int64 keys of the samples' random draws: from their ids and the seed, never their position."""
    return torch.tensor([sample_key(spec.samples[r].id, spec.cfg.seed, "draws") % 2**62 for r in rows.tolist()])


def _plans(spec: MapSpec, labels: Tensor, preds: Tensor) -> list[tuple[str, Tensor, Tensor]]:
    """``(target name, target classes [B], positions explained)`` for the configured ``target``."""
    every = torch.arange(labels.numel())
    plans: list[tuple[str, Tensor, Tensor]] = []
    if spec.cfg.target in ("label", "both"):
        plans.append(("label", labels, every))
    if spec.cfg.target == "prediction":
        plans.append(("prediction", preds, every))
    if spec.cfg.target == "both":
        plans.append(("prediction", preds, (preds != labels).nonzero().flatten().cpu()))
    return plans


def _tail(spec: MapSpec, b: _Batch, sel: Tensor, per_sample: dict) -> dict[str, Any]:
    """The per-sample probe columns, then the metadata columns, of the positions ``sel``."""
    specs = [spec.samples[i] for i in b.rows[sel.numpy()].tolist()]
    meta = {k: [sp.metadata.get(k, "") for sp in specs] for k in sorted({k for sp in specs for k in sp.metadata})}
    return {k: v[sel.numpy()] for k, v in per_sample.items()} | meta


def _explain(
    spec: MapSpec, b: _Batch, e: _Explained, methods: list[str], sel: Tensor, res: CamResult, per_sample: dict
) -> list[_Pending]:
    """Maps and device-side metric columns of ``methods`` for the positions ``sel``; the host side waits."""
    # Under autocast the metrics' forwards are low precision: their base probability must be too.
    base = None if spec.cfg.mixed_precision else e.probs[sel].gather(1, e.targets[sel, None])[:, 0]
    pending = []
    for m in methods:
        out = res[m]
        assert out.maps is not None  # compute_cams upsamples by default
        b.out.maps[map_key(m, e.target)] = (b.rows[sel.numpy()], _low_res(out.low_res))
        device_cols = _metric_columns(spec, b, out.maps, sel, e.targets[sel], m, e.target, base, host=False)
        host_maps, host_targets = out.maps.detach().cpu(), e.targets[sel].cpu()

        def host_cols(maps: Tensor = host_maps, targets: Tensor = host_targets, method: str = m) -> Columns:
            return _metric_columns(spec, b, maps, sel, targets, method, e.target, None, host=True)

        tail = _tail(spec, b, sel, per_sample)
        pending.append(_Pending(_rows(spec, b, e, sel, m, out.valid), device_cols, host_cols, tail))
    return pending


def _prediction_rows(
    spec: MapSpec, b: _Batch, probs: Tensor, preds: Tensor, per_sample: dict, explained: Tensor
) -> list[_Pending]:
    """One row per sample outside the expensive subset when every method is expensive (a TorchScript model).

    The row holds the sample's forward (``pred``, ``prob``, ``correct``), probes and metadata, with ``method``
    and ``target`` null and no map (``map_valid`` false, metrics NaN): accuracy, ``dataset.n``, ``dataset.id``
    and the model-only analyses count every sample, while the expensive methods' maps stay on the subset.
    """
    sel = (~explained).nonzero().flatten()
    if sel.numel() == 0:
        return []
    e = _Explained(probs, preds, "", preds, sel)
    data = _rows(spec, b, e, sel, "", torch.zeros(sel.numel(), dtype=torch.bool))
    data.update(method=None, target=None, target_class=None, target_prob=np.nan)
    return [_Pending(data, {}, lambda: {}, _tail(spec, b, sel, per_sample))]


def map_batch(spec: MapSpec, batch: dict[str, Any]) -> BatchOutput:
    """CAMs, metrics and probes for one collated batch (``auditor.io.dataset.collate``) -> :class:`BatchOutput`."""
    t = time.perf_counter()
    idx: Tensor = batch["index"]
    out = BatchOutput(pd.DataFrame(), images=int(idx.numel()), skipped=list(batch["skipped"]))
    if idx.numel() == 0:
        return out
    images = batch["image"].to(spec.device, non_blocking=True)
    labels = torch.tensor([spec.samples[i].label for i in idx.tolist()], device=spec.device)
    b = _Batch(batch, idx, images, labels, out, _keys(spec, idx.numpy()))
    cheap = [m for m in spec.methods if not CAMS[m].expensive]
    costly = [m for m in spec.methods if CAMS[m].expensive]
    first = _cams(spec, b, cheap, torch.arange(idx.numel()), labels) if cheap else None
    if first is not None:
        logits = first.logits
    else:
        with torch.no_grad():
            logits = spec.model(images).float()
    bad = (~torch.isfinite(logits).all(1)).nonzero().flatten().tolist()
    if bad:  # NaN/inf logits would be predicted as class 0: skip those samples, map the rest again
        again = map_batch(spec, drop(batch, bad, NONFINITE))
        again.nonfinite += len(bad)
        return again
    probs, preds = logits.softmax(1), logits.argmax(1)
    per_sample = _probes(spec, b)
    exp_rows = torch.from_numpy(spec.expensive[b.rows])
    pending: list[_Pending] = []
    for tname, tvec, sel in _plans(spec, labels, preds):
        e = _Explained(probs, preds, tname, tvec, sel)
        for methods, rows_sel in ((cheap, sel), (costly, sel[exp_rows[sel]])):
            if not methods or rows_sel.numel() == 0:
                continue
            reuse = first is not None and tname == "label" and methods is cheap
            res = first if reuse and first is not None else _cams(spec, b, methods, rows_sel, tvec)
            pending += _explain(spec, b, e, methods, rows_sel, res, per_sample)
    if not cheap:  # every sample is in the population: the ones no method explained get a prediction row
        pending += _prediction_rows(spec, b, probs, preds, per_sample, exp_rows)
    out.finish = lambda: _finish(spec, out, pending)
    if not spec.overlap:
        out.complete()
    out.tick("batch_total", t)
    return out
