"""Set-up of a run: everything validated and resolved before the first batch (model, data, methods, layout).

:func:`plan_run` returns a :class:`Plan`: the loaded model, the dataset, the resolved method list, the
chunk size and memory format (kept on resume through ``run.json``) and the run directory. Every driver
(the local loop today) starts from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from auditor.cams import CAMS, compute_cams
from auditor.cams.engine import layers_per_method
from auditor.cams.layers import inspect_model
from auditor.cams.speed import auto_chunk, choose_memory_format, low_precision_pays, set_memory_format
from auditor.config import AuditConfig, dump_resolved
from auditor.errors import ConfigError, DataError, MethodNotApplicableError, ModelError
from auditor.io.dataset import AuditDataset
from auditor.io.load import load_dataset
from auditor.io.models import LoadedModel, build_model, logits_only, resolve_device
from auditor.io.sources import SampleSpec, background_partners, select, stratified_subset
from auditor.run.localize import plan_localization
from auditor.store.rundir import RESOLVED, RUN, RunDir, RunStore

log = logging.getLogger(__name__)

BLACK_BOX = tuple(name for name, m in CAMS.items() if not m.hooks)  # no module hooks: they run on TorchScript


@dataclass
class Selection:
    """Command-line restrictions of the audited samples (part of the run's identity)."""

    limit: int | None = None
    per_class: int | None = None
    only_classes: list[str] | None = None


@dataclass(frozen=True)
class Shard:
    """This process's part of a sharded run: the samples with ``sha1(id) mod count == index``."""

    index: int
    count: int

    @property
    def folder(self) -> str:
        return f"{self.index}-of-{self.count}"


def shard_of(sample_id: str, count: int) -> int:
    """The shard of a sample: a stable hash of its id (never its position, so no sample is done twice)."""
    return int(hashlib.sha1(sample_id.encode()).hexdigest(), 16) % count


def main_batches(samples: Sequence[SampleSpec], batch_size: int, shard: Shard | None) -> list[list[int]]:
    """The rows of each main-pass batch: all rows in order, or this shard's."""
    rows = [i for i, s in enumerate(samples) if shard is None or shard_of(s.id, shard.count) == shard.index]
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A validated run, ready for its map stage.

    Attributes:
        cfg: the configuration (``mixed_precision`` switched off where it would not pay).
        store: the run directory.
        loaded: the model (eval mode, on ``device``, in ``memory_format``).
        device: where the model runs.
        dataset: the audited samples as a torch dataset.
        classes: class names in model output order.
        metadata: metadata columns.
        methods: the resolved method list (``fast`` gains ``cam`` where the head allows it).
        chunk: images per forward inside methods and metrics.
        memory_format: ``contiguous`` or ``channels_last``.
        selection: ``--limit`` / ``--per-class`` / ``--only-classes``.
        stratified: ``[n]`` bool, the keyed per-class subset of the expensive work.
        probe: ``[n]`` bool, the samples that get the counterfactual forwards and background partners: every
            sample with ``expensive.subset: all``, else the stratified subset (decided here, once).
        batches: the rows of each main-pass batch (this shard's, for a shard).
        shard: this process's shard, or None.
        mean, std: ``[3, 1, 1]`` normalization tensors on ``device`` (None: the images are not normalized), made
            once for the map stage and the model access after it.
        localization: ``summary.json`` ``run.localization`` (:func:`~auditor.run.localize.plan_localization`).
        skipped_methods: configured methods this model cannot run, with the reason (:func:`resolve_methods`).
    """

    cfg: AuditConfig
    store: RunStore
    loaded: LoadedModel
    device: torch.device
    dataset: AuditDataset
    classes: list[str]
    metadata: list[str]
    methods: list[str]
    chunk: int
    memory_format: str
    selection: Selection
    stratified: np.ndarray
    probe: np.ndarray
    batches: list[list[int]]
    shard: Shard | None = None
    mean: Tensor | None = None
    std: Tensor | None = None
    localization: dict[str, Any] = field(default_factory=dict)
    skipped_methods: dict[str, str] = field(default_factory=dict)

    @property
    def samples(self) -> list[SampleSpec]:
        return self.dataset.samples

    @property
    def layer(self) -> Any:
        """The configured target layer: a name, a list of names (multi-layer methods) or None (auto)."""
        return self.cfg.model.target_layer

    @property
    def n_batches(self) -> int:
        return len(self.batches)


def resolve_methods(
    cfg: AuditConfig, loaded: LoadedModel, probe: Tensor, layer: Any
) -> tuple[list[str], dict[str, str]]:
    """The methods that apply to this model, and the reason each configured method that does not was left out.

    ``fast`` gains ``cam`` when the head is GAP + one Linear. A method whose requirement the model lacks
    (LeGrad without attention, FullGrad without conv biases, CAM without a GAP + Linear head, ...) is
    skipped with its reason, logged and recorded in ``summary.json`` ``run.skipped_methods``; the run goes on
    unless no method is left. The reason comes from the method's ``requires`` check, and for the cheap
    methods from running each once on the probe image (a ``MethodNotApplicableError``); the layers were
    checked before (:func:`check_layers`).
    """
    methods = cfg.method_names()
    if loaded.scripted:
        bad = [m for m in methods if m not in BLACK_BOX]
        if bad:
            raise ConfigError(
                f"TorchScript models cannot be hooked, so only black-box methods {list(BLACK_BOX)} apply; "
                f"remove {bad} from 'methods' (or load the model with arch + checkpoint / a factory)"
            )
        return methods, {}
    if cfg.methods == "fast":
        methods = ["cam", *methods]
    skipped: dict[str, str] = {}
    for name in methods:
        spec = CAMS[name]
        reason = spec.requires(loaded.module, probe) if spec.requires is not None else None
        if reason is None and not spec.expensive:
            reason = _probe_method(cfg, loaded, probe, layer, name)
        if reason is not None:
            skipped[name] = reason
    for name, reason in skipped.items():
        if cfg.methods == "fast" and name == "cam":
            log.info("cam left out of the fast set: %s", reason)
        else:
            log.warning("method %s skipped: %s", name, reason)
    kept = [m for m in methods if m not in skipped]
    if not kept:
        raise ConfigError(
            "none of the configured methods applies to this model: "
            + "; ".join(f"{m}: {r}" for m, r in skipped.items())
        )
    if cfg.methods == "fast":
        skipped.pop("cam", None)  # an optional member of the fast set, not a configured method
    return kept, skipped


def _probe_method(cfg: AuditConfig, loaded: LoadedModel, probe: Tensor, layer: Any, name: str) -> str | None:
    """Run one cheap method on the probe image: the reason it cannot run on this model, or None.

    Raises:
        ModelError: the method fails for another reason (a layer that runs twice, a non-tensor output, ...).
    """
    try:
        options = {name: cfg.method_options.get(name, {})}
        compute_cams(loaded.module, probe, [0], methods=[name], layer=layer, options=options)
    except MethodNotApplicableError as err:
        return str(err)
    except (ValueError, TypeError) as err:
        raise ModelError(f"the configured methods cannot run on this model: {err}") from None
    return None


def run_identity(cfg: AuditConfig, samples: Sequence[SampleSpec], selection: Selection) -> str:
    """Hash of the resolved config, the selection and the sample list: what a resume must match.

    ``max_nonfinite_share`` and ``workers`` change no computed row, so a run stopped by the first can be
    resumed with a higher limit.
    """
    h = hashlib.sha256()
    h.update(dump_resolved(cfg.model_copy(update={"max_nonfinite_share": 0.0, "workers": 0})).encode())
    h.update(json.dumps([selection.limit, selection.per_class, selection.only_classes]).encode())
    for s in samples:
        h.update(f"{s.id}\0{s.path}\0{s.member}\0{s.label}\n".encode())
    return h.hexdigest()


def _effective(cfg: AuditConfig, device: torch.device) -> AuditConfig:
    if cfg.mixed_precision and not low_precision_pays(device):
        log.warning(
            "mixed_precision: %s has no bfloat16 instructions, where low-precision forwards are emulated and far "
            "slower than float32; running in float32",
            device,
        )
        return cfg.model_copy(update={"mixed_precision": False})
    return cfg


def _dataset(cfg: AuditConfig, selection: Selection) -> tuple[AuditDataset, list[str], list[str]]:
    spec = load_dataset(cfg.data)
    samples = select(
        spec.samples,
        spec.classes,
        only_classes=selection.only_classes,
        per_class=selection.per_class,
        limit=selection.limit,
        seed=cfg.seed,
    )
    if not samples:
        raise DataError("no sample left to audit after --only-classes / --per-class / --limit")
    mean_std = cfg.data.mean_std()
    if mean_std is not None and len(mean_std[0]) != 3:
        raise ConfigError("data.normalize: mean and std need 3 values (images are loaded as RGB)")
    return AuditDataset(samples, cfg.data.image_size, mean_std, cfg.data.max_image_pixels), spec.classes, spec.metadata


def _probe(dataset: AuditDataset, loaded: LoadedModel, classes: list[str], device: torch.device) -> Tensor:
    """The first readable image ``[1, 3, H, W]``."""
    n = min(len(dataset), 32)
    probe = next((it for it in (dataset[i] for i in range(n)) if it["ok"]), None)
    if probe is None:
        raise DataError(
            f"none of the first {n} images can be read; first problem: "
            f"{dataset.samples[0].path}: {dataset[0].get('reason')}"
        )
    image: Tensor = probe["image"][None].to(device)
    return image


def _check_outputs(loaded: LoadedModel, image: Tensor, classes: list[str]) -> None:
    """The model's logits must have one column per class."""
    with torch.no_grad():
        n_out = loaded.module(image).shape[1]
    if n_out != len(classes):
        raise ModelError(
            f"the model has {n_out} outputs but the dataset has {len(classes)} classes {classes}; "
            "set data.classes in model output order (or fix model.num_classes)"
        )
    if not loaded.scripted:
        try:
            inspect_model(loaded.module, image)
        except ValueError as err:
            raise ModelError(str(err)) from err


def _chunk(cfg: AuditConfig, loaded: LoadedModel, probe: Tensor) -> int:
    if isinstance(cfg.chunk_size, int):
        return cfg.chunk_size
    if loaded.scripted:  # no module hooks on TorchScript: fall back to the batch size
        return cfg.batch_size
    return auto_chunk(loaded.module, torch.cat([probe, probe]))


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


def _previous(out: Path, identity: str) -> dict[str, Any]:
    """``run.json`` of an unfinished run in ``out`` (empty for a new run); another run there is refused."""
    path = out / RUN
    if not path.exists():
        return {}
    previous: dict[str, Any] = json.loads(path.read_text())
    if previous.get("identity") != identity:
        raise ConfigError(
            f"{out} holds an unfinished run with another config or sample list; "
            "pass --force to start over or choose another --out"
        )
    log.info("resuming the unfinished run in %s", out)
    return previous


def check_layers(cfg: AuditConfig, loaded: LoadedModel, probe: Tensor) -> None:
    """Every layer the configured methods read must exist (and one must be found when none is named).

    Raises:
        ConfigError: a named layer (``model.target_layer``, ``method_options.*.layers``) does not exist.
        ModelError: no layer is named and the model has no spatial layer to find.
    """
    methods = [m for m in cfg.method_names() if CAMS[m].needs != "nothing"]
    if loaded.scripted or not methods:
        return
    named = cfg.model.target_layer is not None or any("layers" in cfg.method_options.get(m, {}) for m in methods)
    if not named and inspect_model(loaded.module, probe).default_layer is None:
        raise ModelError(
            "the model has no spatial layer CAM methods can read (no [B, K, h, w] feature map and no token grid "
            f"before its head), needed by {methods}; set model.target_layer, or use methods: [occlusion, rise]"
        )
    options = {m: cfg.method_options.get(m, {}) for m in methods}
    try:
        layers_per_method(loaded.module, probe, methods, options, cfg.model.target_layer)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model.target_layer / method_options: {err}") from None


def _record(
    store: RunStore, resolved: AuditConfig, identity: str, memory_format: str, selection: Selection, shard: Shard | None
) -> RunStore:
    """``config.resolved.yaml`` and ``run.json`` (what a resumed session must match)."""
    store.write_bytes(RESOLVED, dump_resolved(resolved).encode())
    store.write_json(
        RUN,
        {
            "identity": identity,
            "n": store.n,
            "batch_size": resolved.batch_size,
            "memory_format": memory_format,
            "selection": [selection.limit, selection.per_class, selection.only_classes],
            "shard": None if shard is None else [shard.index, shard.count],
        },
    )
    return store


def plan_run(
    cfg: AuditConfig,
    out: str | Path,
    *,
    force: bool,
    selection: Selection,
    shard: Shard | None = None,
    batches: list[list[int]] | None = None,
    module: nn.Module | None = None,
) -> Plan:
    """Validate and resolve everything a run needs, then record it in ``run.json``.

    Nothing is written under ``out`` until the config, model, data and layers have been checked, so a
    corrected rerun of a failed start needs no ``--force``. A shard's files go to
    ``out/shards/<i>-of-<n>/``; ``batches`` (the merge) replaces the batch layout; ``module`` is the model
    object :func:`auditor.audit` was given (``model.python``).
    """
    store_root = Path(out) / "shards" / shard.folder if shard is not None else Path(out)
    RunDir(store_root).check_finished(force)
    device = resolve_device(cfg.device)
    cfg = _effective(cfg, device)
    loaded = build_model(cfg.model, device, module)
    dataset, classes, metadata = _dataset(cfg, selection)
    probe = _probe(dataset, loaded, classes, device)
    loaded = logits_only(loaded, probe)
    _check_outputs(loaded, probe, classes)
    check_layers(cfg, loaded, probe)
    methods, skipped = resolve_methods(cfg, loaded, probe, cfg.model.target_layer)
    cfg, localization = plan_localization(cfg, loaded, probe, methods)
    chunk = _chunk(cfg, loaded, probe)
    resolved = cfg.model_copy(update={"methods": methods})
    identity = run_identity(resolved, dataset.samples, selection)
    RunDir(store_root).prepare(force)
    previous = _previous(store_root, identity)
    # a resumed run keeps the first session's choice, so its batches compute exactly like the others
    memory_format = previous.get("memory_format") or _memory_format(cfg, loaded, probe, chunk)
    store = _record(RunStore(store_root, len(dataset.samples)), resolved, identity, memory_format, selection, shard)
    if not loaded.scripted:
        set_memory_format(loaded.module, memory_format)
    labels = [s.label for s in dataset.samples]
    ids = [s.id for s in dataset.samples]
    stratified = stratified_subset(ids, labels, cfg.expensive.per_class, cfg.seed, total=cfg.expensive.total)
    probed = np.ones(len(labels), dtype=bool) if cfg.expensive.subset == "all" else stratified
    dataset.partners = background_partners(dataset.samples, probed, cfg.seed)
    layout = batches if batches is not None else main_batches(dataset.samples, cfg.batch_size, shard)
    norm = [torch.tensor(v, device=device) for v in mean_std] if (mean_std := cfg.data.mean_std()) else None
    return Plan(
        cfg=cfg,
        store=store,
        loaded=loaded,
        device=device,
        dataset=dataset,
        classes=classes,
        metadata=metadata,
        methods=methods,
        chunk=chunk,
        memory_format=memory_format,
        selection=selection,
        stratified=stratified,
        probe=probed,
        batches=layout,
        shard=shard,
        mean=norm[0] if norm else None,
        std=norm[1] if norm else None,
        localization=localization,
        skipped_methods=skipped,
    )
