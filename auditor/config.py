"""Audit configuration: YAML -> validated :class:`AuditConfig` (DESIGN.md §3).

Unknown or misspelled keys, wrong types and missing files are reported with the key path, the bad value
and a close-match suggestion (``ConfigError``, exit code 2) before anything heavy runs. Relative paths
resolve against the config file's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from auditor.cams import CAMS, FAST_METHODS
from auditor.errors import ConfigError
from auditor.io.images import DEFAULT_MAX_PIXELS
from auditor.io.models import ModelConfig
from auditor.metrics import FAST_METRICS, METRICS
from auditor.shortcuts.catalog import Thresholds
from auditor.validation import format_validation_error, load_yaml

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class NormalizeConfig(_Strict):
    mean: list[float]
    std: list[float]

    @model_validator(mode="after")
    def _same_length(self) -> NormalizeConfig:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError("normalize.mean and normalize.std need the same, non-zero length")
        if any(s <= 0 for s in self.std):
            raise ValueError("normalize.std values must be > 0")
        return self


DATA_SOURCES = ("manifest", "image_folder", "coco", "parquet", "huggingface", "webdataset")


class DataConfig(_Strict):
    """The labelled dataset: exactly one of ``manifest``, ``image_folder``, ``coco``, ``parquet``,
    ``huggingface`` (a ``save_to_disk`` folder), ``webdataset`` (tar shards)."""

    manifest: Path | None = None
    image_folder: Path | None = None
    mask_folder: Path | None = None
    coco: Path | None = None
    parquet: Path | None = None
    huggingface: Path | None = None
    webdataset: list[str] | None = None
    split: str | None = Field(default=None, description="the split of a Hugging Face DatasetDict folder")
    image_column: str = "image"
    label_column: str = "label"
    mask_column: str | None = Field(default=None, description="default: a column named 'mask' where there is one")
    root: Path | None = None
    classes: list[str] | None = None
    image_size: StrictInt = Field(default=224, ge=8, le=4096)
    normalize: Literal["imagenet", "none"] | NormalizeConfig = "imagenet"
    metadata: list[str] | None = None
    max_image_pixels: StrictInt = Field(
        default=DEFAULT_MAX_PIXELS, ge=1, description="larger images are skipped, checked from the header"
    )
    allow_outside_root: StrictBool = Field(
        default=False, description="read image and mask paths that resolve outside the data root"
    )

    @field_validator("classes", mode="before")
    @classmethod
    def _class_names(cls, value: Any) -> Any:
        """Class names may be written as numbers (``[0, 1, 2]``): they are names, compared as text."""
        if isinstance(value, list):
            return [str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v for v in value]
        return value

    @field_validator("webdataset", mode="before")
    @classmethod
    def _shard_list(cls, value: Any) -> Any:
        """One pattern or a list of them."""
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        given = [k for k in DATA_SOURCES if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DATA_SOURCES)} (got {given or 'none'})")
        if self.mask_folder is not None and self.image_folder is None:
            raise ValueError("mask_folder goes with image_folder")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError("classes lists a name twice")
        return self

    def mean_std(self) -> tuple[list[float], list[float]] | None:
        """The normalization as (mean, std) lists, or None for ``none``."""
        if self.normalize == "imagenet":
            return list(IMAGENET_MEAN), list(IMAGENET_STD)
        if self.normalize == "none":
            return None
        return list(self.normalize.mean), list(self.normalize.std)


class ExpensiveConfig(_Strict):
    """Which samples get the methods and metrics that cost far more than one forward.

    ``stratified``: ``per_class`` samples of each class, drawn with the run's seed, at most ``total`` in all.
    ``flagged``: after the cheap pass, the samples behind each flag (the ids its evidence cites, then the
    flagged class's stratified samples), at most ``per_class`` per flag and ``total`` in all, in a second
    pass. ``all``: every sample.
    ``faithfulness``: which methods' maps get the faithfulness metrics (each costs forwards per method).
    """

    subset: Literal["stratified", "flagged", "all"] = "stratified"
    per_class: StrictInt = Field(default=50, ge=1)
    total: StrictInt | None = Field(
        default=500,
        ge=1,
        description="at most this many expensive samples in all (null: no cap): the picks go round the classes, "
        "so 10 classes keep per_class 50 and 1,000 classes get one sample in two classes",
    )
    faithfulness: Literal["auto", "all"] | list[str] = Field(
        default="auto",
        description="whose maps get the faithfulness metrics on the subset: auto = grad_cam (else the run's first "
        "class-sensitive method), all, or a list of methods",
    )


class SanityConfig(_Strict):
    """Model-parameter randomization test settings (run once per audit)."""

    methods: list[str] = Field(default_factory=lambda: ["grad_cam", "layer_cam"])
    n_images: StrictInt = Field(default=32, ge=2)
    n_blocks: StrictInt = Field(default=3, ge=1)


class AuditConfig(_Strict):
    """The whole audit (DESIGN.md §3)."""

    model: ModelConfig
    data: DataConfig
    methods: list[str] | Literal["fast", "all"] = "fast"
    target: Literal["label", "prediction", "both"] = "label"
    metrics: list[str] | Literal["fast", "all"] = "fast"
    expensive: ExpensiveConfig = Field(default_factory=ExpensiveConfig)
    method_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    metric_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    sanity: SanityConfig | None = None
    thresholds: Thresholds = Field(default_factory=lambda: Thresholds())
    gates: Path | None = None
    device: str = "auto"
    batch_size: StrictInt = Field(default=32, ge=1)
    chunk_size: Annotated[StrictInt, Field(ge=1)] | Literal["auto"] = "auto"
    mixed_precision: StrictBool = False
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    workers: StrictInt = Field(default=0, ge=0)
    seed: StrictInt = 0
    overlap: Literal["auto"] | StrictBool = Field(
        default="auto",
        description="compute each batch's CPU-side metrics while the device runs the next batch (auto: on CUDA)",
    )
    localization: Literal["auto", "off"] = Field(
        default="auto",
        description="when the target layer's grid is under 7x7, LayerCAM also reads an earlier, finer layer",
    )
    max_nonfinite_share: float = Field(
        default=0.05, ge=0, le=1, description="stop the run when more samples than this share give NaN/inf logits"
    )

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list):
            for name in value:
                CAMS[name]  # raises with a close match
            if not value:
                raise ValueError("methods is empty")
        return value

    @field_validator("metrics")
    @classmethod
    def _known_metrics(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list):
            for name in value:
                METRICS[name]
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda", "mps") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")

    @model_validator(mode="after")
    def _options(self) -> AuditConfig:
        for name, opts in self.method_options.items():
            CAMS[name].resolve_options(opts)
        for name, opts in self.metric_options.items():
            METRICS[name].resolve_options(opts)
        if self.sanity is not None:
            for name in self.sanity.methods:
                CAMS[name]
        if isinstance(self.expensive.faithfulness, list):
            for name in self.expensive.faithfulness:
                CAMS[name]
        return self

    def faithfulness_methods(self, methods: list[str]) -> list[str]:
        """The methods (of the resolved ``methods``) whose maps get the faithfulness metrics."""
        choice = self.expensive.faithfulness
        if choice == "all":
            return list(methods)
        if isinstance(choice, list):
            return [m for m in methods if m in choice]
        sensitive = [m for m in methods if CAMS[m].class_sensitive]
        return ["grad_cam"] if "grad_cam" in methods else sensitive[:1] or methods[:1]

    def method_names(self) -> list[str]:
        """The resolved method list (``fast`` and ``all`` expanded)."""
        if self.methods == "fast":
            return list(FAST_METHODS)
        if self.methods == "all":
            return CAMS.names()
        return list(self.methods)

    def metric_names(self) -> list[str]:
        """The resolved metric list (``fast`` and ``all`` expanded)."""
        if self.metrics == "fast":
            return list(FAST_METRICS)
        if self.metrics == "all":
            return METRICS.names()
        return list(self.metrics)


# ------------------------------------------------------------------------------------------ loading


def _resolve_paths(cfg: AuditConfig, base: Path) -> None:
    def fix(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else (base / p)).resolve()

    cfg.model.torchscript = fix(cfg.model.torchscript)
    cfg.model.huggingface = fix(cfg.model.huggingface)
    cfg.model.checkpoint = fix(cfg.model.checkpoint)
    if cfg.model.factory is not None:
        module, _, fn = cfg.model.factory.rpartition(":")
        if module.endswith(".py"):
            cfg.model.factory = f"{fix(Path(module))}:{fn}"
    for key in ("manifest", "image_folder", "mask_folder", "coco", "root", "parquet", "huggingface"):
        setattr(cfg.data, key, fix(getattr(cfg.data, key)))
    if cfg.data.webdataset is not None:
        cfg.data.webdataset = [p if Path(p).is_absolute() else str(base / p) for p in cfg.data.webdataset]
    cfg.gates = fix(cfg.gates)


def _check_files(cfg: AuditConfig, source: str) -> None:
    checks = [
        ("model.torchscript", cfg.model.torchscript, "file"),
        ("model.huggingface", cfg.model.huggingface, "dir"),
        ("model.checkpoint", cfg.model.checkpoint, "file"),
        ("data.manifest", cfg.data.manifest, "file"),
        ("data.coco", cfg.data.coco, "file"),
        ("data.image_folder", cfg.data.image_folder, "dir"),
        ("data.mask_folder", cfg.data.mask_folder, "dir"),
        ("data.huggingface", cfg.data.huggingface, "dir"),
        ("data.root", cfg.data.root, "dir"),
        ("gates", cfg.gates, "file"),
    ]
    problems = []
    for key, path, kind in checks:
        if path is None:
            continue
        ok = path.is_file() if kind == "file" else path.is_dir()
        if not ok:
            problems.append(f"{source}: {key}: {'file' if kind == 'file' else 'folder'} not found: {path}")
    if cfg.data.parquet is not None and not cfg.data.parquet.exists():
        problems.append(f"{source}: data.parquet: file or folder not found: {cfg.data.parquet}")
    if cfg.model.factory is not None:
        module = cfg.model.factory.rpartition(":")[0]
        if module.endswith(".py") and not Path(module).is_file():
            problems.append(f"{source}: model.factory: file not found: {module}")
    if problems:
        raise ConfigError("\n".join(problems))


def parse_config(raw: Any, *, base: Path, source: str = "config") -> AuditConfig:
    """Validate a config mapping; relative paths resolve against ``base``. Raises :class:`ConfigError`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a YAML mapping, got {type(raw).__name__}")
    try:
        cfg = AuditConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, AuditConfig)) from None
    except ValueError as err:  # a registry lookup inside a validator
        raise ConfigError(f"{source}: {err}") from None
    _resolve_paths(cfg, base)
    _check_files(cfg, source)
    return cfg


def load_config(path: str | Path) -> AuditConfig:
    """Read and validate a YAML config file (``ConfigError`` with key paths on any problem)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = load_yaml(path.read_text(encoding="utf-8"), str(path))
    return parse_config(raw, base=path.resolve().parent, source=str(path))


def dump_resolved(cfg: AuditConfig) -> str:
    """The config with every default and list filled in, as YAML (``config.resolved.yaml``)."""
    data = cfg.model_dump(mode="json")
    data["methods"] = cfg.method_names()
    data["metrics"] = cfg.metric_names()
    data["method_options"] = {m: CAMS[m].resolve_options(cfg.method_options.get(m)) for m in cfg.method_names()}
    data["metric_options"] = {m: METRICS[m].resolve_options(cfg.metric_options.get(m)) for m in cfg.metric_names()}
    return yaml.safe_dump(data, sort_keys=False)
