"""``auditor gate``: evaluate CI rules over a finished run (and optionally a baseline run).

Rules (YAML list, DESIGN.md §5), each with an optional ``name`` and ``on_fail: fail | warn``:

* metric rule: ``{metric, method, target, class, stat, op, value}``: ``class`` and ``method`` may be a name,
  ``"*"`` (the all-classes aggregate) or ``each`` (one check per class / method of the run);
* group rule: ``{attribute, stat: accuracy, op, value}``: one check per value of a metadata attribute;
* flag rule: ``{flags: {kind, severity, class}, max}``: at most ``max`` matching flags;
* baseline metric rule: ``{metric, method, target, class, stat, max_drop}`` (or ``max_rise`` for metrics where
  lower is better): compared with ``--baseline``;
* baseline flag rule: ``{new_flags: {kind, severity, class}, max}``: flags (matched by ``id``) absent from the
  baseline.

Each check is PASS, WARN, FAIL, ERROR (could not be evaluated, e.g. no masks for that class: it fails) or
SKIPPED (a baseline rule without ``--baseline``: it does not fail).
"""

from __future__ import annotations

import math
import operator
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from xml.etree import ElementTree as ET

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from auditor.errors import ConfigError
from auditor.run.rundir import GATE, SUMMARY, RunDir, write_json
from auditor.shortcuts.flags import SEVERITY_RANK
from auditor.validation import format_validation_error

STATUS_ORDER = ("FAIL", "ERROR", "WARN", "SKIPPED", "PASS")
OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}


class FlagFilter(BaseModel):
    """Which flags a flag rule counts; ``severity`` counts that level and above."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    kind: str = "*"
    severity: Literal["low", "medium", "high"] = "low"
    class_: str = Field("*", alias="class")

    def matches(self, flag: dict[str, Any]) -> bool:
        return (
            (self.kind == "*" or flag["kind"] == self.kind)
            and SEVERITY_RANK[flag["severity"]] >= SEVERITY_RANK[self.severity]
            and (self.class_ == "*" or flag.get("class") == self.class_)
        )

    def describe(self) -> str:
        return f"{self.severity}+ {self.kind} flags" + ("" if self.class_ == "*" else f" of class {self.class_}")


class Rule(BaseModel):
    """One rule of a rules file (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str | None = None
    on_fail: Literal["fail", "warn"] = "fail"
    metric: str | None = None
    method: str = "each"
    target: str = "label"
    class_: str = Field("*", alias="class")
    stat: str = "mean"
    op: Literal[">=", ">", "<=", "<", "==", "!="] | None = None
    value: float | None = None
    attribute: str | None = None
    flags: FlagFilter | None = None
    new_flags: FlagFilter | None = None
    max: int | None = None
    max_drop: float | None = None
    max_rise: float | None = None

    @model_validator(mode="after")
    def _kind(self) -> Rule:
        kinds = [
            k
            for k, on in (
                ("metric", self.metric is not None and self.attribute is None),
                ("group", self.attribute is not None),
                ("flags", self.flags is not None),
                ("new_flags", self.new_flags is not None),
            )
            if on
        ]
        if len(kinds) != 1:
            raise ValueError("a rule needs exactly one of metric, attribute, flags, new_flags")
        kind = kinds[0]
        if kind in ("flags", "new_flags") and self.max is None:
            raise ValueError(f"a {kind} rule needs 'max'")
        if kind == "metric":
            relative = self.max_drop is not None or self.max_rise is not None
            if relative == (self.op is not None):
                raise ValueError("a metric rule needs either op + value, or max_drop / max_rise (against a baseline)")
            if self.op is not None and self.value is None:
                raise ValueError("a metric rule with 'op' needs 'value'")
        if kind == "group" and (self.op is None or self.value is None):
            raise ValueError("an attribute rule needs op and value")
        return self

    @property
    def kind(self) -> str:
        if self.flags is not None:
            return "flags"
        if self.new_flags is not None:
            return "new_flags"
        if self.attribute is not None:
            return "group"
        return "baseline_metric" if self.op is None else "metric"

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.kind == "flags" and self.flags is not None:
            return f"at most {self.max} {self.flags.describe()}"
        if self.kind == "new_flags" and self.new_flags is not None:
            return f"at most {self.max} new {self.new_flags.describe()}"
        if self.kind == "group":
            return f"{self.attribute} group {self.stat} {self.op} {self.value}"
        if self.kind == "baseline_metric":
            change = f"drop <= {self.max_drop}" if self.max_drop is not None else f"rise <= {self.max_rise}"
            return f"{self.metric} {self.stat} {change} vs baseline"
        return f"{self.metric} {self.stat} {self.op} {self.value}"


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


def load_rules(path: Path | None) -> tuple[list[Rule], str]:
    """Rules from ``path``, or the packaged default rule set; returns ``(rules, source)``."""
    if path is None:
        text = resources.files("auditor").joinpath("resources/gates.yaml").read_text(encoding="utf-8")
        source = "the packaged default rules (configs/gates.yaml)"
    else:
        if not path.is_file():
            raise ConfigError(f"rules file not found: {path}")
        text, source = path.read_text(encoding="utf-8"), str(path)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    if isinstance(raw, dict) and "rules" in raw:
        raw = raw["rules"]
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: expected a list of rules (or a mapping with 'rules:')")
    rules = []
    for i, item in enumerate(raw):
        try:
            rules.append(Rule.model_validate(item or {}))
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, f"{source}: rule {i + 1}", Rule)) from None
    return rules, source


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


# ------------------------------------------------------------------------------------------ evaluation

Baseline = tuple[dict[str, Any], list[dict[str, Any]]] | None


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
    """Evaluate every rule on every scope; the worst statuses first."""
    checks: list[Check] = []
    for rule in rules:
        if rule.kind in ("flags", "new_flags"):
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


def table(checks: list[Check]) -> str:
    """A compact text table, failures first."""
    rows = [(c.status, c.rule, c.scope, "-" if c.observed is None else f"{c.observed:.4g}", c.expected) for c in checks]
    head = ("status", "rule", "scope", "observed", "expected")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(5)]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]]
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


def github_outputs(checks: list[Check], run: Path, limit_bytes: int = 1 << 20) -> list[str]:
    """Append a markdown summary to ``$GITHUB_STEP_SUMMARY`` (under 1 MiB) and, under GitHub Actions, return
    at most 10 ``::error`` annotation lines, worst first."""
    bad = [c for c in checks if c.status in ("FAIL", "ERROR")]
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if target:
        lines = [
            f"## auditor gate: {'PASSED' if not bad else 'FAILED'} ({run})",
            "",
            "| status | rule | scope | observed | expected |",
            "|---|---|---|---|---|",
        ]
        for c in checks:
            obs = "-" if c.observed is None else f"{c.observed:.4g}"
            lines.append(f"| {c.status} | {c.rule} | {c.scope} | {obs} | {c.expected} |".replace("\n", " "))
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
        f"::error title=auditor gate {c.status}::{c.rule} [{c.scope}]: observed {c.observed}, expected "
        f"{c.expected}. {c.message}".replace("\n", " ")[:1000]
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
