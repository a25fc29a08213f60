"""Bad data, config errors, class order, model loading and every input format, on real files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from auditor.cli import main
from auditor.config import load_config
from auditor.errors import DataError, ModelError
from auditor.io.dataset import AuditDataset
from auditor.io.images import decode_image, rle_decode
from auditor.io.models import load_weights
from auditor.io.sources import SampleSpec, read_coco, read_image_folder
from auditor.run.local import run_audit
from tests.pipeline.conftest import make_config
from tests.pipeline.tinynet import TinyNet


def _copy(dataset_dir: Path, tmp: Path) -> Path:
    root = tmp / "data"
    shutil.copytree(dataset_dir, root)
    return root


def test_bad_files_are_skipped_or_warned_and_counted(dataset_dir: Path, tmp_path: Path) -> None:
    root = _copy(dataset_dir, tmp_path)
    (root / "images" / "disc_0001.png").write_bytes(b"not an image at all")
    good = (root / "images" / "disc_0002.png").read_bytes()
    (root / "images" / "disc_0002.png").write_bytes(good[: len(good) // 2])  # truncated
    (root / "images" / "disc_0003.png").unlink()  # missing
    Image.fromarray(np.zeros((20, 31), np.uint8)).save(root / "masks" / "square_0001.png")  # wrong size
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "masks" / "square_0002.png")  # empty
    manifest = pd.read_csv(root / "audit.csv")
    manifest["mask"] = manifest["mask"].astype(object)
    manifest.loc[manifest["path"] == "images/square_0003.png", "mask"] = ""
    extra = manifest[manifest["path"] == "images/square_0003.png"].assign(x0=40, y0=40, x1=60, y1=60)
    manifest = pd.concat([manifest.assign(x0="", y0="", x1="", y1=""), extra])  # box outside the image
    manifest.to_csv(root / "audit.csv", index=False)
    cfg = load_config(make_config(root, tmp_path, methods=["grad_cam"], metrics=["energy_in_mask"]))
    s = run_audit(cfg, tmp_path / "r", progress=False)
    skipped = {Path(x["path"]).name: x["reason"] for x in s["dataset"]["skipped"]}
    assert set(skipped) == {"disc_0001.png", "disc_0002.png", "disc_0003.png"}
    assert "corrupt" in skipped["disc_0001.png"] and "corrupt or truncated" in skipped["disc_0002.png"]
    assert "cannot read" in skipped["disc_0003.png"]
    assert s["dataset"]["n"] == 21
    assert s["dataset"]["warning_counts"] == {"empty mask": 1, "outside": 1, "size": 1}
    table = pd.read_parquet(tmp_path / "r" / "samples.parquet").set_index("id")
    assert np.isnan(table.loc["images/square_0001.png", "energy_in_mask"])  # mask dropped
    assert np.isnan(table.loc["images/square_0002.png", "energy_in_mask"])  # empty mask
    assert table.loc["images/square_0003.png", "mask_source"] == "none"  # its only box was dropped


def test_config_errors_exit_2_with_the_key_path(dataset_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg = make_config(dataset_dir, tmp_path)
    cfg.write_text(cfg.read_text().replace("batch_size:", "batch_sise:"))
    assert main(["run", str(cfg), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "batch_sise: unknown key; did you mean 'batch_size'" in err
    assert main(["run", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "r")]) == 2


def test_label_outside_class_list_names_the_row(dataset_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg = make_config(dataset_dir, tmp_path, data={"classes": ["disc", "triangle"]})
    assert main(["run", str(cfg), "--out", str(tmp_path / "r")]) == 3
    err = capsys.readouterr().err
    assert "audit.csv line" in err and "'square' is not in the class list" in err
    assert "Traceback" not in err


def test_class_order_must_match_the_model(dataset_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    cfg = make_config(dataset_dir, tmp_path, data={"classes": ["disc", "square", "star"]})
    assert main(["run", str(cfg), "--out", str(tmp_path / "r")]) == 3
    assert "2 outputs but the dataset has 3 classes" in capsys.readouterr().err


def test_checkpoint_problems_are_explained(tmp_path: Path) -> None:
    model = TinyNet(2)
    torch.save({"fc.weight": torch.zeros(2, 16)}, tmp_path / "partial.pt")
    with pytest.raises(ModelError, match="missing key"):
        load_weights(model, tmp_path / "partial.pt")
    torch.save(TinyNet(3).state_dict(), tmp_path / "three.pt")
    with pytest.raises(ModelError, match=r"shape mismatch.*num_classes"):
        load_weights(model, tmp_path / "three.pt")
    torch.save(model, tmp_path / "pickled.pt")  # a whole pickled model: refused by weights_only
    with pytest.raises(ModelError, match="weights_only"):
        load_weights(TinyNet(2), tmp_path / "pickled.pt")
    from safetensors.torch import save_file

    save_file({f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
    fresh = TinyNet(2)
    load_weights(fresh, tmp_path / "w.safetensors")
    torch.testing.assert_close(fresh.fc.weight, model.fc.weight)


def test_torchscript_allows_black_box_methods_only(dataset_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    model = TinyNet(2).eval()
    torch.jit.script(model).save(str(tmp_path / "model.ts"))
    model_cfg = {"torchscript": str(tmp_path / "model.ts"), "factory": None, "checkpoint": None}
    cfg = make_config(dataset_dir, tmp_path, model=model_cfg)
    assert main(["run", str(cfg), "--out", str(tmp_path / "a")]) == 2
    assert "only black-box methods" in capsys.readouterr().err
    cfg = make_config(
        dataset_dir,
        tmp_path,
        model=model_cfg,
        methods=["occlusion"],
        expensive={"subset": "all"},
        metrics=["energy_in_mask", "average_drop"],
    )
    s = run_audit(load_config(cfg), tmp_path / "b", progress=False)
    assert s["aggregates"]["occlusion"]["label"]["*"]["average_drop"]["n"] == 24


def test_torchvision_arch_with_state_dict(dataset_dir: Path, tmp_path: Path) -> None:
    import torchvision

    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), tmp_path / "r18.pt")
    cfg = make_config(
        dataset_dir,
        tmp_path,
        model={"arch": "resnet18", "num_classes": 2, "factory": None, "checkpoint": str(tmp_path / "r18.pt")},
        methods="fast",
        metrics=["energy_in_mask"],
        data={"image_size": 64},
    )
    s = run_audit(load_config(cfg), tmp_path / "r", progress=False)
    # at 64 px layer4 is 2 x 2 and feeds GAP + fc, so cam joins the fast set
    assert set(s["aggregates"]) == {"cam", "grad_cam", "grad_cam_pp", "hires_cam", "layer_cam"}
    assert s["run"]["layer"] is None and "resnet18" in s["run"]["model"]


def test_image_modes_sizes_and_geometry(tmp_path: Path) -> None:
    rgb = (np.random.default_rng(0).random((30, 60, 3)) * 255).astype(np.uint8)
    for name, arr in {
        "gray.png": rgb[:, :, 0],
        "rgba.png": np.dstack([rgb, np.full((30, 60), 128, np.uint8)]),
        "deep.png": (rgb[:, :, 0].astype(np.uint16) * 257),
    }.items():
        Image.fromarray(arr).save(tmp_path / name)
        pixels = decode_image((tmp_path / name).read_bytes())
        assert pixels.shape == (30, 60, 3) and pixels.min() >= 0 and pixels.max() <= 1
    np.testing.assert_allclose(
        decode_image((tmp_path / "deep.png").read_bytes())[:, :, 0], rgb[:, :, 0] / 255, atol=1e-6
    )
    mask = np.zeros((30, 60), np.uint8)
    mask[6:12, 30:45] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    spec = SampleSpec("a", tmp_path / "gray.png", 0, mask=tmp_path / "mask.png", boxes=[(30.0, 6.0, 45.0, 12.0)])
    item = AuditDataset([spec], 20, None)[0]
    assert item["image"].shape == (3, 20, 20)
    torch.testing.assert_close(item["boxes"], torch.tensor([[10.0, 4.0, 15.0, 8.0]]))  # x / 3, y * 2 / 3
    rows, cols = item["mask"].nonzero(as_tuple=True)
    assert (int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())) == (4, 7, 10, 14)


def test_image_folder_with_mask_folder(dataset_dir: Path, tmp_path: Path) -> None:
    images, masks = tmp_path / "imgs", tmp_path / "masks"
    for label in ("disc", "square"):
        (images / label).mkdir(parents=True)
        (masks / label).mkdir(parents=True)
        for i in range(3):
            shutil.copy(dataset_dir / "images" / f"{label}_{i:04d}.png", images / label / f"{i}.png")
            if i < 2:
                shutil.copy(dataset_dir / "masks" / f"{label}_{i:04d}.png", masks / label / f"{i}.png")
    ds = read_image_folder(images, masks, None)
    assert ds.classes == ["disc", "square"] and len(ds.samples) == 6
    assert sum(s.mask is not None for s in ds.samples) == 4
    with pytest.raises(DataError, match=r"not in data\.classes"):
        read_image_folder(images, None, ["disc"])


def test_coco_boxes_polygons_and_rle(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((10, 8, 3), np.uint8)).save(tmp_path / "a.png")
    rle_mask = np.zeros((10, 8), bool)
    rle_mask[2:5, 3:6] = True
    counts, flat, prev, run = [], rle_mask.T.ravel(), False, 0  # column-major runs starting with background
    for v in flat:
        if v != prev:
            counts.append(run)
            run, prev = 0, v
        run += 1
    counts.append(run)
    coco = {
        "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "a.png", "unused": 1}],
        "categories": [{"id": 7, "name": "cat"}, {"id": 9, "name": "dog"}],
        "annotations": [
            {
                "image_id": 1,
                "category_id": 7,
                "bbox": [1, 1, 4, 4],
                "area": 16,
                "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]],
            },
            {"image_id": 1, "category_id": 9, "bbox": [0, 0, 2, 2], "area": 4, "segmentation": []},
            {
                "image_id": 2,
                "category_id": 9,
                "bbox": [3, 2, 3, 3],
                "area": 9,
                "segmentation": {"size": [10, 8], "counts": counts},
            },
        ],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    with pytest.raises(DataError, match="used twice"):
        read_coco(tmp_path / "coco.json", None, None)
    coco["images"][1]["file_name"] = "b.png"
    shutil.copy(tmp_path / "a.png", tmp_path / "b.png")
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    ds = read_coco(tmp_path / "coco.json", None, None)
    assert ds.classes == ["cat", "dog"]
    a, b = ds.samples
    assert a.label == 0 and a.boxes == [(1.0, 1.0, 5.0, 5.0)] and len(a.polygons) == 1  # largest annotation: cat
    assert b.label == 1 and len(b.rle) == 1
    np.testing.assert_array_equal(rle_decode(b.rle[0]), rle_mask)
    item = AuditDataset([b], 10, None)[0]
    assert item["mask_source"] == "polygons"


def _rle_to_string(counts: list[int]) -> str:
    """pycocotools' rleToString: delta-code from the 4th count, 5-bit groups + 48, 0x20 = continue."""
    out = []
    for i, value in enumerate(counts):
        x = value - counts[i - 2] if i > 2 else value
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def test_compressed_rle_string_decodes() -> None:
    from auditor.io.images import rle_counts

    assert rle_counts("538") == [5, 3, 8]
    rng = np.random.default_rng(0)
    for _ in range(20):
        counts = rng.integers(0, 5000, 9).tolist()  # big runs (several 5-bit groups) and negative deltas
        assert rle_counts(_rle_to_string(counts)) == counts
    mask = rle_decode({"size": [4, 4], "counts": "538"})  # 5 background, 3 object, 8 background, column-major
    assert mask[1:4, 1].all() and int(mask.sum()) == 3
