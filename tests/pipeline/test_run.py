"""`auditor run` end to end on real files: outputs, resume, selection flags."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from auditor.cli import main
from auditor.config import AuditConfig, load_config
from auditor.run import flagged, local, setup
from auditor.run.local import Selection, run_audit
from tests.pipeline.conftest import kill_after_parts, make_config


def _run(cfg_path: Path, out: Path, *extra: str) -> int:
    return main(["run", str(cfg_path), "--out", str(out), "--no-progress", *extra])


def test_run_writes_every_output(dataset_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _run(make_config(dataset_dir, tmp_path), out) == 0
    table = pd.read_parquet(out / "samples.parquet")
    assert len(table) == 24 * 2 + 6  # 24 images x (grad_cam, hires_cam) + occlusion on the 6-image subset
    assert set(table["method"]) == {"grad_cam", "hires_cam", "occlusion"}
    assert (table["method"] == "occlusion").sum() == 6 and table[table["method"] == "occlusion"]["expensive"].all()
    for col in [
        "id",
        "path",
        "label",
        "pred",
        "prob",
        "correct",
        "method",
        "target",
        "energy_in_mask",
        "energy_in_mask_chance",
        "pointing_game",
        "pointing_game_chance",
        "average_drop",
        "map_mean",
        "deletion_auc",
        "deletion_auc_norm",
        "weather",
        "ground",
        "mask_source",
    ]:
        assert col in table.columns, col
    grad = table[table["method"] == "grad_cam"]
    assert grad["energy_in_mask"].notna().all() and grad["deletion_auc"].notna().sum() == 6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["schema_version"] == 1
    assert set(summary["versions"]) >= {"auditor", "torch", "torchvision"}
    assert summary["dataset"]["n"] == 24 and summary["dataset"]["per_class"] == {"disc": 12, "square": 12}
    assert len(summary["dataset"]["id"]) == 64
    stats = summary["aggregates"]["grad_cam"]["label"]["*"]["energy_in_mask"]
    assert set(stats) == {"mean", "median", "ci_low", "ci_high", "n"} and stats["n"] == 24
    assert stats["ci_low"] <= stats["mean"] <= stats["ci_high"]
    assert "max_box_acc" in summary["aggregates"]["grad_cam"]["label"]["disc"]
    assert summary["accuracy"]["*"]["n"] == 24
    assert set(summary["groups"]["weather"]) == {"sunny", "cloudy"}
    maps = np.load(out / "maps" / "grad_cam__label.npy")
    assert maps.shape == (24, 16, 16) and maps.dtype == np.float16 and np.isfinite(maps).all()
    occ = np.load(out / "maps" / "occlusion__label.npy")
    assert np.isnan(occ).all(axis=(1, 2)).sum() == 18  # only the expensive subset has occlusion maps
    curves = np.load(out / "curves" / "deletion_curve__grad_cam__label.npy")
    assert curves.shape == (24, 11)
    resolved = (out / "config.resolved.yaml").read_text()
    assert "grad_cam" in resolved and "window: 8" in resolved


def test_the_population_is_every_sample_whatever_the_first_method(dataset_dir: Path, tmp_path: Path) -> None:
    # occlusion (expensive: 3 images a class) listed first once made its 6-image subset the audited population
    ids = {}
    for name, methods in (("mixed", ["occlusion", "grad_cam"]), ("cheap", ["grad_cam"])):
        (tmp_path / name).mkdir()
        assert _run(make_config(dataset_dir, tmp_path / name, methods=methods), tmp_path / name / "run") == 0
        summary = json.loads((tmp_path / name / "run" / "summary.json").read_text())
        assert summary["dataset"]["n"] == 24 and summary["accuracy"]["*"]["n"] == 24, name
        assert summary["dataset"]["per_class"] == {"disc": 12, "square": 12}
        ids[name] = summary["dataset"]["id"]
    assert ids["mixed"] == ids["cheap"]  # the baseline key names the same data


def test_finished_run_is_not_overwritten_without_force(dataset_dir: Path, tmp_path: Path) -> None:
    cfg = make_config(dataset_dir, tmp_path, methods=["grad_cam"], metrics=["energy_in_mask"])
    out = tmp_path / "run"
    assert _run(cfg, out) == 0
    assert not list(out.glob(".analysis-*"))  # the analyses' grid files went when they were done
    assert _run(cfg, out) == 2
    (out / ".analysis-killed").mkdir()  # a killed process's grid files
    (out / ".analysis-killed" / "grad_cam.npy").write_bytes(b"")
    assert _run(cfg, out, "--force") == 0
    assert not (out / ".analysis-killed").exists()


def _same_outputs(a: Path, b: Path) -> None:
    pd.testing.assert_frame_equal(pd.read_parquet(a / "samples.parquet"), pd.read_parquet(b / "samples.parquet"))
    for sub in ("maps", "curves"):
        for f in sorted((a / sub).glob("*.npy")):
            np.testing.assert_array_equal(np.load(f), np.load(b / sub / f.name))
    sa, sb = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    assert sa["aggregates"] == sb["aggregates"] and sa["dataset"] == sb["dataset"]


def _interrupt_then_resume(
    cfg: AuditConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at_call: int, parts: tuple[str, int]
) -> None:
    """Run clean; run again with a KeyboardInterrupt in batch call ``at_call``; resume; compare outputs."""
    run_audit(cfg, tmp_path / "clean", progress=False)
    real = local.map_batch
    calls = {"n": 0}

    def interrupted(ctx, batch):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return real(ctx, batch)

    monkeypatch.setattr(local, "map_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_audit(cfg, tmp_path / "resumed", progress=False)
    kind, count = parts
    assert len(list((tmp_path / "resumed" / "parts").glob(f"{kind}-*.parquet"))) == count
    monkeypatch.setattr(local, "map_batch", real)
    run_audit(cfg, tmp_path / "resumed", progress=False)
    _same_outputs(tmp_path / "clean", tmp_path / "resumed")


def test_resume_after_interruption_gives_identical_results(
    dataset_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(make_config(dataset_dir, tmp_path))
    # Ctrl-C in the middle of the third batch
    _interrupt_then_resume(cfg, tmp_path, monkeypatch, at_call=3, parts=("part", 2))


@pytest.mark.slow
def test_resume_after_kill_9(dataset_dir: Path, tmp_path: Path) -> None:
    cfg = make_config(dataset_dir, tmp_path, batch_size=2)
    args = [sys.executable, "-m", "auditor", "run", str(cfg), "--no-progress"]
    subprocess.run([*args, "--out", str(tmp_path / "clean")], check=True, capture_output=True)
    kill_after_parts([*args, "--out", str(tmp_path / "killed")], tmp_path / "killed" / "parts", 3)
    subprocess.run([*args, "--out", str(tmp_path / "killed")], check=True, capture_output=True)
    _same_outputs(tmp_path / "clean", tmp_path / "killed")


def test_changed_config_does_not_resume(dataset_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    (out).mkdir()
    (out / "run.json").write_text(json.dumps({"identity": "something else"}))
    assert _run(make_config(dataset_dir, tmp_path, methods=["grad_cam"]), out) == 2


def test_selection_flags(dataset_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(make_config(dataset_dir, tmp_path, methods=["grad_cam"], metrics=["energy_in_mask"]))
    s = run_audit(cfg, tmp_path / "a", selection=Selection(per_class=4), progress=False)
    assert s["dataset"]["per_class"] == {"disc": 4, "square": 4}
    s = run_audit(cfg, tmp_path / "b", selection=Selection(limit=5), progress=False)
    assert s["dataset"]["n"] == 5
    s = run_audit(cfg, tmp_path / "c", selection=Selection(only_classes=["square"]), progress=False)
    assert s["dataset"]["per_class"] == {"disc": 0, "square": 12}


def test_target_both_adds_prediction_maps_only_for_errors(dataset_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(
        make_config(dataset_dir, tmp_path, methods=["grad_cam"], metrics=["energy_in_mask"], target="both")
    )
    run_audit(cfg, tmp_path / "r", progress=False)
    table = pd.read_parquet(tmp_path / "r" / "samples.parquet")
    wrong = table[(table["target"] == "label") & ~table["correct"]]
    pred = table[table["target"] == "prediction"]
    assert set(pred["id"]) == set(wrong["id"])
    assert (pred["target_class"] == pred["pred"]).all()


def test_sanity_checks_in_summary(dataset_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(
        make_config(
            dataset_dir,
            tmp_path,
            methods=["grad_cam", "layer_cam", "hires_cam"],
            metrics=["energy_in_mask"],
            sanity={"methods": ["grad_cam"], "n_images": 6, "n_blocks": 2},
        )
    )
    s = run_audit(cfg, tmp_path / "r", progress=False)
    mprt = s["sanity"]["mprt"]
    assert mprt["n_images"] == 6 and mprt["randomized_blocks"][0] == "fc"
    assert len(mprt["methods"]["grad_cam"]["spearman"]) == 3
    assert "grad_cam|layer_cam" in s["sanity"]["agreement"]["*"]


def test_every_method_and_metric_runs_inside_a_run(dataset_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(
        make_config(
            dataset_dir,
            tmp_path,
            methods="all",
            metrics="all",
            expensive={"subset": "stratified", "per_class": 1, "faithfulness": "all"},
            method_options={
                "rise": {"num_masks": 32},
                "ss_cam": {"num_samples": 2},
                "is_cam": {"num_samples": 2},
                "occlusion": {"window": 16, "stride": 16},
                "smooth_grad_cam_pp": {"num_samples": 2},
            },
        )
    )
    s = run_audit(cfg, tmp_path / "r", selection=Selection(per_class=2), progress=False)
    from auditor import CAMS, METRICS

    skipped = s["run"]["skipped_methods"]
    assert set(skipped) == {"legrad"} and "MultiheadAttention" in skipped["legrad"]  # a CNN: said, not crashed
    assert set(s["aggregates"]) == set(CAMS.names()) - set(skipped)
    for method, per_target in s["aggregates"].items():
        stats = per_target["label"]["*"]
        for metric in METRICS.names():
            assert metric in stats, (method, metric)
        # n counts defined values: an all-zero map (e.g. occlusion with 16 px windows) is NaN, not a score
        assert 1 <= stats["road_combined"]["n"] <= 2 and stats["energy_in_mask"]["n"] >= 1, method
    assert s["aggregates"]["grad_cam"]["label"]["*"]["road_combined"]["n"] == 2


def test_prediction_only_target_runs_the_analyses_on_prediction_maps(dataset_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(
        make_config(dataset_dir, tmp_path, methods=["grad_cam"], metrics=["energy_in_mask"], target="prediction")
    )
    s = run_audit(cfg, tmp_path / "r", progress=False)
    assert s["analyses"]["target"] == "prediction" and s["analyses"]["methods"] == ["grad_cam"]
    assert "disc" in s["analyses"]["background"]["grad_cam"]
    assert json.loads((tmp_path / "r" / "flags.json").read_text())["schema_version"] == 1


def test_select_flagged_takes_cited_samples_then_the_class_subset() -> None:
    table = pd.DataFrame(
        {
            "row": [0, 1, 2, 3, 4, 5, 0],
            "id": ["a", "b", "c", "d", "e", "f", "a"],
            "label": ["x", "x", "x", "y", "y", "y", "x"],
            "method": ["m"] * 6 + ["n"],
        }
    )
    stratified = np.array([True, False, True, True, False, False])
    flags = [
        {"id": "k/x/*", "kind": "background_reliance", "class": "x", "evidence": {"worst_ids": ["b", "zz"], "n": 3}},
        {"id": "u/*/*", "kind": "cluster", "class": None, "evidence": {"prototype_ids": ["e", "f", "d"]}},
        # ids under a key that is not the kind's declared evidence key are not followed
        {"id": "v/*/*", "kind": "cluster", "class": None, "evidence": {"worst_ids": ["c"]}},
    ]
    chosen = flagged.select_flagged(flags, table, stratified, per_flag=2)  # type: ignore[arg-type]
    # flag 1: the cited "b" first, then the class's stratified samples (a, c) up to 2; flag 2: no class fill
    assert chosen == {0: ["k/x/*"], 1: ["k/x/*"], 4: ["u/*/*"], 5: ["u/*/*"]}
    assert flagged.select_flagged([], table, stratified, per_flag=2) == {}
    # a total of 3: the first flag's two, then one of the second's; a row already chosen costs nothing more
    capped = flagged.select_flagged(flags, table, stratified, per_flag=2, total=3)  # type: ignore[arg-type]
    assert capped == {0: ["k/x/*"], 1: ["k/x/*"], 4: ["u/*/*"]}
    again = [*flags, {"id": "w/x/*", "kind": "background_reliance", "class": "x", "evidence": {"worst_ids": ["b"]}}]
    assert flagged.select_flagged(again, table, stratified, per_flag=2, total=3)[1] == ["k/x/*", "w/x/*"]  # type: ignore[arg-type]


def test_flagged_subset_runs_expensive_work_only_behind_flags(dataset_dir: Path, tmp_path: Path) -> None:
    cfg = load_config(make_config(dataset_dir, tmp_path, expensive={"subset": "flagged", "per_class": 3}))
    run_audit(cfg, tmp_path / "flagged", progress=False)
    flags = json.loads((tmp_path / "flagged" / "flags.json").read_text())["flags"]
    assert flags, "the fixture's model is expected to raise flags"
    info = json.loads((tmp_path / "flagged" / "expensive.json").read_text())
    assert info["subset"] == "flagged" and info["methods"] == ["occlusion"]
    assert info["metrics"] == ["average_drop", "increase_in_confidence", "deletion_auc", "insertion_auc"]
    assert info["faithfulness_methods"] == ["grad_cam"]
    chosen = {int(r) for r in info["reasons"]}
    # the cheap pass's flags (no interventions yet) are a superset of the final ones, except the kinds only an
    # analysis with the model can raise (region cues, colour shifts, concepts: they run once, at the end)
    from auditor.shortcuts.catalog import registered

    with_model = {k for a in registered() if "model" in a.needs for k in a.kinds}
    cheap = {fid for ids in info["reasons"].values() for fid in ids}
    assert {f["id"] for f in flags if f["kind"] not in with_model} <= cheap
    assert 0 < len(chosen) <= 3 * len(cheap) and info["n"] == len(chosen)
    assert all(s["flags"] for s in info["samples"])
    table = pd.read_parquet(tmp_path / "flagged" / "samples.parquet")
    assert len(table) == 24 * 2 + len(chosen)
    assert set(table[table["method"] == "occlusion"]["row"]) == chosen
    assert set(table[table["expensive"]]["row"]) == chosen
    for m in ("grad_cam", "hires_cam"):
        sub = table[table["method"] == m]
        faithful = set(sub[sub["deletion_auc"].notna()]["row"])
        assert len(sub) == 24 and faithful == (chosen if m == "grad_cam" else set())  # faithfulness: grad_cam only
        assert sub["energy_in_mask"].notna().all()
    # the cheap pass is the stratified run's: its maps and counterfactual probes are unchanged by the second pass
    run_audit(load_config(make_config(dataset_dir, tmp_path)), tmp_path / "stratified", progress=False)
    strat = pd.read_parquet(tmp_path / "stratified" / "samples.parquet")
    a = table[table["method"] == "grad_cam"].set_index("row").sort_index()
    b = strat[strat["method"] == "grad_cam"].set_index("row").sort_index()
    cf = [c for c in b.columns if c.startswith("cf_")]
    assert cf
    pd.testing.assert_frame_equal(a[cf], b[cf])
    np.testing.assert_allclose(a["energy_in_mask"], b["energy_in_mask"], atol=1e-5)
    html = (tmp_path / "flagged" / "report.html").read_text()
    assert "Which samples got which methods" in html and "behind the cheap pass" in html


def test_flagged_pass_resumes_after_interruption(
    dataset_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(make_config(dataset_dir, tmp_path, expensive={"subset": "flagged", "per_class": 3}, batch_size=3))
    # 24 images / 3 = 8 main batches; stop in the second batch of the flagged pass
    _interrupt_then_resume(cfg, tmp_path, monkeypatch, at_call=8 + 2, parts=("flagged", 1))


@pytest.mark.parametrize("pays", [False, True])
def test_mixed_precision_only_where_it_pays(
    dataset_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, pays: bool
) -> None:
    monkeypatch.setattr(setup, "low_precision_pays", lambda device: pays)
    cfg = make_config(dataset_dir, tmp_path, methods=["grad_cam"], metrics=["average_drop"], mixed_precision=True)
    summary = run_audit(load_config(cfg), tmp_path / "run", progress=False)
    assert summary["config"]["mixed_precision"] is pays
    assert ("running in float32" in caplog.text) is not pays
    table = pd.read_parquet(tmp_path / "run" / "samples.parquet")
    # average_drop is an expensive metric: exactly the expensive subset has it
    assert table["average_drop"].notna().to_numpy().tolist() == table["expensive"].to_numpy().tolist()


def test_auto_memory_format_is_chosen_once_and_kept_on_resume(
    dataset_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def choose(model, example):  # type: ignore[no-untyped-def]
        calls.append("x")
        return "channels_last" if len(calls) == 1 else "contiguous"

    monkeypatch.setattr(setup, "choose_memory_format", choose)
    cfg = load_config(
        make_config(dataset_dir, tmp_path, memory_format="auto", methods=["grad_cam"], metrics=["energy_in_mask"])
    )
    real = local.map_batch

    def interrupted(ctx, batch):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(local, "map_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_audit(cfg, tmp_path / "run", progress=False)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["memory_format"] == "channels_last"
    monkeypatch.setattr(local, "map_batch", real)
    summary = run_audit(cfg, tmp_path / "run", progress=False)
    assert calls == ["x"] and summary["run"]["memory_format"] == "channels_last"
    fixed = load_config(
        make_config(dataset_dir, tmp_path, memory_format="contiguous", methods=["grad_cam"], metrics=["energy_in_mask"])
    )
    assert run_audit(fixed, tmp_path / "fixed", progress=False)["run"]["memory_format"] == "contiguous"
    assert calls == ["x"]  # a fixed format is not timed


def test_overlap_gives_the_same_outputs(dataset_dir: Path, tmp_path: Path) -> None:
    """The host side of a batch on a worker thread: the same rows, maps and curves as inline."""
    for overlap in (False, True):
        cfg = make_config(dataset_dir, tmp_path, overlap=overlap)
        assert _run(cfg, tmp_path / f"o{overlap}") == 0
    _same_outputs(tmp_path / "oFalse", tmp_path / "oTrue")


def test_overlap_runs_the_host_side_while_the_next_batch_is_mapped(
    dataset_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CPU stand-in for a GPU run: the host side of batch k waits until batch k+1's map stage has started,
    which only happens when the two overlap (inline, it would wait in vain and report it)."""
    import threading

    from auditor.run import mapstage

    started: list[threading.Event] = []
    overlapped: list[bool] = []
    real_map, real_finish = local.map_batch, mapstage._finish

    def map_batch(spec, batch):  # type: ignore[no-untyped-def]
        started.append(threading.Event())
        started[-1].set()
        return real_map(spec, batch)

    def finish(spec, out, pending):  # type: ignore[no-untyped-def]
        k = len(overlapped)
        deadline = time.monotonic() + 60  # a guard against a hang, not a timing assertion
        on_worker = threading.current_thread() is not threading.main_thread()
        while on_worker and k < 4 and len(started) <= k + 1 and time.monotonic() < deadline:
            time.sleep(0.01)  # waiting for batch k+1's map stage to begin
        overlapped.append(len(started) > k + 1)
        return real_finish(spec, out, pending)

    monkeypatch.setattr(local, "map_batch", map_batch)
    monkeypatch.setattr(mapstage, "_finish", finish)
    cfg = make_config(dataset_dir, tmp_path, overlap=True, methods=["grad_cam"], metrics=["box_iou"])
    assert _run(cfg, tmp_path / "r") == 0
    assert len(overlapped) == 5 and all(overlapped[:4])  # 24 images in batches of 5; the last has no successor


NOISY = {
    "methods": ["grad_cam", "ss_cam", "smooth_grad_cam_pp", "rise"],
    "metrics": ["energy_in_mask", "road_morf"],
    "method_options": {
        "ss_cam": {"num_samples": 2},
        "smooth_grad_cam_pp": {"num_samples": 3},
        "rise": {"num_masks": 16},
    },
    "metric_options": {"road_morf": {"fractions": [0.2, 0.6]}},
    "expensive": {"per_class": 2, "faithfulness": "all"},
}


@pytest.mark.parametrize("config", ["default", "noisy"])
def test_rows_do_not_depend_on_the_batch_size(dataset_dir: Path, tmp_path: Path, config: str) -> None:
    """Per-sample draws (the counterfactual's background partner, SS-CAM and Smooth Grad-CAM++ noise, ROAD's
    imputation noise) are keyed by sample id, so batches of 4 and of 32 give the same rows (floats to
    rounding: a convolution may sum in another order)."""
    tables = []
    for bs in (4, 32):
        over = {"expensive": {"per_class": 6}} if config == "default" else NOISY
        cfg = make_config(dataset_dir, tmp_path, batch_size=bs, **over)
        assert _run(cfg, tmp_path / f"b{bs}") == 0
        table = pd.read_parquet(tmp_path / f"b{bs}" / "samples.parquet")
        tables.append(table.sort_values(["method", "target", "row"]).reset_index(drop=True))
    a, b = tables
    assert list(a.columns) == list(b.columns) and a["cf_mix_pred"].ne("").sum() > 0
    if config == "noisy":
        assert a["road_morf"].notna().sum() > 0 and (a["method"] == "ss_cam").sum() > 0
    for col in a.columns:
        if a[col].dtype.kind == "f":
            np.testing.assert_allclose(a[col], b[col], rtol=1e-4, atol=1e-6, err_msg=col)
        else:
            assert a[col].tolist() == b[col].tolist(), col


def test_an_audit_of_expensive_methods_only_counts_every_sample(dataset_dir: Path, tmp_path: Path) -> None:
    # a TorchScript model runs only black-box methods, all expensive: the samples outside the expensive subset
    # once got no row, so accuracy, dataset.n and dataset.id counted the 6-image subset of a 24-image set
    out = tmp_path / "run"
    cfg = make_config(dataset_dir, tmp_path, methods=["occlusion"], metrics=["energy_in_mask", "average_drop"])
    assert _run(cfg, out) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"]["n"] == 24 and summary["accuracy"]["*"]["n"] == 24
    assert summary["dataset"]["per_class"] == {"disc": 12, "square": 12}
    assert summary["aggregates"]["occlusion"]["label"]["*"]["average_drop"]["n"] == 6  # maps stay on the subset
    assert list(summary["aggregates"]) == ["occlusion"]
    table = pd.read_parquet(out / "samples.parquet")
    occ, rest = table[table["method"] == "occlusion"], table[table["method"].isna()]
    assert len(occ) == 6 and len(rest) == 18 and rest["target"].isna().all()
    assert set(occ["row"]).isdisjoint(rest["row"]) and not rest["map_valid"].any()
    assert rest["average_drop"].isna().all() and rest["pred"].notna().all() and rest["prob"].between(0, 1).all()
    cheap = tmp_path / "cheap"
    cheap.mkdir()
    assert _run(make_config(dataset_dir, cheap, methods=["grad_cam"]), cheap / "run") == 0
    assert json.loads((cheap / "run" / "summary.json").read_text())["dataset"]["id"] == summary["dataset"]["id"]
    assert "report.html" in {p.name for p in out.iterdir()}


def test_flagged_subset_with_black_box_methods_only_runs(dataset_dir: Path, tmp_path: Path) -> None:
    # with only expensive methods, `subset: flagged` left the main pass without a row: "every sample was skipped"
    cfg = make_config(dataset_dir, tmp_path, methods=["occlusion"], expensive={"subset": "flagged", "per_class": 3})
    s = run_audit(load_config(cfg), tmp_path / "run", progress=False)
    assert s["dataset"]["n"] == 24 and s["accuracy"]["*"]["n"] == 24
    table = pd.read_parquet(tmp_path / "run" / "samples.parquet")
    assert table["row"].nunique() == 24 and table.groupby("row").size().max() == 1
    assert (tmp_path / "run" / "report.html").stat().st_size > 0
