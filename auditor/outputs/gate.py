"""``auditor gate``: evaluate CI rules (:mod:`auditor.outputs.rules`) over a finished run and a baseline run.

Writes ``gate.json``, optionally JUnit XML, a GitHub step summary and annotations; every text that came
from the data is escaped for its medium. Each check is PASS, WARN, FAIL, ERROR (could not be evaluated:
it fails) or SKIPPED (a baseline rule without ``--baseline``, an optional rule the run cannot answer).
"""

from __future__ import annotations

import html
import math
import operator
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from auditor.errors import ConfigError
from auditor.outputs.rules import Rule, load_rules, validate_rules
from auditor.store.rundir import GATE, SUMMARY, RunDir, write_json

STATUS_ORDER = ("FAIL", "ERROR", "WARN", "SKIPPED", "PASS")
OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}


@dataclass
class Check:
    """The outcome of one rule on one scope."""

    rule: str
    scope: str
    status: str
    observed: float | int | None
    expected: str
    message: str


# ------------------------------------------------------------------------------------------ loading


def load_run(run: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(summary, flags) of a finished run directory."""
    rundir = RunDir(run)
    if not rundir.has(SUMMARY):
        raise ConfigError(f"{run} is not a finished run (no {SUMMARY}); run 'auditor run' first")
    return rundir.read_json(SUMMARY), rundir.read_flags()


def check_compatible(run: dict[str, Any], base: dict[str, Any]) -> None:
    """A baseline must have audited the same data (``dataset.id``) with the same methods."""
    a, b = run["dataset"]["id"], base["dataset"]["id"]
    if a != b:
        raise ConfigError(
            f"the baseline audited different data (dataset id {b[:12]}... vs {a[:12]}...): a baseline must be a run "
            "on the same files (same sample ids and file contents)"
        )
    ma, mb = set(run["aggregates"]), set(base["aggregates"])
    if ma != mb:
        raise ConfigError(f"the baseline ran other methods ({sorted(mb)} vs {sorted(ma)}); use the same 'methods'")
    ca, cb = run["dataset"].get("classes"), base["dataset"].get("classes")
    if ca != cb:
        raise ConfigError(f"the baseline has other classes ({cb} vs {ca}); use the same data.classes in the same order")


# ------------------------------------------------------------------------------------------ evaluation

Baseline = tuple[dict[str, Any], list[dict[str, Any]]] | None


PASSES_SHOWN = 50  # passed checks the printed table lists


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _scopes(rule: Rule, summary: dict[str, Any]) -> list[tuple[str, str]]:
    methods = list(summary["aggregates"]) if rule.method == "each" else [rule.method]
    classes = summary["dataset"]["classes"] if rule.class_ == "each" else [rule.class_]
    return [(m, c) for m in methods for c in classes]


def _stat(summary: dict[str, Any], method: str, target: str, cls: str, metric: str, stat: str) -> Any:
    if metric == "accuracy":
        entry = summary["accuracy"].get(cls)
        return None if entry is None else entry.get("accuracy" if stat == "mean" else stat)
    node = summary["aggregates"].get(method, {}).get(target, {}).get(cls, {}).get(metric)
    return None if node is None else node.get(stat)


def _status(ok: bool, rule: Rule) -> str:
    return "PASS" if ok else ("WARN" if rule.on_fail == "warn" else "FAIL")


def _flag_checks(rule: Rule, flags: list[dict[str, Any]], baseline: Baseline) -> list[Check]:
    filt = rule.flags if rule.kind == "flags" else rule.new_flags
    assert filt is not None and rule.max is not None
    if rule.kind == "new_flags" and baseline is None:
        return [Check(rule.label, "*", "SKIPPED", None, f"<= {rule.max}", "no --baseline given")]
    known = {f["id"] for f in baseline[1]} if baseline and rule.kind == "new_flags" else set()
    hits = [f for f in flags if filt.matches(f) and f["id"] not in known]
    msg = "; ".join(f"[{f['severity']}] {f['message']}" for f in hits[:5]) or "none"
    return [Check(rule.label, "*", _status(len(hits) <= rule.max, rule), len(hits), f"<= {rule.max}", msg)]


def _group_checks(rule: Rule, summary: dict[str, Any]) -> list[Check]:
    expected = f"{rule.op} {rule.value}"
    groups = summary.get("groups", {}).get(rule.attribute or "")
    if not groups:
        msg = f"the run has no metadata attribute {rule.attribute!r}"
        return [Check(rule.label, str(rule.attribute), "ERROR", None, expected, msg)]
    checks = []
    for value, g in groups.items():
        obs = g.get(rule.stat)
        scope = f"{rule.attribute}={value}"
        if not _finite(obs):
            checks.append(Check(rule.label, scope, "ERROR", None, expected, f"no {rule.stat} for this group"))
            continue
        assert rule.op is not None and rule.value is not None
        ok = OPS[rule.op](float(obs), rule.value)
        checks.append(Check(rule.label, scope, _status(ok, rule), float(obs), expected, f"n = {g.get('n')}"))
    return checks


def _baseline_check(rule: Rule, scope: str, obs: Any, ref: Any) -> Check:
    expected = f"drop <= {rule.max_drop}" if rule.max_drop is not None else f"rise <= {rule.max_rise}"
    if not (_finite(obs) and _finite(ref)):
        msg = f"{rule.metric} {rule.stat} is missing in the run or the baseline (no masks, or not configured?)"
        return Check(rule.label, scope, "ERROR", None, expected, msg)
    change = float(ref) - float(obs) if rule.max_drop is not None else float(obs) - float(ref)
    limit = rule.max_drop if rule.max_drop is not None else rule.max_rise
    assert limit is not None
    msg = f"baseline {float(ref):.4f}, now {float(obs):.4f}"
    return Check(rule.label, scope, _status(change <= limit + 1e-12, rule), round(change, 6), expected, msg)


def _metric_checks(rule: Rule, summary: dict[str, Any], baseline: Baseline) -> list[Check]:
    assert rule.metric is not None
    checks = []
    for method, cls in _scopes(rule, summary):
        scope = f"{method}/{rule.target}/{cls}"
        obs = _stat(summary, method, rule.target, cls, rule.metric, rule.stat)
        if rule.kind == "baseline_metric":
            if baseline is None:
                expected = f"drop <= {rule.max_drop}" if rule.max_drop is not None else f"rise <= {rule.max_rise}"
                checks.append(Check(rule.label, scope, "SKIPPED", None, expected, "no --baseline given"))
            else:
                ref = _stat(baseline[0], method, rule.target, cls, rule.metric, rule.stat)
                checks.append(_baseline_check(rule, scope, obs, ref))
            continue
        assert rule.op is not None and rule.value is not None
        expected = f"{rule.op} {rule.value}"
        if not _finite(obs):
            msg = f"{rule.metric} {rule.stat} could not be computed for this scope (no masks, or not configured?)"
            checks.append(Check(rule.label, scope, "ERROR", None, expected, msg))
            continue
        ok = OPS[rule.op](float(obs), rule.value)
        checks.append(Check(rule.label, scope, _status(ok, rule), float(obs), expected, ""))
    return checks


def evaluate(
    rules: list[Rule],
    summary: dict[str, Any],
    flags: list[dict[str, Any]],
    baseline: Baseline = None,
) -> list[Check]:
    """Validate the rules against the run, then evaluate every rule on every scope; the worst statuses first."""
    skip = validate_rules(rules, summary)
    checks: list[Check] = []
    for i, rule in enumerate(rules):
        if i in skip:
            missing = f"{rule.metric} ({rule.target})" if rule.kind != "group" else rule.attribute
            checks.append(Check(rule.label, "*", "SKIPPED", None, "-", f"optional: this run has no {missing}"))
        elif rule.kind in ("flags", "new_flags"):
            checks += _flag_checks(rule, flags, baseline)
        elif rule.kind == "group":
            checks += _group_checks(rule, summary)
        else:
            checks += _metric_checks(rule, summary, baseline)
    return sorted(checks, key=lambda c: STATUS_ORDER.index(c.status))


def verdict(checks: list[Check]) -> str:
    """``fail`` (a FAIL or ERROR), ``warn`` (a WARN) or ``pass``: the report's headline uses the gate's own rules."""
    statuses = {c.status for c in checks}
    return "fail" if statuses & {"FAIL", "ERROR"} else "warn" if "WARN" in statuses else "pass"


def passed(checks: list[Check]) -> bool:
    """No FAIL and no ERROR."""
    return not any(c.status in ("FAIL", "ERROR") for c in checks)


# ------------------------------------------------------------------------------------------ outputs


def table(checks: list[Check], passes: int = PASSES_SHOWN) -> str:
    """A compact text table, failures first: every check that did not pass, and the first ``passes`` that did (a
    rule on ``class: each`` over 1,000 classes is 1,000 checks a method; ``gate.json`` holds them all)."""
    passing = [c for c in checks if c.status == "PASS"]
    shown = [c for c in checks if c.status != "PASS"] + passing[:passes]
    rows = [(c.status, c.rule, c.scope, "-" if c.observed is None else f"{c.observed:.4g}", c.expected) for c in shown]
    head = ("status", "rule", "scope", "observed", "expected")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(5)]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]]
    if len(passing) > passes:
        lines.append(f"... and {len(passing) - passes} more passed checks (gate.json lists every check)")
    counts = {s: sum(c.status == s for c in checks) for s in STATUS_ORDER}
    lines.append(", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n) or "no checks")
    return "\n".join(lines)


def write_junit(checks: list[Check], path: Path) -> None:
    """JUnit XML: one test case per rule x scope (FAIL -> failure, ERROR -> error, SKIPPED -> skipped)."""
    suite = ET.Element(
        "testsuite",
        name="auditor gate",
        tests=str(len(checks)),
        failures=str(sum(c.status == "FAIL" for c in checks)),
        errors=str(sum(c.status == "ERROR" for c in checks)),
        skipped=str(sum(c.status == "SKIPPED" for c in checks)),
    )
    for c in checks:
        case = ET.SubElement(suite, "testcase", classname=c.rule, name=c.scope)
        text = f"observed {c.observed}, expected {c.expected}. {c.message}".strip()
        if c.status == "FAIL":
            ET.SubElement(case, "failure", message=text).text = text
        elif c.status == "ERROR":
            ET.SubElement(case, "error", message=text).text = text
        elif c.status == "SKIPPED":
            ET.SubElement(case, "skipped", message=text)
        elif c.status == "WARN":
            ET.SubElement(case, "system-out").text = f"WARNING: {text}"
    path.parent.mkdir(parents=True, exist_ok=True)
    root = ET.Element("testsuites")
    root.append(suite)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def _markdown_cell(text: str) -> str:
    """A table cell of GitHub markdown from data (labels, paths): HTML escaped, pipes and newlines neutralized."""
    return html.escape(str(text)).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _annotation(text: str) -> str:
    """A workflow-command message: GitHub's escapes for %, CR and LF (data cannot start a new command)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def github_outputs(checks: list[Check], run: Path, limit_bytes: int = 1 << 20) -> list[str]:
    """Append a markdown summary to ``$GITHUB_STEP_SUMMARY`` (under 1 MiB) and, under GitHub Actions, return
    at most 10 ``::error`` annotation lines, worst first."""
    bad = [c for c in checks if c.status in ("FAIL", "ERROR")]
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if target:
        lines = [
            f"## auditor gate: {'PASSED' if not bad else 'FAILED'} ({_markdown_cell(str(run))})",
            "",
            "| status | rule | scope | observed | expected |",
            "|---|---|---|---|---|",
        ]
        for c in checks:
            obs = "-" if c.observed is None else f"{c.observed:.4g}"
            cells = [c.status, c.rule, c.scope, obs, c.expected]
            lines.append("| " + " | ".join(_markdown_cell(v) for v in cells) + " |")
        text = "\n".join(lines) + "\n"
        encoded = text.encode()
        if len(encoded) > limit_bytes:
            text = encoded[: limit_bytes - 200].decode(errors="ignore").rsplit("\n", 1)[0]
            text += "\n\n(truncated: the full table is in gate.json)\n"
        with open(target, "a", encoding="utf-8") as fh:
            fh.write(text)
    if os.environ.get("GITHUB_ACTIONS") != "true":
        return []
    notes = [
        "::error title=auditor gate "
        + c.status
        + "::"
        + _annotation(f"{c.rule} [{c.scope}]: observed {c.observed}, expected {c.expected}. {c.message}"[:1000])
        for c in bad[:10]
    ]
    if len(bad) > 10:
        notes.append(f"::notice title=auditor gate::{len(bad) - 10} more failing checks in gate.json")
    return notes


def run_gate(run: Path, rules_path: Path | None, baseline: Path | None, junit: Path | None) -> tuple[bool, str]:
    """Evaluate, write ``gate.json`` (and JUnit), return ``(passed, printable report)``."""
    rules, source = load_rules(rules_path)
    summary, flags = load_run(run)
    base = None
    if baseline is not None:
        base = load_run(baseline)
        check_compatible(summary, base[0])
    checks = evaluate(rules, summary, flags, base)
    ok = passed(checks)
    write_json(
        run / GATE,
        {
            "schema_version": 1,
            "passed": ok,
            "rules": source,
            "baseline": str(baseline) if baseline else None,
            "checks": [asdict(c) for c in checks],
        },
    )
    if junit is not None:
        write_junit(checks, junit)
    notes = github_outputs(checks, run)
    report = "\n".join([*notes, table(checks), f"gate {'PASSED' if ok else 'FAILED'} ({source})"])
    return ok, report
