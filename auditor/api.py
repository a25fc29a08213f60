"""The in-memory audit for notebooks: ``auditor.audit(model, data, classes=..., out=...)``.

It takes an ``nn.Module`` (torchvision, timm, Hugging Face ``...ForImageClassification``: their ``.logits`` are
used) and a ``Dataset`` / ``DataLoader`` / sequence of ``(image, label)`` or ``(image, label, mask)``, or a
Hugging Face dataset of ``{"image": PIL image, "label": int}`` rows. It writes the images once to
``out/inputs/`` (lossless: 8-bit PNG where 8 bits hold the pixels exactly, else 16-bit ``.npy``) with a
manifest, then runs the same code as ``auditor run``: the same defaults, outputs, validation and resume.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from auditor.config import AuditConfig, parse_config
from auditor.errors import ConfigError, DataError
from auditor.io.models import model_fingerprint

log = logging.getLogger(__name__)

INPUTS = "inputs"
MANIFEST = "manifest.csv"
_IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


class AuditResult:
    """A finished audit's outputs, read from its folder: ``flags``, ``findings``, ``summary``, ``samples``,
    ``report_path``; shown inline in Jupyter (the verdict and the findings)."""

    def __init__(self, out: str | Path, gate_passed: bool | None = None) -> None:
        self.out = Path(out)
        self.gate_passed = gate_passed  # the run's ``gates`` rules, when given: False where the CLI exits 1

    def gate(self, rules: str | Path | None = None, baseline: str | Path | None = None) -> bool:
        """Evaluate CI rules (default: the packaged ones) over this run, as ``auditor gate``; writes
        ``gate.json`` and returns whether it passes."""
        from auditor.outputs.gate import run_gate

        ok, report = run_gate(self.out, Path(rules) if rules else None, Path(baseline) if baseline else None, None)
        log.info("%s", report)
        return bool(ok)

    def _json(self, name: str) -> dict[str, Any]:
        return dict(json.loads((self.out / name).read_text()))

    @property
    def summary(self) -> dict[str, Any]:
        """``summary.json``."""
        return self._json("summary.json")

    @property
    def flags(self) -> list[dict[str, Any]]:
        """``flags.json``'s flags, worst first."""
        return list(self._json("flags.json").get("flags", []))

    @property
    def findings(self) -> list[dict[str, Any]]:
        """``flags.json``'s findings: the flags grouped by cause."""
        return list(self._json("flags.json").get("findings", []))

    @property
    def samples(self) -> Any:
        """``samples.parquet`` as a pandas DataFrame (one row per sample x method x target)."""
        import pandas as pd

        return pd.read_parquet(self.out / "samples.parquet")

    @property
    def report_path(self) -> Path:
        """``report.html``: one self-contained file."""
        return self.out / "report.html"

    @property
    def verdict(self) -> str:
        """The report's headline: what the packaged rules (or the run's ``gates``) say of this run."""
        from auditor.outputs.report import report_verdict

        return report_verdict(self.out)

    def __repr__(self) -> str:
        n = (self.summary.get("dataset") or {}).get("n")
        return (
            f"AuditResult({str(self.out)!r}: {n} images, {len(self.flags)} flag(s), {len(self.findings)} "
            f"finding(s); {self.verdict})"
        )

    def _repr_html_(self) -> str:
        rows = []
        for f in self.findings:
            rows.append(
                f"<li><b>{html.escape(str(f.get('severity', '')))}</b> "
                f"{html.escape(str(f.get('message') or f.get('title') or f.get('id', '')))}</li>"
            )
        if not rows:
            rows = [
                f"<li><b>{html.escape(str(f.get('severity', '')))}</b> {html.escape(str(f.get('message', '')))}</li>"
                for f in self.flags[:10]
            ]
        n = (self.summary.get("dataset") or {}).get("n")
        body = "<ul>" + "".join(rows) + "</ul>" if rows else "<p>No flag.</p>"
        return (
            f"<div><h4>auditor: {html.escape(self.verdict)}</h4><p>{n} images, {len(self.flags)} flag(s), "
            f"{len(self.findings)} finding(s). Report: <code>{html.escape(str(self.report_path))}</code></p>"
            f"{body}</div>"
        )


def _items(data: Any) -> Iterable[Any]:
    """Single samples from a Dataset, a sequence, a Hugging Face dataset or a DataLoader (batches split)."""
    if isinstance(data, torch.utils.data.DataLoader):
        for batch in data:
            yield from _unbatch(batch)
        return
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        for i in range(len(data)):
            yield data[i]
        return
    yield from data


def _unbatch(batch: Any) -> Iterable[Any]:
    if isinstance(batch, Mapping):
        keys = list(batch)
        n = len(batch[keys[0]])
        for i in range(n):
            yield {k: batch[k][i] for k in keys}
        return
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], Tensor) and batch[0].ndim == 4:
        for i in range(int(batch[0].shape[0])):
            yield tuple(part[i] for part in batch)
        return
    raise DataError(
        "a DataLoader given to auditor.audit must yield (images [B, 3, H, W], labels[, masks]) batches or dicts"
    )


def _split(item: Any, index: int) -> tuple[Any, Any, Any]:
    """``(image, label, mask or None)`` of one sample."""
    if isinstance(item, Mapping):
        image = next((item[k] for k in ("image", "img", "pixel_values") if k in item), None)
        label = next((item[k] for k in ("label", "labels", "target") if k in item), None)
        if image is None or label is None:
            raise DataError(f"sample {index}: a dict sample needs an 'image' and a 'label' key (got {sorted(item)})")
        return image, label, item.get("mask")
    if isinstance(item, list | tuple) and len(item) in (2, 3):
        return item[0], item[1], item[2] if len(item) == 3 else None
    raise DataError(f"sample {index}: expected (image, label) or (image, label, mask), got {type(item).__name__}")


def _label_index(label: Any, classes: Sequence[str], index: int) -> int:
    if isinstance(label, Tensor):
        label = label.item()
    if isinstance(label, str):
        if label not in classes:
            raise DataError(f"sample {index}: label {label!r} is not in classes {list(classes)}")
        return list(classes).index(label)
    if isinstance(label, int | np.integer) and 0 <= int(label) < len(classes):
        return int(label)
    raise DataError(f"sample {index}: label {label!r} is neither a class name nor an index below {len(classes)}")


def _pixels(image: Any, mean_std: tuple[list[float], list[float]] | None, index: int) -> np.ndarray:
    """``[H, W, 3]`` float64 pixels in [0, 1]: a tensor ``[3, H, W]`` normalized as the model expects is
    de-normalized with ``mean_std``; a PIL image or a ``uint8`` array is taken as it is."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        arr = image if image.ndim == 3 else image[:, :, None].repeat(3, axis=2)
        return arr.astype(np.float64) / 255.0
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image)
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] not in (1, 3):
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise DataError(
            f"sample {index}: the image must be a [3, H, W] tensor, a PIL image or a uint8 array, got {shape}"
        )
    x = image.detach().to("cpu", torch.float64).expand(3, -1, -1)
    if mean_std is not None:
        x = x * torch.tensor(mean_std[1], dtype=torch.float64)[:, None, None]
        x = x + torch.tensor(mean_std[0], dtype=torch.float64)[:, None, None]
    low, high = float(x.min()), float(x.max())
    if low < -0.02 or high > 1.02:
        raise DataError(
            f"sample {index}: after undoing normalize the pixels span [{low:.2f}, {high:.2f}], not [0, 1]; pass the "
            "normalize= your transform used (imagenet, none or {'mean': [...], 'std': [...]})"
        )
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


def _encode(pixels: np.ndarray) -> tuple[bytes, str]:
    """Lossless file bytes and suffix: 8-bit PNG where 8 bits hold the pixels exactly, else ``uint16`` ``.npy``."""
    scaled = pixels * 255.0
    if float(np.abs(scaled - np.round(scaled)).max()) < 1e-3:
        buf = io.BytesIO()
        Image.fromarray(np.round(scaled).astype(np.uint8)).save(buf, format="PNG")
        return buf.getvalue(), ".png"
    buf = io.BytesIO()
    np.save(buf, np.round(pixels * 65535.0).astype(np.uint16), allow_pickle=False)
    return buf.getvalue(), ".npy"


def _mask_png(mask: Any, index: int) -> bytes:
    if isinstance(mask, Image.Image):
        arr = np.asarray(mask.convert("L")) > 0
    else:
        arr = np.asarray(mask.detach().cpu() if isinstance(mask, Tensor) else mask)
        arr = arr[0] if arr.ndim == 3 and arr.shape[0] == 1 else arr
        if arr.ndim != 2:
            raise DataError(f"sample {index}: a mask must be [H, W] (nonzero = object), got shape {arr.shape}")
        arr = arr != 0
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


def write_inputs(
    data: Any,
    classes: Sequence[str],
    folder: Path,
    mean_std: tuple[list[float], list[float]] | None,
    masks: Sequence[Any] | None = None,
) -> tuple[Path, tuple[int, int]]:
    """Write every sample of ``data`` under ``folder`` with ``manifest.csv``; returns it and the first image's
    ``(H, W)``. A sample's file name holds its content hash, so the run identity changes with any pixel."""
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, str]] = []
    first: tuple[int, int] | None = None
    for index, item in enumerate(_items(data)):
        image, label, mask = _split(item, index)
        if masks is not None:
            if index >= len(masks):
                raise DataError(f"masks has {len(masks)} entries but data has more samples (sample {index})")
            mask = masks[index]
        pixels = _pixels(image, mean_std, index)
        first = first or (int(pixels.shape[0]), int(pixels.shape[1]))
        data_bytes, suffix = _encode(pixels)
        digest = hashlib.sha1(data_bytes).hexdigest()[:12]
        name = f"{index:07d}-{digest}{suffix}"
        _write_if_new(folder / name, data_bytes)
        row = {"id": f"{index:07d}-{digest}", "path": name, "label": classes[_label_index(label, classes, index)]}
        if mask is not None:
            mask_bytes = _mask_png(mask, index)
            mask_name = f"{index:07d}-{digest}.mask-{hashlib.sha1(mask_bytes).hexdigest()[:8]}.png"
            _write_if_new(folder / mask_name, mask_bytes)
            row["mask"] = mask_name
        rows.append(row)
    if not rows or first is None:
        raise DataError("auditor.audit: data holds no sample")
    if masks is not None and len(masks) != len(rows):
        raise DataError(f"masks has {len(masks)} entries for {len(rows)} samples")
    manifest = folder / MANIFEST
    columns = ["id", "path", "label"] + (["mask"] if any("mask" in r for r in rows) else [])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_if_new(manifest, buf.getvalue().encode())
    return manifest, first


def _write_if_new(path: Path, data: bytes) -> None:
    if path.is_file() and path.read_bytes() == data:
        return  # a resumed call finds the same files
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


@contextmanager
def _as_given(model: nn.Module) -> Iterator[None]:
    """Give the model back as it came: its train/eval mode, its device, its own ``forward`` (the run puts the
    model in eval mode on its device, and wraps ``forward`` of a model whose output holds the logits)."""
    training, own_forward = model.training, "forward" in vars(model)
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else None
    try:
        yield
    finally:
        if not own_forward:
            vars(model).pop("forward", None)
        model.train(training)
        if device is not None:
            model.to(device)


def _mean_std(normalize: Any) -> tuple[list[float], list[float]] | None:
    if normalize == "imagenet":
        return _IMAGENET
    if normalize == "none":
        return None
    if isinstance(normalize, Mapping) and "mean" in normalize and "std" in normalize:
        return [float(v) for v in normalize["mean"]], [float(v) for v in normalize["std"]]
    raise ConfigError(f"normalize must be 'imagenet', 'none' or {{'mean': [...], 'std': [...]}}, got {normalize!r}")


def audit_config(
    model: nn.Module,
    manifest: Path,
    classes: Sequence[str],
    out: Path,
    image_size: int,
    normalize: Any,
    config: Mapping[str, Any],
) -> AuditConfig:
    """The validated config of an in-memory audit: the keyword arguments over the CLI's defaults."""
    raw: dict[str, Any] = dict(config)
    model_keys = dict(raw.pop("model", {}) or {})
    for key in ("arch", "timm", "huggingface", "torchscript", "factory", "checkpoint"):
        if key in model_keys:
            raise ConfigError(f"auditor.audit() takes the model object; remove model.{key}")
    raw["model"] = {**model_keys, "python": model_fingerprint(model)}
    data_keys = dict(raw.pop("data", {}) or {})
    for key in ("manifest", "image_folder", "coco", "root", "classes", "normalize", "image_size"):
        if key in data_keys:
            raise ConfigError(f"auditor.audit() sets data.{key} itself; pass it as a keyword argument, or remove it")
    raw["data"] = {
        **data_keys,
        "manifest": str(manifest),
        "classes": list(classes),
        "image_size": image_size,
        "normalize": normalize,
    }
    return parse_config(raw, base=out, source="auditor.audit()")


def audit(
    model: nn.Module,
    data: Any,
    *,
    classes: Sequence[str],
    out: str | Path,
    masks: Sequence[Any] | None = None,
    normalize: str | Mapping[str, Sequence[float]] = "imagenet",
    image_size: int | None = None,
    force: bool = False,
    progress: bool | None = None,
    **config: Any,
) -> AuditResult:
    """Audit ``model`` on ``data`` in memory, with the outputs, defaults and resume of ``auditor run``.

    Args:
        model: any classifier ``nn.Module`` returning ``[B, C]`` logits (or an output holding them: a tuple,
            a dict, a Hugging Face ``ImageClassifierOutput``).
        data: a ``Dataset``, ``DataLoader`` or sequence of ``(image, label)`` / ``(image, label, mask)``, with
            images ``[3, H, W]`` normalized as the model expects (or PIL images), labels as class indices or
            names; or a Hugging Face dataset with ``image`` and ``label`` columns.
        classes: class names in the model's output order.
        out: the output folder (``report.html``, ``summary.json``, ``flags.json``, ``samples.parquet``,
            ``maps/``; the images in ``inputs/``). An unfinished run there resumes; a finished one needs
            ``force``.
        masks: object masks ``[H, W]`` (nonzero = object), one per sample, when ``data`` does not carry them.
        normalize: how the images were normalized (``imagenet``, ``none``, or ``{"mean": [...], "std":
            [...]}``); the audit undoes it to save the pixels and applies it again before the model.
        image_size: the side images are resized to (default: the first image's, which must then be square).
        force: delete a previous run in ``out`` first.
        progress: a progress bar (True), log lines (False) or auto.
        **config: any other config key (``methods=["grad_cam"]``, ``expensive={"per_class": 20}``,
            ``thresholds={...}``, ``device="cuda"``, ``gates="gates.yaml"``, ...).

    Returns:
        The :class:`AuditResult`. Bad input raises :class:`~auditor.errors.DataError` /
        :class:`~auditor.errors.ConfigError` / :class:`~auditor.errors.ModelError` naming the sample or key.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"auditor.audit() needs an nn.Module, got {type(model).__name__}")
    if not classes or not all(isinstance(c, str) for c in classes):
        raise ConfigError("auditor.audit() needs classes=[names] in the model's output order")
    out_dir = Path(out).resolve()
    from auditor.store.rundir import RunDir

    RunDir(out_dir).check_finished(force)
    manifest, (h, w) = write_inputs(data, classes, out_dir / INPUTS, _mean_std(normalize), masks)
    if image_size is None:
        if h != w:
            raise ConfigError(
                f"the images are {w}x{h}, not square: pass image_size= (they are resized to image_size x image_size)"
            )
        image_size = h
    cfg = audit_config(model, manifest, classes, out_dir, image_size, normalize, config)
    from auditor.run.local import run_audit

    with _as_given(model):
        run_audit(cfg, out_dir, force=force, progress=progress, module=model)
    result = AuditResult(out_dir)
    if cfg.gates is not None:  # as `auditor run` with gates: (whose exit code is 1 where this is False)
        result.gate_passed = result.gate(cfg.gates)
    return result


__all__ = ["AuditResult", "audit"]
