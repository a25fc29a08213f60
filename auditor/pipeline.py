"""``auditor run``: stream a labelled dataset through every configured method and metric.

Per batch: one forward (+ one backward to the target layer) for the gradient methods, extra chunked
forwards for perturbation methods on the ``expensive`` subset, metrics on the upsampled maps, then one
atomic parquet part and the low-resolution maps (float16 memmaps). Nothing holds all images or maps, so
memory is flat in the dataset size. A killed run restarted with the same command resumes from its last
finished batch and ends with identical ``samples.parquet``, ``maps/`` and aggregates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torchvision
import yaml
from torch import Tensor

from auditor import __version__
from auditor.cams import CAMS, CamResult, compute_cams
from auditor.cams.core import auto_chunk, choose_memory_format, inspect_model, low_precision_pays, set_memory_format
from auditor.config import AuditConfig, dump_resolved
from auditor.data import AuditDataset, SampleSpec, collate, load_dataset, select, stratified_subset
from auditor.deepdive import run_deepdive
from auditor.errors import ConfigError, DataError, MethodNotApplicableError, ModelError
from auditor.metrics import METRICS, MetricInputs, max_box_acc
from auditor.metrics.sanity import method_agreement, mprt
from auditor.models import LoadedModel, build_model, resolve_device
from auditor.shortcuts import Intervener, analyze
from auditor.shortcuts.probes import counterfactuals, image_properties, mask_grid
from auditor.stats import bootstrap_ci, describe
from auditor.store import RunStore, atomic_write_bytes, write_json

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
BLACK_BOX = ("occlusion", "rise")  # the only methods that work without module hooks (TorchScript)
_ARTIFACTS = (
    "report.html",
    "deepdive.json",
    "parts",
    "maps",
    "curves",
    "samples.parquet",
    "summary.json",
    "flags.json",
    "config.resolved.yaml",
    "run.json",
)
_PIXEL_STORE = 64  # pixel-space maps (occlusion, RISE, guided) are stored average-pooled to at most 64 x 64


@dataclass
class Selection:
    """Command-line restrictions of the audited samples (part of the run's identity)."""

    limit: int | None = None
    per_class: int | None = None
    only_classes: list[str] | None = None


@dataclass
class _Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, start: float) -> float:
        now = time.perf_counter()
        self.seconds[key] = self.seconds.get(key, 0.0) + now - start
        return now


# ------------------------------------------------------------------------------------------ set-up


def _prepare_out(out: Path, force: bool) -> None:
    if (out / "summary.json").exists() and not force:
        raise ConfigError(f"{out} holds a finished run; pass --force to overwrite it or choose another --out")
    if force:
        for name in _ARTIFACTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def resolve_methods(cfg: AuditConfig, loaded: LoadedModel, probe: Tensor, layer: Any) -> list[str]:
    """The method list for this model: ``fast`` gains ``cam`` when the head is GAP + one Linear."""
    methods = cfg.method_names()
    if loaded.scripted:
        bad = [m for m in methods if m not in BLACK_BOX]
        if bad:
            raise ConfigError(
                f"TorchScript models cannot be hooked, so only black-box methods {list(BLACK_BOX)} apply; "
                f"remove {bad} from 'methods' (or load the model with arch + checkpoint / a factory)"
            )
        return methods
    if cfg.methods == "fast":
        try:
            compute_cams(loaded.module, probe, [0], methods=["cam"], layer=layer)
            methods = ["cam", *methods]
        except MethodNotApplicableError as err:
            log.info("cam left out of the fast set: %s", err)
    return methods


def _run_identity(cfg: AuditConfig, samples: Sequence[SampleSpec], selection: Selection) -> str:
    h = hashlib.sha256()
    h.update(dump_resolved(cfg).encode())
    h.update(json.dumps([selection.limit, selection.per_class, selection.only_classes]).encode())
    for s in samples:
        h.update(f"{s.id}\0{s.path}\0{s.label}\n".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ per batch


@dataclass
class _Ctx:
    cfg: AuditConfig
    model: torch.nn.Module
    device: torch.device
    samples: list[SampleSpec]
    classes: list[str]
    methods: list[str]
    metrics: list[str]
    layer: Any
    expensive: np.ndarray  # [n] bool: the samples that get the expensive methods and metrics
    probe: np.ndarray  # [n] bool: the samples that get the counterfactual forwards
    mean: Tensor | None
    std: Tensor | None
    store: RunStore
    timer: _Timer
    chunk: int = 32
    memory_format: str = "contiguous"


def _store_maps(ctx: _Ctx, name: str, rows: Tensor, low: Tensor) -> None:
    if low.shape[-1] > _PIXEL_STORE:
        low = torch.nn.functional.adaptive_avg_pool2d(low[:, None], _PIXEL_STORE)[:, 0]
    arr = ctx.store.array(f"maps/{name}", tuple(low.shape[1:]))
    arr[rows.numpy()] = low.detach().cpu().numpy().astype(np.float16)


def _metric_columns(
    ctx: _Ctx,
    maps: Tensor,
    sel: Tensor,
    targets: Tensor,
    batch: dict[str, Any],
    images: Tensor,
    key: str,
    rows: Tensor,
    base_probs: Tensor | None = None,
) -> dict[str, np.ndarray]:
    """Every configured metric for the maps of ``sel`` (positions in the batch); NaN where not computed.

    ``base_probs`` (``[len(sel)]``, the explained class's probability on the unperturbed images, from
    the CAM pass's own forward) spares the faithfulness metrics one forward per image and method.
    """
    n = int(sel.numel())
    cols: dict[str, np.ndarray] = {}
    masks = (batch["mask"].to(ctx.device) & batch["has_mask"].to(ctx.device)[:, None, None])[sel]
    boxes = [batch["boxes"][i].to(ctx.device) for i in sel.tolist()]
    exp_rows = torch.from_numpy(ctx.expensive[rows.numpy()])
    any_mask = bool(batch["has_mask"][sel].any())

    def make_inputs(pick: Tensor) -> MetricInputs:
        return MetricInputs(
            maps=maps[pick],
            masks=masks[pick],
            boxes=[boxes[i] for i in pick.tolist()],
            scale=batch["scale"][sel][pick].to(ctx.device),
            model=ctx.model,
            images=images[sel][pick],
            targets=targets[pick],
            mean=ctx.mean,
            std=ctx.std,
            batch_size=ctx.chunk,
            seed=ctx.cfg.seed,
            mixed_precision=ctx.cfg.mixed_precision,
            cache={} if base_probs is None else {"base_probs": base_probs[pick]},
        )

    every = torch.arange(n)
    subset = exp_rows.nonzero().flatten()
    inputs_all = make_inputs(every)
    inputs_sub: MetricInputs | None = None
    for name in ctx.metrics:
        metric = METRICS[name]
        if metric.needs == "mask" and not any_mask:
            cols[name] = np.full(n, np.nan)
            continue
        start = time.perf_counter()
        opts = ctx.cfg.metric_options.get(name, {})
        if metric.expensive:
            if inputs_sub is None:
                inputs_sub = make_inputs(subset) if subset.numel() else None
            if inputs_sub is None:
                cols[name] = np.full(n, np.nan)
                continue
            result = metric(inputs_sub, **opts)
            pick = subset
        else:
            result = metric(inputs_all, **opts)
            pick = every
        ctx.timer.add(f"metric:{name}", start)
        for col, values in [(name, result.value), *result.extras.items()]:
            v = values.detach().float().cpu().numpy()
            if v.ndim == 2:  # a curve: kept in curves/, not in the table
                arr = ctx.store.array(f"curves/{col}__{key}", (v.shape[1],), dtype="float32")
                arr[rows.numpy()[pick.numpy()]] = v
                continue
            full = np.full(n, np.nan)
            full[pick.numpy()] = v
            cols[col] = full
    return cols


def _process_batch(ctx: _Ctx, batch: dict[str, Any]) -> tuple[pd.DataFrame, int]:
    """CAMs and metrics for one batch -> its rows of ``samples.parquet`` (and the number of images)."""
    idx: Tensor = batch["index"]
    if idx.numel() == 0:
        return pd.DataFrame(), 0
    t = time.perf_counter()
    images = batch["image"].to(ctx.device, non_blocking=True)
    labels = torch.tensor([ctx.samples[i].label for i in idx.tolist()], device=ctx.device)
    cheap = [m for m in ctx.methods if not CAMS[m].expensive]
    costly = [m for m in ctx.methods if CAMS[m].expensive]
    opts = {m: ctx.cfg.method_options.get(m, {}) for m in ctx.methods}
    exp_rows = torch.from_numpy(ctx.expensive[idx.numpy()])

    def cams(methods: list[str], sel: Tensor, targets: Tensor) -> CamResult:
        start = time.perf_counter()
        res = compute_cams(
            ctx.model,
            images[sel],
            targets[sel],
            methods=methods,
            layer=ctx.layer,
            options={m: opts[m] for m in methods},
            batch_size=ctx.chunk,
            mixed_precision=ctx.cfg.mixed_precision,
        )
        ctx.timer.add("cams", start)
        return res

    every = torch.arange(idx.numel())
    first = cams(cheap, every, labels) if cheap else None
    if first is not None:
        logits = first.logits
    else:
        with torch.no_grad():
            logits = ctx.model(images).float()
    probs = logits.softmax(1)
    preds = logits.argmax(1)
    per_sample = _probes(ctx, batch, images, labels, idx)
    plans: list[tuple[str, Tensor, Tensor]] = []
    if ctx.cfg.target in ("label", "both"):
        plans.append(("label", labels, every))
    if ctx.cfg.target == "prediction":
        plans.append(("prediction", preds, every))
    if ctx.cfg.target == "both":
        plans.append(("prediction", preds, (preds != labels).nonzero().flatten().cpu()))

    frames = []
    for tname, tvec, sel in plans:
        if sel.numel() == 0:
            continue
        groups: list[tuple[list[str], Tensor]] = [(cheap, sel), (costly, sel[exp_rows[sel]])]
        for methods, rows_sel in groups:
            if not methods or rows_sel.numel() == 0:
                continue
            reuse = first is not None and tname == "label" and methods is cheap
            res = first if reuse and first is not None else cams(methods, rows_sel, tvec)
            rows = idx[rows_sel]
            # Under autocast the metrics' forwards are low precision: their base probability must be too.
            base = None if ctx.cfg.mixed_precision else probs[rows_sel].gather(1, tvec[rows_sel, None])[:, 0]
            for m in methods:
                out = res[m]
                assert out.maps is not None  # compute_cams upsamples by default
                _store_maps(ctx, f"{m}__{tname}", rows, out.low_res)
                cols = _metric_columns(
                    ctx, out.maps, rows_sel, tvec[rows_sel], batch, images, f"{m}__{tname}", rows, base
                )
                frames.append(
                    _rows(
                        ctx,
                        batch,
                        rows_sel,
                        rows,
                        labels,
                        preds,
                        probs,
                        tvec,
                        m,
                        tname,
                        out.valid,
                        {**cols, **{k: v[rows_sel.numpy()] for k, v in per_sample.items()}},
                    )
                )
    ctx.timer.add("batch_total", t)
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return frame, int(idx.numel())


def _probes(ctx: _Ctx, batch: dict[str, Any], images: Tensor, labels: Tensor, idx: Tensor) -> dict[str, np.ndarray]:
    """Per-sample inputs of the shortcut analyses: image properties, object grid, counterfactual predictions."""
    start = time.perf_counter()
    pixels = (
        images
        if ctx.mean is None or ctx.std is None
        else images * ctx.std.view(1, -1, 1, 1) + ctx.mean.view(1, -1, 1, 1)
    )
    out = {f"prop_{k}": v.float().cpu().numpy() for k, v in image_properties(pixels.clamp(0, 1)).items()}
    masks = batch["mask"].to(ctx.device)
    usable = batch["has_mask"].to(ctx.device) & masks.flatten(1).any(1)
    # Counterfactual forwards (3 per image) run on a stratified subset: per-class rates need tens of images.
    in_subset = torch.from_numpy(ctx.probe[idx.numpy()]).to(ctx.device)
    if bool(usable.any()):
        grid = ctx.store.array("maps/_object", (32, 32))
        keep = usable.cpu().numpy()
        grid[idx.numpy()[keep]] = mask_grid(masks[usable]).cpu().numpy().astype(np.float16)
    cf = counterfactuals(ctx.model, images, masks, labels, usable & in_subset)
    for key, value in cf.items():
        v = value.numpy()
        if key.endswith(("_pred", "_label")):
            out[key] = np.array([ctx.classes[int(c)] if c >= 0 else "" for c in v], dtype=object)
        else:
            out[key] = v.astype(np.float64)
    ctx.timer.add("probes", start)
    return out


def _rows(
    ctx: _Ctx,
    batch: dict[str, Any],
    sel: Tensor,
    rows: Tensor,
    labels: Tensor,
    preds: Tensor,
    probs: Tensor,
    targets: Tensor,
    method: str,
    target: str,
    valid: Tensor,
    cols: dict[str, np.ndarray],
) -> pd.DataFrame:
    specs = [ctx.samples[i] for i in rows.tolist()]
    s = sel.tolist()
    data: dict[str, Any] = {
        "row": rows.numpy().astype(np.int64),
        "id": [sp.id for sp in specs],
        "path": [str(sp.path) for sp in specs],
        "label": [ctx.classes[int(labels[i])] for i in s],
        "pred": [ctx.classes[int(preds[i])] for i in s],
        "prob": probs.max(1).values[sel].cpu().numpy().astype(np.float64),
        "correct": (preds[sel] == labels[sel]).cpu().numpy(),
        "method": method,
        "target": target,
        "target_class": [ctx.classes[int(c)] for c in targets[sel].tolist()],
        "target_prob": probs.gather(1, targets[:, None])[:, 0][sel].cpu().numpy().astype(np.float64),
        "map_valid": valid.cpu().numpy(),
        "expensive": ctx.expensive[rows.numpy()],
        "mask_source": [batch["mask_source"][i] for i in s],
        "sha1": [batch["sha1"][i] for i in s],
    }
    data.update(cols)
    meta_cols = sorted({k for sp in specs for k in sp.metadata})
    for k in meta_cols:
        data[k] = [sp.metadata.get(k, "") for sp in specs]
    return pd.DataFrame(data)


# ------------------------------------------------------------------------------------------ summary


def _aggregates(table: pd.DataFrame, store: RunStore, classes: list[str], seed: int) -> dict[str, Any]:
    skip = {"row", "prob", "target_prob", "correct", "map_valid", "expensive"}
    metric_cols = [c for c in table.columns if table[c].dtype.kind == "f" and c not in skip]
    out: dict[str, Any] = {}
    for (method, target), group in table.groupby(["method", "target"], sort=False):
        per_class: dict[str, Any] = {}
        curve_path = store.root / "curves" / f"box_iou_curve__{method}__{target}.npy"
        curves = np.load(curve_path, mmap_mode="r") if curve_path.exists() else None
        for cls in ["*", *classes]:
            sub = group if cls == "*" else group[group["label"] == cls]
            if not len(sub):
                continue
            stats = {c: describe(sub[c].to_numpy(), seed=seed) for c in metric_cols if sub[c].notna().any()}
            stats["map_valid_rate"] = {"mean": float(sub["map_valid"].mean()), "n": len(sub)}
            if curves is not None:
                stats["max_box_acc"] = _max_box_acc_stats(np.asarray(curves[sub["row"].to_numpy()], np.float64), seed)
            per_class[cls] = stats
        out.setdefault(str(method), {})[str(target)] = per_class
    return out


def _max_box_acc_stats(curves: np.ndarray, seed: int, resamples: int = 200) -> dict[str, float]:
    curves = curves[~np.isnan(curves).any(1)]
    n = len(curves)
    if n == 0:
        nan = float("nan")
        return {"mean": nan, "median": nan, "ci_low": nan, "ci_high": nan, "n": 0}
    rng = np.random.default_rng(seed)
    boots = np.array([max_box_acc(curves[rng.integers(0, n, n)]) for _ in range(resamples)])
    value = max_box_acc(curves)
    return {
        "mean": value,
        "median": float("nan"),
        "ci_low": float(np.quantile(boots, 0.025)),
        "ci_high": float(np.quantile(boots, 0.975)),
        "n": n,
    }


def _accuracy(first: pd.DataFrame, classes: list[str], seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cls in ["*", *classes]:
        sub = first if cls == "*" else first[first["label"] == cls]
        if len(sub):
            v = sub["correct"].to_numpy(np.float64)
            low, high = bootstrap_ci(v, seed=seed)
            out[cls] = {"accuracy": float(v.mean()), "ci_low": low, "ci_high": high, "n": len(sub)}
    return out


def _groups(first: pd.DataFrame, metadata: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attr in metadata:
        if attr not in first.columns:
            continue
        per_value = {}
        for value, sub in first.groupby(attr, sort=True):
            per_value[str(value)] = {
                "n": len(sub),
                "accuracy": float(sub["correct"].mean()),
                "per_class": {str(k): int(v) for k, v in sub["label"].value_counts().sort_index().items()},
            }
        out[attr] = per_value
    return out


def _agreement(store: RunStore, table: pd.DataFrame, methods: list[str], classes: list[str]) -> dict[str, Any]:
    """Mean per-sample Spearman between the maps of every pair of class-sensitive methods, per class."""
    names = [m for m in methods if CAMS[m].class_sensitive and (store.root / "maps" / f"{m}__label.npy").exists()]
    if len(names) < 2:
        return {}
    first = table[(table["method"] == names[0]) & (table["target"] == "label")]
    rows, labels = first["row"].to_numpy(), first["label"].to_numpy()
    arrays = {m: np.load(store.root / "maps" / f"{m}__label.npy", mmap_mode="r") for m in names}
    sums: dict[str, dict[str, list[float]]] = {}
    for start in range(0, len(rows), 256):
        r = rows[start : start + 256]
        maps = {m: torch.from_numpy(np.asarray(a[r], dtype=np.float32)).nan_to_num(0.0) for m, a in arrays.items()}
        for (a, b), rho in method_agreement(maps, size=16).items():
            for cls, value in zip(labels[start : start + 256], rho, strict=True):
                for key in ("*", str(cls)):
                    sums.setdefault(key, {}).setdefault(f"{a}|{b}", []).append(float(value))
    return {
        cls: {pair: describe(np.array(v), resamples=200) for pair, v in pairs.items()} for cls, pairs in sums.items()
    }


def _mprt(ctx: _Ctx, table: pd.DataFrame, dataset: AuditDataset) -> dict[str, Any]:
    cfg = ctx.cfg.sanity
    assert cfg is not None
    methods = [m for m in cfg.methods if CAMS[m].needs != "nothing" or m in BLACK_BOX]
    first = table[table["method"] == table["method"].iloc[0]]
    first = first[first["target"] == first["target"].iloc[0]]
    labels = first["row"].map(lambda r: ctx.samples[int(r)].label).to_numpy()
    per_class = max(1, math.ceil(cfg.n_images / len(ctx.classes)))
    keep = stratified_subset(labels, per_class, ctx.cfg.seed + 7)
    chosen = first["row"].to_numpy()[keep][: cfg.n_images]
    items = [dataset[int(r)] for r in chosen]
    items = [it for it in items if it["ok"]]
    images = torch.stack([it["image"] for it in items]).to(ctx.device)
    targets = torch.tensor([ctx.samples[int(r)].label for r in chosen[: len(items)]], device=ctx.device)
    res = mprt(
        ctx.model,
        images,
        targets,
        methods,
        layer=ctx.layer,
        n_blocks=cfg.n_blocks,
        seed=ctx.cfg.seed,
        batch_size=ctx.chunk,
    )
    return {
        "n_images": len(items),
        "randomized_blocks": res.blocks,
        "methods": {
            m: {"spearman": res.spearman[m], "ssim": res.ssim[m], "unreliable": res.unreliable[m]} for m in methods
        },
    }


# ------------------------------------------------------------------------------------------ the run


def run_audit(
    cfg: AuditConfig,
    out: str | Path,
    *,
    force: bool = False,
    selection: Selection | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Run (or resume) an audit into ``out`` and return the summary (also written to ``summary.json``).

    Args:
        cfg: validated configuration.
        out: output directory; an unfinished run there is resumed, a finished one needs ``force``.
        force: delete a previous run's files in ``out`` first.
        selection: ``--limit`` / ``--per-class`` / ``--only-classes`` restrictions.
        progress: tqdm bar (True), periodic log lines (False), or auto (a bar on a terminal).
    """
    started = time.perf_counter()
    out = Path(out)
    selection = selection or Selection()
    _prepare_out(out, force)
    timer = _Timer()
    device = resolve_device(cfg.device)
    if cfg.mixed_precision and not low_precision_pays(device):
        log.warning(
            "mixed_precision: %s has no bfloat16 instructions, where low-precision forwards are emulated and far "
            "slower than float32; running in float32",
            device,
        )
        cfg = cfg.model_copy(update={"mixed_precision": False})
    loaded = build_model(cfg.model, device)
    dataset_spec = load_dataset(cfg.data)
    samples = select(
        dataset_spec.samples,
        dataset_spec.classes,
        only_classes=selection.only_classes,
        per_class=selection.per_class,
        limit=selection.limit,
        seed=cfg.seed,
    )
    if not samples:
        raise DataError("no sample left to audit after --only-classes / --per-class / --limit")
    classes = dataset_spec.classes
    mean_std = cfg.data.mean_std()
    if mean_std is not None and len(mean_std[0]) != 3:
        raise ConfigError("data.normalize: mean and std need 3 values (images are loaded as RGB)")
    dataset = AuditDataset(samples, cfg.data.image_size, mean_std)
    probe = next((it for it in (dataset[i] for i in range(min(len(dataset), 32))) if it["ok"]), None)
    if probe is None:
        raise DataError(
            f"none of the first {min(len(dataset), 32)} images can be read; first problem: "
            f"{samples[0].path}: {dataset[0].get('reason')}"
        )
    probe_img = probe["image"][None].to(device)
    with torch.no_grad():
        n_out = loaded.module(probe_img).shape[1]
    if n_out != len(classes):
        raise ModelError(
            f"the model has {n_out} outputs but the dataset has {len(classes)} classes {classes}; "
            "set data.classes in model output order (or fix model.num_classes)"
        )
    layer = cfg.model.target_layer
    if not loaded.scripted:
        try:
            inspect_model(loaded.module, probe_img)
        except ValueError as err:
            raise ModelError(str(err)) from err
    methods = resolve_methods(cfg, loaded, probe_img, layer)
    if isinstance(cfg.chunk_size, int):
        chunk = cfg.chunk_size
    elif loaded.scripted:  # no module hooks on TorchScript: fall back to the batch size
        chunk = cfg.batch_size
    else:
        chunk = auto_chunk(loaded.module, torch.cat([probe_img, probe_img]))
    resolved = cfg.model_copy(update={"methods": methods})
    identity = _run_identity(resolved, samples, selection)
    run_file = out / "run.json"
    previous: dict[str, Any] = {}
    if run_file.exists():
        previous = json.loads(run_file.read_text())
        if previous.get("identity") != identity:
            raise ConfigError(
                f"{out} holds an unfinished run with another config or sample list; "
                "pass --force to start over or choose another --out"
            )
        log.info("resuming the unfinished run in %s", out)
    # a resumed run keeps the first session's choice, so its batches compute exactly like the others
    memory_format = previous.get("memory_format") or _memory_format(cfg, loaded, probe_img, chunk)
    atomic_write_bytes(out / "config.resolved.yaml", dump_resolved(resolved).encode())
    write_json(
        run_file,
        {"identity": identity, "n": len(samples), "batch_size": cfg.batch_size, "memory_format": memory_format},
    )
    if not loaded.scripted:
        set_memory_format(loaded.module, memory_format)

    store = RunStore(out, len(samples))
    labels = [s.label for s in samples]
    stratified = stratified_subset(labels, cfg.expensive.per_class, cfg.seed)
    mode = cfg.expensive.subset
    expensive = {
        "all": np.ones(len(samples), dtype=bool),
        "stratified": stratified.copy(),
        "flagged": np.zeros(len(samples), dtype=bool),  # chosen after the cheap pass
    }[mode]
    mean = torch.tensor(mean_std[0], device=device) if mean_std else None
    std = torch.tensor(mean_std[1], device=device) if mean_std else None
    ctx = _Ctx(
        cfg,
        loaded.module,
        device,
        samples,
        classes,
        methods,
        cfg.metric_names(),
        layer,
        expensive,
        expensive if mode == "all" else stratified,
        mean,
        std,
        store,
        timer,
        chunk,
        memory_format,
    )

    bs = cfg.batch_size
    n_batches = math.ceil(len(samples) / bs)
    done = store.done_batches()
    pending = [b for b in range(n_batches) if b not in done]
    batches = [list(range(b * bs, min((b + 1) * bs, len(samples)))) for b in pending]
    bar = _Progress(n_batches, len(done), len(samples), progress)
    processed = _run_batches(ctx, dataset, pending, batches, "part", bar)
    bar.close()
    main_pass = {k: timer.seconds.get(k, 0.0) for k in ("data_wait", "compute", "write")}

    table = store.consolidate(n_batches)
    if table.empty:
        raise DataError("no image could be audited: every sample was skipped (see parts/events-*.json)")
    if mode == "flagged":
        start = time.perf_counter()
        table = _flagged_pass(ctx, dataset, table, dataset_spec.metadata, n_batches, progress)
        timer.add("flagged_pass", start)
    _write_expensive(ctx, table, mode)
    summary = _summary(ctx, table, dataset, dataset_spec.metadata, loaded, device, n_batches, selection)
    summary["timings"] = {
        **{k: round(v, 3) for k, v in sorted(timer.seconds.items())},
        "total_s": round(time.perf_counter() - started, 3),
        "images_this_session": processed,
        # the main pass only: the flagged pass re-runs a few samples with the expensive methods
        "images_per_s_this_session": round(processed / max(sum(main_pass.values()), 1e-9), 2),
    }
    write_json(out / "summary.json", summary)
    from auditor.report import render_report

    render_report(out)
    return summary


def _memory_format(cfg: AuditConfig, loaded: LoadedModel, probe: Tensor, chunk: int) -> str:
    """The configured memory format, or (``auto``) the faster one timed on a chunk of the probe image."""
    if loaded.scripted:
        return "contiguous"
    if cfg.memory_format != "auto":
        return cfg.memory_format
    example = probe.expand(max(2, min(chunk, 16)), *probe.shape[1:]).contiguous()
    fmt = choose_memory_format(loaded.module, example)
    log.info("memory format: %s (the faster forward for this model on %s)", fmt, probe.device)
    return fmt


def _run_batches(
    ctx: _Ctx,
    dataset: AuditDataset,
    numbers: list[int],
    batches: list[list[int]],
    kind: str,
    bar: _Progress | None,
) -> int:
    """Process ``batches`` (sample rows) and write each as part ``kind``-``number``; returns the images done.

    Data loading runs in the DataLoader's workers (``workers``); on CUDA, batches come in pinned memory
    and are copied with ``non_blocking``. The main pass also records skipped files and warnings.
    """
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=ctx.cfg.workers,
        collate_fn=collate,
        pin_memory=ctx.device.type == "cuda",
        persistent_workers=False,
    )
    t = time.perf_counter()
    processed = 0
    for b, batch in zip(numbers, loader, strict=True):
        t = ctx.timer.add("data_wait", t)
        frame, n_img = _process_batch(ctx, batch)
        t = ctx.timer.add("compute", t)
        if kind == "part":
            events = {
                "skipped": [{"row": i, "path": str(ctx.samples[i].path), "reason": r} for i, r in batch["skipped"]],
                "warnings": [{"row": i, "path": str(ctx.samples[i].path), "warning": w} for i, w in batch["warnings"]],
            }
            write_json(ctx.store.parts / f"events-{b:06d}.json", events)
        ctx.store.write_part(b, frame, kind)
        t = ctx.timer.add("write", t)
        processed += n_img
        if bar is not None:
            bar.update(len(batch["index"]) + len(batch["skipped"]))
    return processed


def select_flagged(
    flags: list[dict[str, Any]], table: pd.DataFrame, stratified: np.ndarray, per_flag: int
) -> dict[int, list[str]]:
    """The samples behind each flag: ``{row: [flag ids]}``.

    Per flag, the sample ids its evidence cites (``worst_ids``, ``error_ids``, ``prototype_ids``, ...)
    come first; a flag about a class is then filled with that class's stratified samples; at most
    ``per_flag`` samples per flag.

    Args:
        flags: flags of the cheap pass (``flags.json`` entries).
        table: the cheap pass's ``samples.parquet`` (columns ``id``, ``row``, ``label``).
        stratified: ``[n]`` bool, the run's stratified subset.
        per_flag: ``expensive.per_class``.
    """
    first = table.drop_duplicates("row")
    row_of = dict(zip(first["id"], first["row"].astype(int), strict=True))
    chosen: dict[int, list[str]] = {}
    for flag in flags:
        rows: list[int] = []
        for key, value in flag.get("evidence", {}).items():
            if key.endswith("ids") and isinstance(value, list):
                rows += [row_of[v] for v in value if isinstance(v, str) and v in row_of]
        if flag.get("class") is not None:
            own = first[first["label"] == flag["class"]]["row"].astype(int).to_numpy()
            rows += own[stratified[own]].tolist()
        for r in list(dict.fromkeys(rows))[:per_flag]:
            chosen.setdefault(r, []).append(flag["id"])
    return dict(sorted(chosen.items()))


def _flagged_pass(
    ctx: _Ctx,
    dataset: AuditDataset,
    table: pd.DataFrame,
    metadata: list[str],
    n_batches: int,
    progress: bool | None,
) -> pd.DataFrame:
    """``expensive.subset: flagged``: re-run the samples behind the cheap pass's flags with every method.

    The selection comes from the dataset-level analyses of the cheap methods (no interventions, no
    reliability downgrade: a superset of the final flags) and is saved in ``expensive.json`` first, so a
    resumed run re-runs the same samples. Returns the merged table.
    """
    path = ctx.store.root / "expensive.json"
    if path.exists():
        chosen = {int(r): f for r, f in json.loads(path.read_text())["reasons"].items()}
    else:
        cheap = [m for m in ctx.methods if not CAMS[m].expensive]
        _, flags = analyze(
            table,
            ctx.store.root,
            ctx.classes,
            metadata,
            cheap or ctx.methods,
            ctx.cfg.thresholds,
            None,
            None,
            ctx.cfg.seed,
        )
        chosen = select_flagged(flags, table, ctx.probe, ctx.cfg.expensive.per_class)
        write_json(path, {"subset": "flagged", "reasons": {str(r): f for r, f in chosen.items()}})
    rows = list(chosen)
    ctx.expensive[rows] = True
    bs = ctx.cfg.batch_size
    batches = [rows[i : i + bs] for i in range(0, len(rows), bs)]
    done = ctx.store.done_batches("flagged")
    pending = [b for b in range(len(batches)) if b not in done]
    if rows:
        log.info(
            "expensive methods and metrics on %d samples behind %d flag(s)",
            len(rows),
            len({f for v in chosen.values() for f in v}),
        )
    bar = _Progress(len(batches), len(done), len(rows), progress) if batches else None
    probe, ctx.probe = ctx.probe, np.zeros_like(ctx.probe)  # counterfactuals: the main pass's stay
    try:
        _run_batches(ctx, dataset, pending, [batches[b] for b in pending], "flagged", bar)
    finally:
        ctx.probe = probe
    if bar is not None:
        bar.close()
    return ctx.store.consolidate(n_batches, len(batches), keep=("cf_",))


def _write_expensive(ctx: _Ctx, table: pd.DataFrame, mode: str) -> None:
    """``expensive.json``: which samples got the expensive methods and metrics, and why (for the report)."""
    path = ctx.store.root / "expensive.json"
    reasons = json.loads(path.read_text())["reasons"] if path.exists() else {}
    first = table.drop_duplicates("row")
    rows = first[ctx.expensive[first["row"].astype(int).to_numpy()]]
    write_json(
        path,
        {
            "subset": mode,
            "per_class": ctx.cfg.expensive.per_class,
            "methods": [m for m in ctx.methods if CAMS[m].expensive],
            "metrics": [m for m in ctx.metrics if METRICS[m].expensive],
            "n": len(rows),
            "samples": [
                {"id": i, "label": lab, "flags": reasons.get(str(int(r)), [])}
                for i, lab, r in zip(rows["id"], rows["label"], rows["row"], strict=True)
            ],
            "reasons": reasons,
        },
    )


def _summary(
    ctx: _Ctx,
    table: pd.DataFrame,
    dataset: AuditDataset,
    metadata: list[str],
    loaded: LoadedModel,
    device: torch.device,
    n_batches: int,
    selection: Selection,
) -> dict[str, Any]:
    events = [json.loads((ctx.store.parts / f"events-{b:06d}.json").read_text()) for b in range(n_batches)]
    skipped = [e for ev in events for e in ev["skipped"]]
    warnings = [e for ev in events for e in ev["warnings"]]
    kinds = Counter(_kind(w["warning"]) for w in warnings)
    first_method = table["method"].iloc[0]
    first = table[(table["method"] == first_method) & (table["target"] == table["target"].iloc[0])]
    ids = sorted(zip(first["id"], first["sha1"], strict=True))
    dataset_id = hashlib.sha256("\n".join(f"{i}\0{h}" for i, h in ids).encode()).hexdigest()
    summary: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "versions": {
            "auditor": __version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "python": platform.python_version(),
        },
        "config": yaml.safe_load(dump_resolved(ctx.cfg.model_copy(update={"methods": ctx.methods}))),
        "run": {
            "model": loaded.description,
            "device": str(device),
            "layer": ctx.layer,
            "limit": selection.limit,
            "per_class": selection.per_class,
            "only_classes": selection.only_classes,
            "expensive_samples": int(ctx.expensive.sum()),
            "memory_format": ctx.memory_format,
        },
        "dataset": {
            "n": len(first),
            "n_requested": len(ctx.samples),
            "classes": ctx.classes,
            "per_class": {c: int((first["label"] == c).sum()) for c in ctx.classes},
            "with_mask": int((first["mask_source"] != "none").sum()),
            "skipped": [{"path": s["path"], "reason": s["reason"]} for s in skipped],
            "warning_counts": dict(sorted(kinds.items())),
            "warnings": warnings[:1000],
            "id": dataset_id,
        },
        "accuracy": _accuracy(first, ctx.classes, ctx.cfg.seed),
        "aggregates": _aggregates(table, ctx.store, ctx.classes, ctx.cfg.seed),
        "groups": _groups(first, metadata),
        "analyses": {},
        "sanity": None,
    }
    if ctx.cfg.sanity is not None and not loaded.scripted:
        summary["sanity"] = {
            "mprt": _mprt(ctx, table, dataset),
            "agreement": _agreement(ctx.store, table, ctx.methods, ctx.classes),
        }
    start = time.perf_counter()
    mprt_result = summary["sanity"]["mprt"] if summary["sanity"] else None
    summary["analyses"], flags = analyze(
        table,
        ctx.store.root,
        ctx.classes,
        metadata,
        ctx.methods,
        ctx.cfg.thresholds,
        mprt_result,
        _intervener(ctx, dataset),
        ctx.cfg.seed,
    )
    ctx.timer.add("analyses", start)
    write_json(ctx.store.root / "flags.json", {"schema_version": SCHEMA_VERSION, "flags": flags})
    start = time.perf_counter()
    window = max(4, ctx.cfg.data.image_size // 8)
    summary["deep_dive"] = run_deepdive(
        ctx.store.root,
        flags,
        table,
        ctx.model,
        _intervener(ctx, dataset).load,
        {c: i for i, c in enumerate(ctx.classes)},
        ctx.layer,
        loaded.scripted,
        {"window": window, "stride": max(2, window // 2)},
    )
    ctx.timer.add("deep_dive", start)
    return summary


def _intervener(ctx: _Ctx, dataset: AuditDataset) -> Intervener:
    mean = ctx.mean.view(1, -1, 1, 1) if ctx.mean is not None else None
    std = ctx.std.view(1, -1, 1, 1) if ctx.std is not None else None

    def load(rows: Sequence[int]) -> Tensor:
        return torch.stack([dataset[int(r)]["image"] for r in rows]).to(ctx.device)

    def to_pixels(x: Tensor) -> Tensor:
        return x if mean is None or std is None else x * std + mean

    def from_pixels(x: Tensor) -> Tensor:
        return x if mean is None or std is None else (x - mean) / std

    return Intervener(ctx.model, load, to_pixels, from_pixels)


def _kind(warning: str) -> str:
    for key in ("empty mask", "outside", "clipped", "size", "unreadable", "corrupt"):
        if key in warning:
            return key
    return "other"


class _Progress:
    """tqdm on a terminal; otherwise a log line at most every 10 s (CI logs stay readable)."""

    def __init__(self, batches: int, done: int, images: int, enabled: bool | None) -> None:
        self.bar = None
        self.total, self.count, self.images = batches, done, 0
        self.start = self.last = time.perf_counter()
        self.initial = done
        tty = sys.stderr.isatty()
        if enabled or (enabled is None and tty):
            from tqdm import tqdm

            self.bar = tqdm(total=batches, initial=done, unit="batch", desc="auditing", dynamic_ncols=True)

    def update(self, n_images: int) -> None:
        self.count += 1
        self.images += n_images
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"{self.images / (time.perf_counter() - self.start):.1f} img/s")
            return
        now = time.perf_counter()
        if now - self.last >= 10 or self.count == self.total:
            rate = self.images / max(now - self.start, 1e-9)
            left = (self.total - self.count) * (now - self.start) / max(self.count - self.initial, 1)
            log.info("batch %d/%d, %.1f images/s, ETA %ds", self.count, self.total, rate, left)
            self.last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
