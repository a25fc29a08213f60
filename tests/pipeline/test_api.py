"""``auditor.audit(model, data, ...)``: the in-memory audit runs the CLI's code and gives the CLI's results."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import auditor
from auditor.cli import main
from auditor.errors import ConfigError, DataError
from tests.pipeline.conftest import make_config
from tests.pipeline.tinynet import TinyNet

MEAN, STD = 0.45, 0.25
NORMALIZE = {"mean": [MEAN] * 3, "std": [STD] * 3}
CLASSES = ["disc", "square"]
KEYS = {
    "methods": ["grad_cam", "hires_cam"],
    "metrics": ["energy_in_mask", "pointing_game"],
    "expensive": {"per_class": 3},
    "batch_size": 5,
    "memory_format": "channels_last",
}


class Scenes(torch.utils.data.Dataset):
    """The test scenes as a notebook holds them: normalized tensors, int labels and mask tensors."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.rows = list(csv.DictReader((root / "audit.csv").open()))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        r = self.rows[i]
        x = torch.from_numpy(np.asarray(Image.open(self.root / r["path"]), np.float32) / 255).permute(2, 0, 1)
        mask = torch.from_numpy(np.asarray(Image.open(self.root / r["mask"])) > 0)
        return (x - MEAN) / STD, CLASSES.index(r["label"]), mask


def _model(root: Path) -> TinyNet:
    model = TinyNet(2)
    state = torch.load(root / "model.pt", weights_only=True)["state_dict"]
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    return model


@pytest.mark.slow
def test_audit_in_memory_gives_the_cli_results(dataset_dir: Path, tmp_path: Path) -> None:
    res = auditor.audit(
        _model(dataset_dir), Scenes(dataset_dir), classes=CLASSES, out=tmp_path / "api", normalize=NORMALIZE, **KEYS
    )
    overrides = {k: v for k, v in KEYS.items() if k != "expensive"}
    cfg = make_config(dataset_dir, tmp_path, **overrides)
    assert main(["run", str(cfg), "--out", str(tmp_path / "cli"), "--no-progress"]) == 0

    cli = pd.read_parquet(tmp_path / "cli" / "samples.parquet").sort_values(["path", "method"])
    api = res.samples.sort_values(["id", "method"])
    assert len(api) == len(cli) == 24 * 2
    np.testing.assert_allclose(api["prob"].to_numpy(), cli["prob"].to_numpy(), atol=1e-6)
    np.testing.assert_allclose(api["energy_in_mask"].to_numpy(), cli["energy_in_mask"].to_numpy(), atol=1e-5)
    cli_flags = json.loads((tmp_path / "cli" / "flags.json").read_text())["flags"]
    assert sorted(f["id"] for f in res.flags) == sorted(f["id"] for f in cli_flags)
    assert res.summary["dataset"]["n"] == 24 and res.report_path.is_file()
    assert res.summary["config"]["model"]["python"].startswith("TinyNet sha256:")

    page = res._repr_html_()
    assert res.verdict in page and "24 images" in page and str(res.report_path) in page
    assert "finding" in repr(res)

    with pytest.raises(ConfigError, match="finished run"):  # as the CLI: a finished run needs force
        auditor.audit(_model(dataset_dir), Scenes(dataset_dir), classes=CLASSES, out=tmp_path / "api", **KEYS)


def test_the_model_sees_the_tensors_it_was_given(dataset_dir: Path, tmp_path: Path) -> None:
    """Images that 8 bits cannot hold (a blur of the scenes) go through ``.npy`` files, losslessly: the audit's
    probabilities are the model's own on the given tensors."""
    scenes = Scenes(dataset_dir)
    blur = torch.nn.AvgPool2d(3, 1, 1, count_include_pad=False)
    items = [(blur((scenes[i][0] * STD + MEAN)[None])[0], scenes[i][1]) for i in range(0, 24, 3)]
    model = _model(dataset_dir).eval()
    res = auditor.audit(
        model,
        items,
        classes=CLASSES,
        out=tmp_path / "run",
        normalize="none",
        methods=["grad_cam"],
        metrics=["pointing_game"],
        expensive={"per_class": 1},
    )
    assert len(list((tmp_path / "run" / "inputs").glob("*.npy"))) == len(items)
    with torch.no_grad():
        direct = torch.softmax(model(torch.stack([x for x, _ in items])), 1)
    table = res.samples.sort_values("id")
    preds = torch.tensor([CLASSES.index(p) for p in table["pred"]])
    own = direct[torch.arange(len(items)), preds].numpy()
    np.testing.assert_allclose(table["prob"].to_numpy(), own, atol=1e-5)
    assert (table["label"].to_numpy() == [CLASSES[y] for _, y in items]).all()


def test_bad_input_names_the_sample(dataset_dir: Path, tmp_path: Path) -> None:
    scenes = Scenes(dataset_dir)
    model = _model(dataset_dir)
    bad_label = [scenes[0][:2], (scenes[1][0], 7)]
    with pytest.raises(DataError, match="sample 1: label 7"):
        auditor.audit(model, bad_label, classes=CLASSES, out=tmp_path / "a", normalize=NORMALIZE)
    with pytest.raises(DataError, match="sample 0: after undoing normalize"):  # normalized, but said not to be
        auditor.audit(model, [scenes[0][:2]], classes=CLASSES, out=tmp_path / "b", normalize="none")
    with pytest.raises(ConfigError, match="methods"):  # any config key, validated as in a YAML file
        auditor.audit(model, [scenes[0][:2]], classes=CLASSES, out=tmp_path / "c", normalize=NORMALIZE, methods=["x"])
    with pytest.raises(ConfigError, match=r"nn\.Module"):
        auditor.audit(lambda x: x, [scenes[0][:2]], classes=CLASSES, out=tmp_path / "d")  # type: ignore[arg-type]


def test_a_hugging_face_dataset_is_audited(dataset_dir: Path, tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rows = list(csv.DictReader((dataset_dir / "audit.csv").open()))[::4]
    ds = datasets.Dataset.from_dict(
        {
            "image": [Image.open(dataset_dir / r["path"]) for r in rows],
            "label": [CLASSES.index(r["label"]) for r in rows],
        },
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)}),
    )
    res = auditor.audit(
        _model(dataset_dir),
        ds,
        classes=CLASSES,
        out=tmp_path / "hf",
        normalize=NORMALIZE,
        methods=["grad_cam"],
        metrics=["pointing_game"],
        expensive={"per_class": 1},
    )
    assert res.summary["dataset"]["n"] == len(rows)
    assert len(list((tmp_path / "hf" / "inputs").glob("*.png"))) == len(rows)  # PIL images are saved as they are


def test_a_dataloader_gives_the_same_inputs_as_its_dataset(dataset_dir: Path, tmp_path: Path) -> None:
    from auditor.api import write_inputs

    scenes = Scenes(dataset_dir)
    loader = torch.utils.data.DataLoader(scenes, batch_size=5)
    norm = ([MEAN] * 3, [STD] * 3)
    a, _ = write_inputs(scenes, CLASSES, tmp_path / "a", norm)
    b, _ = write_inputs(loader, CLASSES, tmp_path / "b", norm)
    assert a.read_text() == b.read_text() and len(a.read_text().splitlines()) == 25
    assert a.read_text().splitlines()[0] == "id,path,label,mask"


def test_a_hugging_face_model_object_is_audited_and_given_back_as_it_came(dataset_dir: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=2,
    )  # fmt: skip
    model = transformers.ViTForImageClassification(config).train()
    attention = model.config._attn_implementation
    items = [Scenes(dataset_dir)[i][:2] for i in range(0, 24, 3)]
    res = auditor.audit(
        model, items, classes=CLASSES, out=tmp_path / "vit", normalize=NORMALIZE, methods=["grad_cam", "legrad"],
        metrics=["pointing_game"], expensive={"per_class": 1},
    )  # fmt: skip
    assert set(res.samples["method"]) == {"grad_cam", "legrad"} and res.summary["dataset"]["n"] == len(items)
    assert model.training and "forward" not in vars(model)  # its own forward, its own mode
    assert model.config._attn_implementation == attention  # LeGrad's eager pass restored it
    assert hasattr(model(items[0][0][None]), "logits")
