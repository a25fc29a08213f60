"""Parquet files, Hugging Face ``save_to_disk`` folders and WebDataset tar shards: the same images audited from
inside a container give the results of the manifest run, bit for bit; bad members are counted skips."""

from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from auditor.cli import main
from auditor.config import DataConfig
from auditor.errors import DataError
from auditor.io.load import load_dataset
from tests.pipeline.conftest import make_config

CLASSES = ["disc", "square"]
QUICK = {"methods": ["grad_cam"], "metrics": ["energy_in_mask", "pointing_game"], "expensive": {"per_class": 2}}


def _rows(root: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((root / "audit.csv").open()))


def _run(root: Path, tmp: Path, data: dict, name: str) -> pd.DataFrame:
    (tmp / name).mkdir(parents=True, exist_ok=True)
    cfg = make_config(root, tmp / name, data=data, **QUICK)
    assert main(["run", str(cfg), "--out", str(tmp / name / "run"), "--no-progress"]) == 0
    return pd.read_parquet(tmp / name / "run" / "samples.parquet")


@pytest.fixture(scope="module")
def reference(dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    tmp = tmp_path_factory.mktemp("manifest")
    table = _run(dataset_dir, tmp, {}, "manifest")
    table["key"] = [Path(p).stem for p in table["path"]]
    return table.set_index("key").sort_index()


def _same(table: pd.DataFrame, reference: pd.DataFrame, keys: list[str]) -> None:
    table = table.assign(key=keys).set_index("key").sort_index()
    assert list(table.index) == list(reference.index)
    for col in ("label", "pred", "weather"):
        assert (table[col] == reference[col]).all(), col
    for col in ("prob", "energy_in_mask", "pointing_game"):
        np.testing.assert_array_equal(table[col].to_numpy(), reference[col].to_numpy())


def _write_parquet(root: Path, path: Path, *, corrupt: str | None = None) -> None:
    rows = _rows(root)
    image = [
        {"bytes": b"not an image" if Path(r["path"]).stem == corrupt else (root / r["path"]).read_bytes(), "path": None}
        for r in rows
    ]
    table = pa.table(
        {
            "id": [Path(r["path"]).stem for r in rows],
            "image": image,
            "label": [CLASSES.index(r["label"]) for r in rows],
            "mask": [{"bytes": (root / r["mask"]).read_bytes(), "path": None} for r in rows],
            "weather": [r["weather"] for r in rows],
            "ground": [r["ground"] for r in rows],
        }
    )
    features = {"label": {"names": CLASSES, "_type": "ClassLabel"}}  # as Hugging Face writes it
    table = table.replace_schema_metadata({b"huggingface": json.dumps({"info": {"features": features}}).encode()})
    pq.write_table(table, path, row_group_size=7)  # several row groups: members are found across them


def test_parquet_gives_the_manifest_results(dataset_dir: Path, tmp_path: Path, reference: pd.DataFrame) -> None:
    _write_parquet(dataset_dir, tmp_path / "scenes.parquet")
    table = _run(dataset_dir, tmp_path, {"parquet": str(tmp_path / "scenes.parquet"), "manifest": None}, "pq")
    _same(table, reference, list(table["id"]))
    assert table["path"].str.contains(r"scenes\.parquet::rg=\d;row=\d+;col=image").all()


def test_webdataset_shards_give_the_manifest_results(
    dataset_dir: Path, tmp_path: Path, reference: pd.DataFrame
) -> None:
    rows = _rows(dataset_dir)
    for shard in range(2):
        with tarfile.open(tmp_path / f"scenes-{shard:03d}.tar", "w") as tar:
            for r in rows[shard::2]:
                key = Path(r["path"]).stem
                members = {
                    f"{key}.png": (dataset_dir / r["path"]).read_bytes(),
                    f"{key}.cls": str(CLASSES.index(r["label"])).encode(),
                    f"{key}.mask.png": (dataset_dir / r["mask"]).read_bytes(),
                    f"{key}.json": json.dumps({"weather": r["weather"], "ground": r["ground"]}).encode(),
                }
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    data = {"webdataset": str(tmp_path / "scenes-{000..001}.tar"), "manifest": None, "classes": CLASSES}
    table = _run(dataset_dir, tmp_path, data, "wds")
    _same(table, reference, list(table["id"]))


def test_a_hugging_face_save_to_disk_folder_gives_the_manifest_results(
    dataset_dir: Path, tmp_path: Path, reference: pd.DataFrame
) -> None:
    datasets = pytest.importorskip("datasets")
    rows = _rows(dataset_dir)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES), "mask": datasets.Image(),
         "weather": datasets.Value("string"), "ground": datasets.Value("string"), "id": datasets.Value("string")}
    )  # fmt: skip
    ds = datasets.Dataset.from_dict(
        {
            "image": [str(dataset_dir / r["path"]) for r in rows],
            "label": [CLASSES.index(r["label"]) for r in rows],
            "mask": [str(dataset_dir / r["mask"]) for r in rows],
            "weather": [r["weather"] for r in rows],
            "ground": [r["ground"] for r in rows],
            "id": [Path(r["path"]).stem for r in rows],
        },
        features=features,
    )
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(DataError, match=r"splits \['test'\]"):
        load_dataset(DataConfig(huggingface=tmp_path / "hf"))
    table = _run(dataset_dir, tmp_path, {"huggingface": str(tmp_path / "hf"), "split": "test", "manifest": None}, "hf")
    _same(table, reference, list(table["id"]))


def test_bad_members_are_counted_skips_and_bad_tables_clear_errors(dataset_dir: Path, tmp_path: Path) -> None:
    _write_parquet(dataset_dir, tmp_path / "bad.parquet", corrupt="disc_0003")
    cfg = make_config(dataset_dir, tmp_path, data={"parquet": str(tmp_path / "bad.parquet"), "manifest": None}, **QUICK)
    assert main(["run", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    skipped = json.loads((tmp_path / "run" / "summary.json").read_text())["dataset"]["skipped"]
    assert len(skipped) == 1 and "bad.parquet::" in skipped[0]["path"]

    plain = pa.table({"image": [b"x"], "label": [0]})
    pq.write_table(plain, tmp_path / "ints.parquet")
    with pytest.raises(DataError, match="integer labels need class names"):
        load_dataset(DataConfig(parquet=tmp_path / "ints.parquet"))
    with pytest.raises(DataError, match="no image column 'img'"):
        load_dataset(DataConfig(parquet=tmp_path / "ints.parquet", image_column="img", classes=CLASSES))
    with pytest.raises(DataError, match="no shard matches"):
        load_dataset(DataConfig(webdataset=str(tmp_path / "none-*.tar")))
