"""CI gating: every rule type on hand-made summaries, exit codes, JUnit parsed back, GitHub outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import pytest
import yaml

from auditor.cli import main
from auditor.errors import ConfigError
from auditor.outputs.gate import PASSES_SHOWN, evaluate, github_outputs, passed, table, write_junit
from auditor.outputs.rules import Rule, load_rules


def _stat(mean: float | None, n: int = 10) -> dict[str, Any]:
    return {
        "mean": mean,
        "median": mean,
        "ci_low": None if mean is None else mean - 0.05,
        "ci_high": None if mean is None else mean + 0.05,
        "n": n,
    }


def _summary(eim: dict[str, float | None], dataset_id: str = "abc") -> dict[str, Any]:
    per_class = {c: {"energy_in_mask": _stat(v)} for c, v in eim.items()}
    return {
        "dataset": {"id": dataset_id, "classes": [c for c in eim if c != "*"], "n": 20},
        "accuracy": {"*": {"accuracy": 0.9}},
        "aggregates": {"grad_cam": {"label": per_class}, "hires_cam": {"label": per_class}},
        "groups": {"weather": {"sunny": {"n": 10, "accuracy": 0.95}, "cloudy": {"n": 10, "accuracy": 0.4}}},
    }


FLAG_HIGH = {
    "id": "background_reliance/tank/*",
    "kind": "background_reliance",
    "class": "tank",
    "severity": "high",
    "message": "the tank looks at the sky",
}
FLAG_LOW = {"id": "cluster/bus/cluster 1", "kind": "cluster", "class": "bus", "severity": "low", "message": "m"}


def _rules(*items: dict[str, Any]) -> list[Rule]:
    return [Rule.model_validate(i) for i in items]


def test_absolute_metric_rule_per_class_and_method() -> None:
    s = _summary({"*": 0.6, "tank": 0.3, "bus": 0.8})
    checks = evaluate(_rules({"metric": "energy_in_mask", "class": "each", "op": ">=", "value": 0.5}), s, [])
    got = {(c.scope, c.status) for c in checks}
    assert got == {
        ("grad_cam/label/tank", "FAIL"),
        ("grad_cam/label/bus", "PASS"),
        ("hires_cam/label/tank", "FAIL"),
        ("hires_cam/label/bus", "PASS"),
    }
    assert checks[0].status == "FAIL"  # failures first
    lower = evaluate(
        _rules({"metric": "energy_in_mask", "method": "grad_cam", "stat": "ci_low", "op": ">=", "value": 0.56}), s, []
    )
    assert [(c.scope, c.status, c.observed) for c in lower] == [("grad_cam/label/*", "FAIL", pytest.approx(0.55))]
    warn = evaluate(
        _rules({"metric": "energy_in_mask", "class": "tank", "op": ">=", "value": 0.5, "on_fail": "warn"}), s, []
    )
    assert {c.status for c in warn} == {"WARN"} and passed(warn)


def test_a_rule_on_each_of_1000_classes_prints_what_failed_and_counts_the_rest(tmp_path: Path) -> None:
    """1,000 classes x 2 methods: every check is evaluated and written, the printed table lists the failures and
    the first passes, and says how many more passed."""
    s = _summary({"*": 0.6} | {f"c{i:04d}": 0.3 if i % 100 == 0 else 0.8 for i in range(1000)})
    checks = evaluate(_rules({"metric": "energy_in_mask", "class": "each", "op": ">=", "value": 0.5}), s, [])
    assert len(checks) == 2000 and sum(c.status == "FAIL" for c in checks) == 20
    text = table(checks)
    lines = text.splitlines()
    assert sum(line.startswith("FAIL") for line in lines) == 20
    assert sum(line.startswith("PASS") for line in lines) == PASSES_SHOWN
    assert f"... and {1980 - PASSES_SHOWN} more passed checks (gate.json lists every check)" in text
    assert lines[-1] == "20 fail, 1980 pass"
    write_junit(checks, tmp_path / "junit.xml")
    assert sum(1 for _ in ET.parse(tmp_path / "junit.xml").getroot().iter("testcase")) == 2000


def test_missing_metric_is_an_error_that_fails() -> None:
    s = _summary({"*": 0.6, "tank": None})
    checks = evaluate(
        _rules({"metric": "energy_in_mask", "method": "grad_cam", "class": "tank", "op": ">=", "value": 0.5}), s, []
    )
    assert [c.status for c in checks] == ["ERROR"] and not passed(checks)
    # a metric the run does not have is a config error (never a PASS), unless the rule is optional
    with pytest.raises(ConfigError, match="metric 'pointing_game' is not in this run"):
        evaluate(_rules({"metric": "pointing_game", "method": "grad_cam", "op": ">=", "value": 0.5}), s, [])
    optional = {"metric": "pointing_game", "method": "grad_cam", "op": ">=", "value": 0.5, "optional": True}
    checks = evaluate(_rules(optional), s, [])
    assert [c.status for c in checks] == ["SKIPPED"] and passed(checks)


def test_group_rule() -> None:
    checks = evaluate(
        _rules({"attribute": "weather", "stat": "accuracy", "op": ">=", "value": 0.8}), _summary({"*": 1}), []
    )
    assert {(c.scope, c.status) for c in checks} == {("weather=sunny", "PASS"), ("weather=cloudy", "FAIL")}
    with pytest.raises(ConfigError, match="attribute 'hospital' is not in this run"):
        evaluate(_rules({"attribute": "hospital", "op": ">=", "value": 0.8}), _summary({"*": 1}), [])
    optional = evaluate(
        _rules({"attribute": "hospital", "op": ">=", "value": 0.8, "optional": True}), _summary({"*": 1}), []
    )
    assert optional[0].status == "SKIPPED"


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (
            {"flags": {"kind": "backgroud_reliance"}, "max": 0},
            "flags.kind 'backgroud_reliance' .*did you mean 'background_reliance'",
        ),
        ({"flags": {"kind": "*", "class": "tnak"}, "max": 0}, "flags.class 'tnak' .*did you mean 'tank'"),
        ({"new_flags": {"kind": "clustr"}, "max": 0}, "flags.kind 'clustr'"),
        (
            {"metric": "energy_in_msk", "op": ">=", "value": 0.5},
            "metric 'energy_in_msk' .*did you mean 'energy_in_mask'",
        ),
        ({"metric": "energy_in_mask", "method": "gradcam", "op": ">=", "value": 0.5}, "method 'gradcam' .*'grad_cam'"),
        ({"metric": "energy_in_mask", "class": "buss", "op": ">=", "value": 0.5}, "class 'buss' .*did you mean 'bus'"),
        ({"metric": "energy_in_mask", "stat": "avg", "op": ">=", "value": 0.5}, "stat 'avg'"),
        ({"metric": "energy_in_mask", "target": "labels", "op": ">=", "value": 0.5}, "target 'labels'"),
        ({"attribute": "weathr", "op": ">=", "value": 0.5}, "attribute 'weathr' .*did you mean 'weather'"),
    ],
)
def test_rules_naming_what_the_run_lacks_are_config_errors(rule: dict[str, Any], message: str) -> None:
    """A misspelled kind, class, method, metric, stat or attribute must never PASS (it used to)."""
    s = _summary({"*": 0.6, "tank": 0.3, "bus": 0.8})
    with pytest.raises(ConfigError, match=message):
        evaluate(_rules(rule), s, [FLAG_HIGH])


def test_flag_rules_count_by_kind_and_severity() -> None:
    s = _summary({"*": 0.6, "tank": 0.3, "bus": 0.8})
    high = _rules({"flags": {"kind": "*", "severity": "high"}, "max": 0})
    assert evaluate(high, s, [FLAG_LOW])[0].status == "PASS"
    fail = evaluate(high, s, [FLAG_LOW, FLAG_HIGH])[0]
    assert fail.status == "FAIL" and fail.observed == 1 and "sky" in fail.message
    by_kind = _rules({"flags": {"kind": "cluster", "class": "bus"}, "max": 0})
    assert evaluate(by_kind, s, [FLAG_LOW, FLAG_HIGH])[0].observed == 1


def test_baseline_rules() -> None:
    base, now = _summary({"*": 0.7}), _summary({"*": 0.6})
    drop = _rules(
        {"metric": "energy_in_mask", "method": "grad_cam", "max_drop": 0.05},
        {"new_flags": {"severity": "high"}, "max": 0},
    )
    skipped = evaluate(drop, now, [FLAG_HIGH])
    assert [c.status for c in skipped] == ["SKIPPED", "SKIPPED"] and passed(skipped)
    checks = evaluate(drop, now, [FLAG_HIGH], (base, []))
    assert {c.status for c in checks} == {"FAIL"} and checks[0].observed in (pytest.approx(0.1), 1)
    same = evaluate(drop, base, [FLAG_HIGH], (base, [FLAG_HIGH]))  # the flag was there before: not new
    assert {c.status for c in same} == {"PASS"}


def test_rule_files_are_validated(tmp_path: Path) -> None:
    bad = tmp_path / "g.yaml"
    bad.write_text(yaml.safe_dump([{"metric": "energy_in_mask", "op": ">=", "valu": 0.5}]))
    with pytest.raises(ConfigError, match="rule 1: valu: unknown key; did you mean 'value'"):
        load_rules(bad)
    bad.write_text(yaml.safe_dump([{"metric": "energy_in_mask"}]))
    with pytest.raises(ConfigError, match="op \\+ value, or max_drop"):
        load_rules(bad)
    rules, source = load_rules(None)
    assert len(rules) == 3 and "default" in source
    assert Path("configs/gates.yaml").read_text() == Path("auditor/resources/gates.yaml").read_text()


def test_junit_is_parseable(tmp_path: Path) -> None:
    s = _summary({"*": 0.6, "tank": 0.3, "bus": 0.8, "van": None})  # van: no masks, an ERROR
    checks = evaluate(
        _rules(
            {"metric": "energy_in_mask", "class": "each", "method": "grad_cam", "op": ">=", "value": 0.5},
            {"new_flags": {"severity": "high"}, "max": 0},
        ),
        s,
        [],
    )
    write_junit(checks, tmp_path / "junit.xml")
    suite = ET.parse(tmp_path / "junit.xml").getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors"), suite.get("skipped")) == (
        "4",
        "1",
        "1",
        "1",
    )
    cases = suite.findall("testcase")
    assert {c.get("name") for c in cases} >= {"grad_cam/label/tank", "grad_cam/label/bus"}
    assert sum(c.find("failure") is not None for c in cases) == 1


def test_github_summary_and_annotations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(target))
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    s = _summary({"*": 0.6, **{f"c{i}": 0.1 for i in range(30)}})
    checks = evaluate(_rules({"metric": "energy_in_mask", "class": "each", "op": ">=", "value": 0.5}), s, [])
    notes = github_outputs(checks, tmp_path, limit_bytes=2000)
    assert len([n for n in notes if n.startswith("::error")]) == 10 and "more failing checks" in notes[-1]
    text = target.read_text()
    assert text.startswith("## auditor gate: FAILED") and len(text.encode()) < 2000 and "truncated" in text


def _run_dir(tmp: Path, name: str, summary: dict[str, Any], flags: list[dict[str, Any]]) -> Path:
    d = tmp / name
    d.mkdir()
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "flags.json").write_text(json.dumps({"schema_version": 1, "flags": flags}))
    return d


def test_cli_exit_codes_and_outputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    good = _run_dir(tmp_path, "good", _summary({"*": 0.7}), [FLAG_LOW])
    bad = _run_dir(tmp_path, "bad", _summary({"*": 0.5}), [FLAG_HIGH])
    other = _run_dir(tmp_path, "other", _summary({"*": 0.7}, dataset_id="zzz"), [])
    assert main(["gate", str(good)]) == 0
    capsys.readouterr()
    assert main(["gate", str(bad), "--junit", str(tmp_path / "j.xml")]) == 1
    assert (tmp_path / "j.xml").is_file() and json.loads((bad / "gate.json").read_text())["passed"] is False
    out = capsys.readouterr().out
    assert "FAIL" in out.splitlines()[1] and "gate FAILED" in out
    assert main(["gate", str(good), "--baseline", str(good)]) == 0
    assert main(["gate", str(bad), "--baseline", str(good)]) == 1  # new high flag and a 0.2 drop
    assert main(["gate", str(good), "--baseline", str(other)]) == 2  # different data
    assert "different data" in capsys.readouterr().err
    assert main(["gate", str(tmp_path / "missing")]) == 2
