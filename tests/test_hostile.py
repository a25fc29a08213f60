"""Hostile input and faults: each case ends in a clear error with its documented exit code, or a counted skip
or warning with a stable reason; never a silent wrong result, a traceback, a hang or a leak.

The README's "Bad data" section lists the rules these cases check.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from auditor.cli import main, printable
from auditor.errors import AuditorError, ConfigError, DataError, MethodNotApplicableError, ModelError
from auditor.io.images import ImageError, decode_for

MODELS = '''
import torch
from torch import nn


class Net(nn.Module):
    """A small CNN; output: logits, a tuple, a dict, NaN for bright images, or no logits at all."""

    def __init__(self, output="tensor"):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(6, 2)
        self.output = output

    def forward(self, x):
        features = self.features(x)
        logits = self.fc(features.mean((2, 3)))
        if self.output == "tuple":
            return logits, features
        if self.output == "dict":
            return {"logits": logits, "aux": logits.sum()}
        if self.output == "nan_bright":
            bright = x.mean((1, 2, 3)) > 0.8
            return torch.where(bright[:, None], torch.full_like(logits, float("nan")), logits)
        if self.output == "no_logits":
            return logits[:, :, None]
        return logits


class Mlp(nn.Module):
    """No spatial layer at all: CAM methods cannot apply."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2))

    def forward(self, x):
        return self.net(x)


def build(output="tensor"):
    torch.manual_seed(0)
    return Net(output)


def mlp():
    torch.manual_seed(0)
    return Mlp()
'''


def _dataset(root: Path, n: int = 6, bright: int = 0) -> Path:
    """``n`` images per class (16 px noise, with a mask), plus ``bright`` white images of class a."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for cls in ("a", "b"):
        for i in range(n):
            name = f"{cls}{i}.png"
            Image.fromarray(rng.integers(0, 160, (16, 16, 3), dtype=np.uint8)).save(root / "images" / name)
            mask = np.zeros((16, 16), np.uint8)
            mask[4:12, 4:12] = 255
            Image.fromarray(mask).save(root / "masks" / name)
            rows.append({"path": f"images/{name}", "label": cls, "mask": f"masks/{name}", "site": "x"})
    for i in range(bright):
        Image.fromarray(np.full((16, 16, 3), 255, np.uint8)).save(root / "images" / f"white{i}.png")
        rows.append({"path": f"images/white{i}.png", "label": "a", "mask": "", "site": "x"})
    pd.DataFrame(rows).to_csv(root / "audit.csv", index=False)
    (root / "models.py").write_text(MODELS)
    return root


def _config(root: Path, tmp: Path, **over: Any) -> Path:
    cfg: dict[str, Any] = {
        "model": {"factory": f"{root / 'models.py'}:build"},
        "data": {"manifest": str(root / "audit.csv"), "image_size": 16, "normalize": "none"},
        "methods": ["grad_cam"],
        "metrics": ["energy_in_mask"],
        "batch_size": 4,
        "memory_format": "contiguous",
    }
    for key, value in over.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    path = tmp / "audit.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(cfg: Path, out: Path, *extra: str) -> int:
    return main(["run", str(cfg), "--out", str(out), "--no-progress", *extra])


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return _dataset(tmp_path / "data")


# ------------------------------------------------------------------------------------------ silent wrong results


def test_non_finite_logits_are_skipped_with_a_reason_not_counted_correct(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data", bright=3)
    cfg = _config(root, tmp_path, model={"factory_kwargs": {"output": "nan_bright"}}, max_nonfinite_share=0.5)
    assert _run(cfg, tmp_path / "r") == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["dataset"]["n"] == 12 and summary["accuracy"]["*"]["n"] == 12
    assert summary["dataset"]["skip_counts"] == {"non-finite model output": 3}
    assert {Path(s["path"]).name for s in summary["dataset"]["skipped"]} == {"white0.png", "white1.png", "white2.png"}
    table = pd.read_parquet(tmp_path / "r" / "samples.parquet")
    assert not table["path"].str.contains("white").any()


def test_too_many_non_finite_outputs_stop_the_run_and_it_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _dataset(tmp_path / "data", bright=3)
    cfg = _config(root, tmp_path, model={"factory_kwargs": {"output": "nan_bright"}})  # default share 0.05
    assert _run(cfg, tmp_path / "r") == 3
    err = capsys.readouterr().err
    assert "NaN or inf logits for 3 of 15 samples" in err and "max_nonfinite_share" in err
    kept = sorted(p.name for p in (tmp_path / "r" / "parts").glob("part-*.parquet"))
    assert kept  # the batches before the stop are committed
    higher = _config(root, tmp_path, model={"factory_kwargs": {"output": "nan_bright"}}, max_nonfinite_share=0.5)
    assert _run(higher, tmp_path / "r") == 0  # no --force: the same run resumes with a higher limit


def test_nan_box_coordinates_are_refused_naming_the_row(data: Path, tmp_path: Path, capsys: Any) -> None:
    manifest = pd.read_csv(data / "audit.csv")
    manifest["x0"], manifest["y0"], manifest["x1"], manifest["y1"] = "", "", "", ""
    manifest.loc[2, ["x0", "y0", "x1", "y1"]] = ["nan", "1", "5", "5"]
    manifest.to_csv(data / "audit.csv", index=False)
    assert _run(_config(data, tmp_path), tmp_path / "r") == 3
    assert "audit.csv line 4: column 'x0' must be a finite number, got 'nan'" in capsys.readouterr().err


def test_multi_valued_and_full_masks_are_counted_warnings(data: Path, tmp_path: Path) -> None:
    rgb = np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8)  # a photo saved as a "mask"
    Image.fromarray(rgb).save(data / "masks" / "a0.png")
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(data / "masks" / "a1.png")
    assert _run(_config(data, tmp_path), tmp_path / "r") == 0
    counts = json.loads((tmp_path / "r" / "summary.json").read_text())["dataset"]["warning_counts"]
    assert counts == {"full-image mask": 2, "multi-valued mask": 1}  # the photo is both


def test_flag_messages_never_print_nan_percent() -> None:
    from auditor.shortcuts.background import background_flags
    from auditor.shortcuts.catalog import Thresholds
    from auditor.shortcuts.registry import FlagContext

    r = {
        "n": 10,
        "median_ratio": 0.3,
        "ci_low": 0.2,
        "ci_high": 0.4,
        "p_value": 1e-4,
        "outside": float("nan"),  # energy_outside_mask was not configured
        "chance_outside": 0.7,
        "worst_ids": ["x"],
    }
    flags = background_flags({"background": {"grad_cam": {"tank": r}}}, FlagContext(Thresholds()))
    assert "nan" not in flags[0]["message"] and "an unknown share" in flags[0]["message"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"batch_size": True}, "batch_size: Input should be a valid integer"),
        ({"workers": 1.5}, "workers"),
        ({"expensive": {"per_class": "3"}}, "expensive.per_class"),
        ({"data": {"image_size": False}}, "data.image_size"),
    ],
)
def test_booleans_and_strings_are_not_taken_as_numbers(
    data: Path, tmp_path: Path, capsys: Any, override: dict[str, Any], message: str
) -> None:
    assert _run(_config(data, tmp_path, **override), tmp_path / "r") == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ exit codes, no traceback


def test_unknown_layer_is_a_config_error_before_any_output(data: Path, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "r"
    assert _run(_config(data, tmp_path, model={"target_layer": "featurs"}), out) == 2
    assert "unknown layer 'featurs'; did you mean 'features'" in capsys.readouterr().err
    assert not out.exists()  # nothing half-made: the corrected rerun needs no --force
    opts = {"layer_cam": {"layers": ["features.0", "featres.1"]}}
    assert _run(_config(data, tmp_path, methods=["layer_cam"], method_options=opts), out) == 2
    assert "featres.1" in capsys.readouterr().err and not out.exists()
    assert _run(_config(data, tmp_path, model={"target_layer": "features"}), out) == 0


@pytest.mark.parametrize("output", ["tuple", "dict"])
def test_models_returning_a_tuple_or_a_dict_are_audited_on_their_logits(
    data: Path, tmp_path: Path, output: str
) -> None:
    cfg = _config(data, tmp_path, model={"factory_kwargs": {"output": output}}, methods=["grad_cam", "occlusion"])
    assert _run(cfg, tmp_path / "r") == 0
    table = pd.read_parquet(tmp_path / "r" / "samples.parquet")
    assert len(table[table["method"] == "grad_cam"]) == 12 and table["prob"].between(0, 1).all()


def test_a_model_without_logits_or_spatial_layer_is_a_model_error(data: Path, tmp_path: Path, capsys: Any) -> None:
    assert _run(_config(data, tmp_path, model={"factory_kwargs": {"output": "no_logits"}}), tmp_path / "r") == 3
    assert "no [batch, classes] logits" in capsys.readouterr().err
    mlp = {"factory": f"{data / 'models.py'}:mlp"}
    assert _run(_config(data, tmp_path, model=mlp), tmp_path / "r2") == 3
    assert "no spatial layer CAM methods can read" in capsys.readouterr().err
    occlusion = {"occlusion": {"window": 8, "stride": 8}}
    assert (
        _run(_config(data, tmp_path, model=mlp, methods=["occlusion"], method_options=occlusion), tmp_path / "r3") == 0
    )


@pytest.mark.parametrize(("flag", "value", "message"), [("--device", "foo", "device"), ("--workers", "-1", "workers")])
def test_bad_command_line_overrides_are_config_errors(
    data: Path, tmp_path: Path, capsys: Any, flag: str, value: str, message: str
) -> None:
    assert _run(_config(data, tmp_path), tmp_path / "r", flag, value) == 2
    err = capsys.readouterr().err
    assert f"command line: {message}" in err and "Traceback" not in err


def test_report_and_gate_on_a_damaged_run_name_the_file(data: Path, tmp_path: Path, capsys: Any) -> None:
    run = tmp_path / "r"
    assert _run(_config(data, tmp_path), run) == 0
    (run / "summary.json").write_text((run / "summary.json").read_text()[:100])  # truncated
    assert main(["gate", str(run)]) == 2 and main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert "summary.json cannot be read" in err and "Traceback" not in err
    assert _run(_config(data, tmp_path), tmp_path / "r2") == 0
    (tmp_path / "r2" / "samples.parquet").unlink()
    assert main(["report", str(tmp_path / "r2")]) == 2
    assert "samples.parquet is missing" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ limits and hangs


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` with no pixel data (a decompression bomb's first bytes)."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_huge_images_are_skipped_from_their_header(data: Path, tmp_path: Path) -> None:
    (data / "images" / "a0.png").write_bytes(_png_header(14_000, 14_000))  # 196 megapixels
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(data / "images" / "a1.png")
    (data / "masks" / "a1.png").unlink()
    manifest = pd.read_csv(data / "audit.csv")
    manifest.loc[manifest["path"] == "images/a1.png", "mask"] = ""
    manifest.to_csv(data / "audit.csv", index=False)
    cfg = _config(data, tmp_path, data={"max_image_pixels": 1000})
    assert _run(cfg, tmp_path / "r") == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    reasons = {Path(s["path"]).name: s["reason"] for s in summary["dataset"]["skipped"]}
    assert "196.0 megapixels" in reasons["a0.png"] and "max_image_pixels" in reasons["a0.png"]
    assert "40x40" in reasons["a1.png"]  # over the configured 1000 pixels
    # on resume nothing crashes either: the finished run needs --force, which recomputes the same skips
    assert _run(cfg, tmp_path / "r", "--force") == 0


def test_large_images_are_decoded_at_a_reduced_scale() -> None:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.zeros((2000, 3000, 3), np.uint8)).save(buf, format="JPEG")
    pixels, size = decode_for(buf.getvalue(), 10**8, 64)
    assert size == (2000, 3000) and max(pixels.shape[:2]) <= 600  # not 2000 x 3000 floats
    with pytest.raises(ImageError, match=r"6\.0 megapixels"):
        decode_for(buf.getvalue(), 10**6, 64)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifos_and_devices_are_skipped_not_read(data: Path, tmp_path: Path) -> None:
    os.mkfifo(data / "images" / "a0.png.fifo")
    manifest = pd.read_csv(data / "audit.csv")
    manifest.loc[0, "path"] = "images/a0.png.fifo"
    manifest.loc[1, "path"] = "/dev/zero"
    manifest.to_csv(data / "audit.csv", index=False)
    cfg = _config(data, tmp_path, data={"allow_outside_root": True})
    run = [sys.executable, "-m", "auditor", "run", str(cfg), "--out", str(tmp_path / "r"), "--no-progress"]
    done = subprocess.run(run, capture_output=True, text=True, timeout=300, check=False)  # a hang fails here
    assert done.returncode == 0, done.stderr
    skipped = json.loads((tmp_path / "r" / "summary.json").read_text())["dataset"]["skip_counts"]
    assert skipped == {"not a regular file": 2}


# ------------------------------------------------------------------------------------------ leaks


@pytest.mark.parametrize("path", ["../outside.png", "ABSOLUTE"])
def test_paths_outside_the_data_root_are_refused(data: Path, tmp_path: Path, capsys: Any, path: str) -> None:
    shutil.copy(data / "images" / "a0.png", tmp_path / "outside.png")
    manifest = pd.read_csv(data / "audit.csv")
    manifest.loc[3, "path"] = str(tmp_path / "outside.png") if path == "ABSOLUTE" else path
    manifest.to_csv(data / "audit.csv", index=False)
    assert _run(_config(data, tmp_path), tmp_path / "r") == 3
    err = capsys.readouterr().err
    assert "audit.csv line 5: image" in err and "outside" in err and "allow_outside_root" in err
    assert _run(_config(data, tmp_path, data={"allow_outside_root": True}), tmp_path / "r") == 0


def test_symlinked_masks_outside_the_root_are_refused(data: Path, tmp_path: Path, capsys: Any) -> None:
    secret = tmp_path / "secret.png"
    shutil.copy(data / "masks" / "a0.png", secret)
    (data / "masks" / "a0.png").unlink()
    (data / "masks" / "a0.png").symlink_to(secret)
    assert _run(_config(data, tmp_path), tmp_path / "r") == 3
    assert "line 2: mask" in capsys.readouterr().err


def test_github_summary_junit_and_terminal_escape_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from xml.etree import ElementTree as ET

    from auditor.outputs.gate import Check, github_outputs, write_junit

    hostile = "<script>alert(1)</script> | x"
    checks = [Check(hostile, f"grad_cam/label/{hostile}", "FAIL", 0.1, ">= 0.5", "line1\n::error::forged")]
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    notes = github_outputs(checks, tmp_path)
    text = summary.read_text()
    assert "<script>" not in text and "&lt;script&gt;" in text and "\\|" in text
    row = next(line for line in text.splitlines() if line.startswith("| FAIL"))
    assert row.count(" | ") == 4  # the pipe in the data did not add a column
    assert len(notes) == 1 and "\n" not in notes[0] and "%0A::error::forged" in notes[0]
    write_junit(checks, tmp_path / "j.xml")
    case = ET.parse(tmp_path / "j.xml").getroot().find("testsuite/testcase")
    assert case is not None and case.get("classname") == hostile
    assert printable("red \x1b[31m label\x07") == "red ?[31m label?"


# ------------------------------------------------------------------------------------------ races and noise


def test_a_second_run_on_the_same_out_is_refused_and_a_stale_lock_taken_over(
    data: Path, tmp_path: Path, capsys: Any
) -> None:
    import socket

    out = tmp_path / "r"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))  # alive: us
    assert _run(_config(data, tmp_path), out) == 2
    assert f"in use by another auditor run (PID {os.getpid()}" in capsys.readouterr().err
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    assert _run(_config(data, tmp_path), out) == 0
    assert not (out / ".lock").exists()


def test_a_waiting_lock_is_taken_once_its_holder_lets_go(tmp_path: Path, monkeypatch: Any) -> None:
    import socket
    import threading

    from auditor.store import rundir

    monkeypatch.setattr(rundir, "LOCK_POLL_S", 0.05)
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))  # held by a live process
    taken = threading.Event()

    def wait_for_it() -> None:
        with rundir.RunDir(tmp_path).lock(wait=True):
            taken.set()

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    assert not taken.wait(0.4)  # still held: it waits, it does not fail
    lock.unlink()  # the holder lets go
    waiter.join(timeout=10)
    assert taken.is_set() and not lock.exists()


def test_skip_reasons_are_stable_across_runs(data: Path, tmp_path: Path) -> None:
    (data / "images" / "a0.png").write_bytes(b"garbage")
    (data / "images" / "a1.png").write_bytes((data / "images" / "a2.png").read_bytes()[:60])
    reasons = []
    for out in ("r1", "r2"):
        assert _run(_config(data, tmp_path), tmp_path / out) == 0
        summary = json.loads((tmp_path / out / "summary.json").read_text())
        reasons.append([s["reason"] for s in summary["dataset"]["skipped"]])
    assert reasons[0] == reasons[1] and len(reasons[0]) == 2
    assert not any("0x" in r for r in reasons[0])


# ------------------------------------------------------------------------------------------ small rough edges


def test_numeric_class_names(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data")
    manifest = pd.read_csv(root / "audit.csv")
    manifest["label"] = manifest["label"].map({"a": "0", "b": "1"})
    manifest.to_csv(root / "audit.csv", index=False)
    assert _run(_config(root, tmp_path, data={"classes": [0, 1]}), tmp_path / "r") == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["dataset"]["classes"] == ["0", "1"]


def test_gate_baseline_with_other_classes_is_refused(data: Path, tmp_path: Path, capsys: Any) -> None:
    assert _run(_config(data, tmp_path), tmp_path / "a") == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    summary["dataset"]["classes"] = ["b", "a"]
    (tmp_path / "b" / "summary.json").write_text(json.dumps(summary))
    assert main(["gate", str(tmp_path / "a"), "--baseline", str(tmp_path / "b")]) == 2
    assert "other classes" in capsys.readouterr().err


def test_gate_rules_with_a_misspelled_kind_are_config_errors(data: Path, tmp_path: Path, capsys: Any) -> None:
    assert _run(_config(data, tmp_path), tmp_path / "r") == 0
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump([{"flags": {"kind": "backgroud_reliance"}, "max": 0}]))
    assert main(["gate", str(tmp_path / "r"), "--rules", str(rules)]) == 2
    assert "did you mean 'background_reliance'" in capsys.readouterr().err


def test_a_key_given_twice_is_a_config_error_naming_it(data: Path, tmp_path: Path, capsys: Any) -> None:
    # plain YAML keeps the last 'methods:' and the first is lost without a word
    cfg = _config(data, tmp_path)
    cfg.write_text(cfg.read_text() + "methods: [hires_cam]\n")
    assert _run(cfg, tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert "key 'methods' is given twice" in err and str(cfg) in err
    assert not (tmp_path / "r").exists()  # refused before anything was written
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - {flags: {kind: '*', severity: high}, max: 0, max: 1}\n")
    assert main(["gate", str(tmp_path), "--rules", str(rules)]) == 2
    assert "key 'max' is given twice (lines 2 and 2)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("thresholds", "says"),
    [
        ({"attribute_high": 0.1}, "attribute_gap <= attribute_medium <= attribute_high must hold"),
        ({"counterfactual_medium": 0.6}, "counterfactual_gap <= counterfactual_medium <= counterfactual_high"),
        ({"background_medium": 0.4}, "background_high <= background_medium <= background_ratio"),
        ({"property_high": 0.2}, "property_effect <= property_high"),
        ({"cue_images": 3}, "cue_images must be 0 (the scan off) or at least 4; got 3"),
        ({"attribute_high": 1.5}, "thresholds.attribute_high"),
    ],
)
def test_thresholds_out_of_range_or_order_are_config_errors(
    data: Path, tmp_path: Path, capsys: Any, thresholds: dict[str, Any], says: str
) -> None:
    assert _run(_config(data, tmp_path, thresholds=thresholds), tmp_path / "r") == 2
    assert says in capsys.readouterr().err


def test_thresholds_at_their_limits_are_accepted() -> None:
    from auditor.shortcuts.catalog import Thresholds

    Thresholds(cue_images=0)  # off
    Thresholds(cue_images=4, attribute_gap=0.3, attribute_medium=0.3, attribute_high=0.3)  # equal levels


def test_a_misspelled_top_level_key_of_a_rules_file_is_named(data: Path, tmp_path: Path, capsys: Any) -> None:
    assert _run(_config(data, tmp_path), tmp_path / "r") == 0
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"rulez": [{"flags": {"kind": "*", "severity": "high"}, "max": 0}]}))
    assert main(["gate", str(tmp_path / "r"), "--rules", str(rules)]) == 2
    assert "unknown key 'rulez'; did you mean 'rules'?" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ exit-code contract


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ConfigError("bad key"), 2),
        (DataError("bad file"), 3),
        (ModelError("bad checkpoint"), 3),
        (MethodNotApplicableError("no GAP head"), 3),
        (AuditorError("other"), 3),
        (RuntimeError("an unexpected bug"), 3),
        (KeyboardInterrupt(), 130),
    ],
)
def test_exit_codes_contract(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: BaseException, code: int
) -> None:
    """Every error class maps to its documented exit code: 1 is only ever a failed gate."""
    import auditor.cli as cli

    def boom(args: Any) -> int:
        raise error

    monkeypatch.setattr(cli, "cmd_methods", boom)
    assert main(["methods"]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith(("error:", "interrupted"))


def test_debug_shows_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    import auditor.cli as cli

    monkeypatch.setattr(cli, "cmd_methods", lambda args: (_ for _ in ()).throw(RuntimeError("bug")))
    with pytest.raises(RuntimeError, match="bug"):
        main(["--debug", "methods"])


def test_readme_lists_every_limit_key() -> None:
    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("## Bad data", 1)[1].split("\n## ", 1)[0]
    for key in ("max_image_pixels", "allow_outside_root", "max_nonfinite_share", "regular file", ".lock"):
        assert key in section, key
