"""Gate rules: their schema, loading (a YAML file or the packaged defaults) and validation against a run.

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

from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from auditor.errors import ConfigError
from auditor.registry import did_you_mean
from auditor.shortcuts.flags import SEVERITY_RANK
from auditor.validation import format_validation_error, load_yaml


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
    optional: bool = False  # a run without the rule's metric, target or attribute skips it (not a config error)

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


def load_rules(path: Path | None) -> tuple[list[Rule], str]:
    """Rules from ``path``, or the packaged default rule set; returns ``(rules, source)``."""
    if path is None:
        text = resources.files("auditor").joinpath("resources/gates.yaml").read_text(encoding="utf-8")
        source = "the packaged default rules (configs/gates.yaml)"
    else:
        if not path.is_file():
            raise ConfigError(f"rules file not found: {path}")
        text, source = path.read_text(encoding="utf-8"), str(path)
    raw = load_yaml(text, source)
    if isinstance(raw, dict):
        for key in raw:
            if key != "rules":
                raise ConfigError(f"{source}: unknown key {key!r}{did_you_mean(str(key), ['rules'])}")
        raw = raw.get("rules")
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: expected a list of rules (or a mapping with 'rules:')")
    rules = []
    for i, item in enumerate(raw):
        try:
            rules.append(Rule.model_validate(item or {}))
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, f"{source}: rule {i + 1}", Rule)) from None
    return rules, source


METRIC_STATS = ("mean", "median", "ci_low", "ci_high", "n")
GROUP_STATS = ("accuracy", "n")
SUMMARY_METRICS = ("accuracy", "max_box_acc", "map_valid_rate")  # aggregates that are not metric columns


def _known(summary: dict[str, Any]) -> dict[str, list[str]]:
    """The names a rule may use on this run."""
    from auditor.shortcuts.catalog import registered

    aggregates = summary.get("aggregates", {})
    columns = summary.get("metric_columns")
    if columns is None:  # a run written before metric_columns: what its aggregates hold
        columns = {m for per_t in aggregates.values() for per_c in per_t.values() for s in per_c.values() for m in s}
    return {
        "kind": sorted({k for a in registered() for k in a.kinds}),
        "class": list(summary.get("dataset", {}).get("classes", [])),
        "method": list(aggregates),
        "target": sorted({t for per_t in aggregates.values() for t in per_t}),
        "metric": sorted({*columns, *SUMMARY_METRICS}),
        "attribute": sorted(summary.get("groups") or {}),
    }


def _check_name(
    problems: list[str], where: str, key: str, value: str | None, known: list[str], extra: tuple[str, ...] = ()
) -> None:
    if value is None or value in extra or value in known:
        return
    hint = did_you_mean(value, known)
    problems.append(f"{where}: {key} {value!r} is not in this run{hint} (known: {', '.join(known) or 'none'})")


def validate_rules(rules: list[Rule], summary: dict[str, Any]) -> set[int]:
    """Check every name a rule uses against the run: a misspelled kind, class, method, metric, stat or
    attribute must never pass silently.

    Returns:
        The indices of ``optional`` rules whose metric or attribute this run lacks (they are skipped).

    Raises:
        ConfigError: naming each problem with a close match.
    """
    known, problems, skip = _known(summary), list[str](), set[int]()
    for i, rule in enumerate(rules):
        where = f"rule {i + 1} ({rule.label})"
        for filt in (rule.flags, rule.new_flags):
            if filt is not None:
                _check_name(problems, where, "flags.kind", filt.kind, known["kind"], ("*",))
                _check_name(problems, where, "flags.class", filt.class_, known["class"], ("*",))
        if rule.kind == "group":
            if rule.optional and rule.attribute not in known["attribute"]:
                skip.add(i)
                continue
            _check_name(problems, where, "attribute", rule.attribute, known["attribute"])
            _check_name(problems, where, "stat", rule.stat, list(GROUP_STATS))
        elif rule.metric is not None:
            absent = rule.metric not in known["metric"] or (
                rule.metric not in SUMMARY_METRICS and rule.target not in known["target"]
            )
            if rule.optional and absent:
                skip.add(i)
                continue
            _check_name(problems, where, "metric", rule.metric, known["metric"])
            _check_name(problems, where, "method", rule.method, known["method"], ("each",))
            _check_name(problems, where, "class", rule.class_, known["class"], ("*", "each"))
            _check_name(problems, where, "target", rule.target, known["target"])
            _check_name(problems, where, "stat", rule.stat, [*METRIC_STATS, "accuracy"])
    if problems:
        raise ConfigError("gate rules do not match the run:\n  " + "\n  ".join(problems))
    return skip
