"""The configured sample source, whichever it is (``auditor.config.DataConfig``) -> :class:`Dataset`. No torch."""

from __future__ import annotations

from typing import Any

from auditor.io import tables
from auditor.io.sources import Dataset, confine, read_coco, read_image_folder, read_manifest


def load_dataset(cfg: Any) -> Dataset:
    """Read the configured source (``cfg`` is a :class:`auditor.config.DataConfig`), confined to its root."""
    if cfg.manifest is not None:
        data = read_manifest(cfg.manifest, cfg.root, cfg.classes, cfg.metadata)
        roots = [cfg.root or cfg.manifest.parent]
    elif cfg.image_folder is not None:
        data = read_image_folder(cfg.image_folder, cfg.mask_folder, cfg.classes)
        roots = [cfg.image_folder, *([cfg.mask_folder] if cfg.mask_folder is not None else [])]
    elif cfg.coco is not None:
        data = read_coco(cfg.coco, cfg.root, cfg.classes)
        roots = [cfg.root or cfg.coco.parent]
    else:  # images inside container files; the containers are what gets read
        columns = tables.Columns(cfg.image_column, cfg.label_column, cfg.mask_column)
        if cfg.parquet is not None:
            data = tables.read_parquet(cfg.parquet, columns, cfg.classes, cfg.metadata)
            roots = [cfg.parquet if cfg.parquet.is_dir() else cfg.parquet.parent]
        elif cfg.huggingface is not None:
            data = tables.read_huggingface_disk(cfg.huggingface, cfg.split, columns, cfg.classes, cfg.metadata)
            roots = [cfg.huggingface]
        else:
            shards = tables.expand_shards(cfg.webdataset)
            data = tables.read_webdataset(shards, cfg.classes, cfg.metadata)
            roots = sorted({s.parent for s in shards})
    if not getattr(cfg, "allow_outside_root", False):
        confine(data.samples, roots)
    return data
