"""``attribute_leak``: a (class, attribute value) group much less accurate than the rest of its class.

Attributes are the metadata columns and the image properties measured in the map stage (``prop_*``:
brightness, contrast, mean colour, sharpness, binned in quartiles), whether or not metadata is given.

An accuracy gap is an observation: a group of bright images may be misclassified for what comes with the
brightness (a white tag on 20% of a class made its images brighter and was what the model read; the brightness
quartile then flagged the class). Where the model is given, a gap on a property a mean-colour shift moves
(brightness, red, green, blue) is put to the test: the group's images are shifted to the rest of the class's
mean colour and the rest to the group's, against the opposite shifts (``interventions.shift_intervention``). A
property whose shift changes under ``attribute_shift`` of the predictions beyond the opposite shift does not
explain the gap: its flag is low and says so. Contrast and sharpness have no such test: their flags are low, an
observation (a tag that is another class's cue raises the contrast and sharpness of this class's images that carry
it, and they are its errors: the cue is the other class's flag). Per class, the strongest brightness or colour
property leads the correlated ones. Metadata has no test either and keeps the severity of its gap: a user named the
column.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

import numpy as np
import pandas as pd
from pydantic import Field, model_validator
from scipy import stats

from auditor.shortcuts.findings import Cause
from auditor.shortcuts.flags import Flag, level, make_flag, pct
from auditor.shortcuts.registry import (
    Analysis,
    AnalysisInputs,
    FlagContext,
    Measurement,
    PerClass,
    gather_entries,
    keyed_rows,
    register_analysis,
)
from auditor.shortcuts.thresholds import SharedParams, ordered, params_of
from auditor.stats import NAN


class Params(SharedParams):
    """``attribute_leak``'s thresholds (config ``thresholds``, flat keys)."""

    attribute_gap: float = Field(0.15, gt=0, le=1, description="least accuracy gap of a (class, value) group")
    attribute_medium: float = Field(0.25, gt=0, le=1, description="medium from this accuracy gap")
    attribute_high: float = Field(0.4, gt=0, le=1, description="high from this accuracy gap")
    attribute_shift: float = Field(
        0.25,
        gt=0,
        le=1,
        description="least share of a property group's errors that shifting it to the rest of its class's mean "
        "colour fixes (or of the rest's right calls it breaks), beyond the opposite shift, for the property's "
        "flag to stand above low",
    )

    @model_validator(mode="after")
    def _attributes_levels_in_order(self) -> Self:  # a unique name: Thresholds inherits every analysis's
        ordered(self, "attribute_gap", "attribute_medium", "attribute_high")
        return self


PROPERTIES = ("brightness", "contrast", "red", "green", "blue", "sharpness")
SHIFTABLE = ("brightness", "red", "green", "blue")  # the properties a mean-colour shift moves


def _purity(values: np.ndarray, target: np.ndarray) -> float:
    """How well ``values`` alone predict ``target``: accuracy of the majority-per-value rule, rescaled so
    the overall majority rate is 0 and perfect prediction is 1."""
    frame = pd.DataFrame({"v": values, "t": target})
    if frame.empty:
        return NAN
    rule = frame.groupby("v")["t"].agg(lambda s: s.value_counts().iloc[0]).sum() / len(frame)
    base = frame["t"].value_counts().iloc[0] / len(frame)
    return float((rule - base) / (1 - base)) if base < 1 else 0.0


def property_bins(values: np.ndarray) -> np.ndarray:
    """Quartile bins of a continuous property as readable labels (``'<= 0.31'``, ``'0.31-0.45'``, ``'> 0.58'``)."""
    edges = np.unique(np.quantile(values, [0.25, 0.5, 0.75]))
    idx = np.digitize(values, edges, right=True)
    names = []
    for i in range(len(edges) + 1):
        if i == 0:
            names.append(f"<= {edges[0]:.3g}")
        elif i == len(edges):
            names.append(f"> {edges[-1]:.3g}")
        else:
            names.append(f"{edges[i - 1]:.3g}-{edges[i]:.3g}")
    return np.array([names[i] for i in idx], dtype=object)


def _columns(first: pd.DataFrame, attributes: Sequence[str]) -> list[tuple[str, str, np.ndarray]]:
    """The metadata columns, then the image properties: both, always (a metadata column, however irrelevant,
    once switched the property tests off without a word); a property named like a metadata column yields."""
    cols = [(a, "metadata", first[a].astype(str).to_numpy()) for a in attributes if a in first.columns]
    taken = {a for a, _, _ in cols}
    return cols + [
        (p, "property", property_bins(first[f"prop_{p}"].to_numpy(np.float64)))
        for p in PROPERTIES
        if p not in taken and f"prop_{p}" in first.columns and first[f"prop_{p}"].notna().all()
    ]


def _group_test(first: pd.DataFrame, cls: str, v: Any, g: np.ndarray, rest: np.ndarray, correct: np.ndarray) -> dict:
    table = [
        [int(correct[g].sum()), int((~correct[g]).sum())],
        [int(correct[rest].sum()), int((~correct[rest]).sum())],
    ]
    return {
        "class": cls,
        "value": str(v),
        "n": int(g.sum()),
        "accuracy": float(correct[g].mean()),
        "rest_accuracy": float(correct[rest].mean()),
        "gap": float(correct[rest].mean() - correct[g].mean()),
        "p_value": float(stats.fisher_exact(table, alternative="less").pvalue),
        "ids": first["id"].to_numpy()[g & ~correct][:6].tolist(),
    }


def _groups_and_tests(
    first: pd.DataFrame, values: np.ndarray, classes: Sequence[str], min_group: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    labels = first["label"].to_numpy()
    correct = first["correct"].to_numpy(bool)
    outside = first["energy_outside_mask"].to_numpy(np.float64) if "energy_outside_mask" in first else None
    groups, tests = [], []
    for cls in classes:
        in_cls = labels == cls
        for v in np.unique(values[in_cls]):
            g, rest = in_cls & (values == v), in_cls & (values != v)
            entry: dict[str, Any] = {
                "class": cls,
                "value": str(v),
                "n": int(g.sum()),
                "accuracy": float(correct[g].mean()),
            }
            if outside is not None and np.isfinite(outside[g]).any():
                entry["outside"] = float(np.nanmean(outside[g]))
            groups.append(entry)
            if g.sum() >= min_group and rest.sum() >= min_group:
                tests.append(_group_test(first, cls, v, g, rest, correct))
    return groups, tests


def attribute_leakage(
    first: pd.DataFrame, attributes: Sequence[str], classes: Sequence[str], min_group: int = 5
) -> dict[str, Any]:
    """Per attribute: group accuracies, worst-group accuracy, and how well it predicts label and prediction.

    Args:
        first: one row per sample (one method, ``label`` target) with ``label``, ``pred``, ``correct``.
        attributes: metadata column names (the image properties are tested beside them).
        classes: class names.
        min_group: smallest (class, value) group that is tested.

    Returns:
        ``{attribute: {kind, values, groups, worst_group_accuracy, average_accuracy, gap, predicts_label,
        predicts_prediction, tests: [{class, value, n, accuracy, rest_accuracy, gap, p_value, ids}]}}``; each
        test is a one-sided Fisher exact test that the group is less accurate than the rest of its class.
    """
    correct = first["correct"].to_numpy(bool)
    out: dict[str, Any] = {}
    for name, kind, values in _columns(first, attributes):
        groups, tests = _groups_and_tests(first, values, classes, min_group)
        wga = min((g["accuracy"] for g in groups if g["n"] >= min_group), default=NAN)
        out[name] = {
            "kind": kind,
            "values": {
                str(v): {"n": int((values == v).sum()), "accuracy": float(correct[values == v].mean())}
                for v in np.unique(values)
            },
            "groups": groups,
            "worst_group_accuracy": wga,
            "average_accuracy": float(correct.mean()),
            "gap": float(correct.mean() - wga) if np.isfinite(wga) else NAN,
            "predicts_label": _purity(values, first["label"].to_numpy()),
            "predicts_prediction": _purity(values, first["pred"].to_numpy()),
            "tests": tests,
        }
    return out


def measure(inputs: AnalysisInputs) -> Measurement:
    return {"attributes": attribute_leakage(inputs.first, inputs.metadata, inputs.classes, inputs.thresholds.min_group)}


def _candidate(measured: Measurement, cls: str, t: Params) -> tuple[str, dict[str, Any]] | None:
    """The class's shiftable property group with the largest gap that reaches ``attribute_gap`` at an unadjusted
    ``alpha`` (every group a flag can name passes both), or None."""
    found = [
        (a, x)
        for a, info in measured["attributes"].items()
        if info["kind"] == "property" and a in SHIFTABLE
        for x in info["tests"]
        if x["class"] == cls and x["gap"] >= t.attribute_gap and x["p_value"] < t.alpha
    ]
    return max(found, key=lambda ax: ax[1]["gap"]) if found else None


def _shift_class(measured: Measurement, inputs: AnalysisInputs, cls: str) -> dict[str, Any]:
    """One class's work item: its candidate group shifted to the rest's mean colour and the rest to the group's
    (keyed draws of ``intervention_images`` each). Returns ``{"shift": entry or None, "triage": None}``."""
    assert inputs.intervener is not None
    t, first = params_of(inputs.thresholds, Params), inputs.first
    picked = _candidate(measured, cls, t)
    if picked is None:
        return {"shift": None, "triage": None}
    a, x = picked
    mine = first[first["label"] == cls]
    in_group = property_bins(first[f"prop_{a}"].to_numpy(np.float64))[first["label"].to_numpy() == cls] == x["value"]
    group, rest = mine[in_group], mine[~in_group]
    cols = [f"prop_{c}" for c in ("red", "green", "blue")]
    delta = group[cols].to_numpy(np.float64).mean(0) - rest[cols].to_numpy(np.float64).mean(0)
    own = np.sort(keyed_rows(rest, t.intervention_images, inputs.seed, "attribute")).tolist()
    other = np.sort(keyed_rows(group, t.intervention_images, inputs.seed, "attribute")).tolist()
    test = inputs.intervener.shift_test(own, other, inputs.classes.index(cls), delta.tolist(), None, outside=False)
    test = test["whole"]  # a property of the whole image: the test that spares the objects is not run
    both = np.array([test["flip"] - test["flip_control"], test["leave"] - test["leave_control"]], dtype=float)
    effect = float(np.max(both[np.isfinite(both)])) if np.isfinite(both).any() else NAN  # NaN: nothing to move
    entry = {"attribute": a, "value": x["value"], "delta": [float(v) for v in delta], "effect": float(effect)}
    return {"shift": entry | {"test": test}, "triage": None}


WORK = PerClass(
    classes=lambda measured, inputs: [
        c for c in inputs.classes if _candidate(measured, c, params_of(inputs.thresholds, Params)) is not None
    ],
    run=_shift_class,
    gather=gather_entries("attribute_shifts", "shift"),
    what="attribute shifts, classes",
)


def _test_name(attribute: str, x: dict[str, Any]) -> str:
    return f"{attribute}/{x['class']}/{x['value']}"


def tests(measured: Measurement) -> dict[str, float]:
    """``{"<attribute>/<class>/<value>": p}``: the Fisher test of each (class, value) group's accuracy."""
    return {_test_name(a, x): x["p_value"] for a, info in measured["attributes"].items() for x in info["tests"]}


def _strongest(attrs: dict[str, Any], ctx: FlagContext) -> tuple[dict[tuple[str, str], tuple[dict, float]], dict]:
    """The largest significant gap per (attribute, class); correlated image properties keep only the strongest."""
    t = params_of(ctx.thresholds, Params)
    q = ctx.q_values("attributes", tests({"attributes": attrs}))
    best: dict[tuple[str, str], tuple[dict[str, Any], float]] = {}
    for a, x in [(a, x) for a, info in attrs.items() for x in info["tests"]]:
        qv = q[_test_name(a, x)]
        if x["gap"] >= t.attribute_gap and qv < t.alpha:
            key = (a, x["class"])
            if key not in best or x["gap"] > best[key][0]["gap"]:
                best[key] = (x, float(qv))
    # Image properties are strongly correlated with each other (a brighter image is also redder, greener,
    # bluer) and with the metadata that describes the scene (sunny skies are brighter): per class, keep the
    # strongest metadata attribute's flag, else the strongest property's, and cite the properties under it.
    props = [(a, c) for (a, c) in best if attrs[a]["kind"] == "property"]
    meta = [(a, c) for (a, c) in best if attrs[a]["kind"] == "metadata"]
    also: dict[tuple[str, str], list[str]] = {}
    for c in {c for _, c in props}:
        # the strongest property an intervention can test leads (a brighter image is also more contrasted)
        ranked = sorted((a for a, cc in props if cc == c), key=lambda a: (a not in SHIFTABLE, -best[(a, c)][0]["gap"]))
        named = sorted((a for a, cc in meta if cc == c), key=lambda a: -best[(a, c)][0]["gap"])
        lead, cited = (named[0], ranked) if named else (ranked[0], ranked[1:])
        also[(lead, c)] = cited
        for a in cited:
            del best[(a, c)]
    return best, also


def attribute_flags(measured: Measurement, ctx: FlagContext) -> list[Flag]:
    """``attribute_leak`` per (attribute, class) with a significant accuracy gap."""
    t, attrs = params_of(ctx.thresholds, Params), measured["attributes"]
    best, also = _strongest(attrs, ctx)
    flags = []
    for (a, c), (x, qv) in best.items():
        info = attrs[a]
        what = f"{a} = {x['value']}" if info["kind"] == "metadata" else f"{a} {x['value']}"
        msg = (
            f"{c} images with {what} are classified correctly {pct(x['accuracy'])} of the time, vs "
            f"{pct(x['rest_accuracy'])} for the other {c} images; {a} alone predicts the model's output "
            f"{pct(info['predicts_prediction'])} and the true label {pct(info['predicts_label'])} of the way "
            "above chance."
        )
        evidence = {
            **{k: x[k] for k in ("value", "n", "accuracy", "rest_accuracy", "gap", "p_value")},
            "q_value": qv,
            **{k: info[k] for k in ("worst_group_accuracy", "predicts_label", "predicts_prediction", "kind")},
            "error_ids": x["ids"],
            "correlated_properties": also.get((a, c), []),
        }
        sev = level(x["gap"], t.attribute_medium, t.attribute_high)
        shift = measured.get("attribute_shifts", {}).get(c)
        if info["kind"] == "property" and shift and (shift["attribute"], shift["value"]) == (a, x["value"]):
            evidence["shift"] = shift
            if np.isfinite(shift["effect"]) and shift["effect"] < t.attribute_shift:
                sev = "low"
                msg += _unexplained(c, shift)
        elif info["kind"] == "property" and a not in SHIFTABLE:
            sev = "low"  # a gap no intervention can put to the test is an observation
            msg += _untested(a, c)
        flags.append(make_flag("attribute_leak", c, a, sev, x["gap"], msg, evidence))
    return flags


def _untested(a: str, c: str) -> str:
    return (
        f" No intervention moves the {a}, so the gap is an observation, not a verdict. What comes with the {a} "
        f"may be what the model reads (a tag that is another class's cue raises the {a} of the {c} images that "
        "carry it, and they are the errors)."
    )


def _unexplained(c: str, shift: dict[str, Any]) -> str:
    test = shift["test"]
    return (
        f" Shifting these images to the other {c} images' mean colour turns {pct(test['flip'])} of their errors "
        f"into {c} (the opposite shift: {pct(test['flip_control'])}), and the others to theirs turns "
        f"{pct(test['leave'])} away from {c} ({pct(test['leave_control'])}): the property does not explain the "
        "gap; something that comes with it may."
    )


ANALYSIS = register_analysis(
    Analysis(
        name="attributes",
        params=Params,
        kinds={"attribute_leak": Cause("attribute")},
        needs=frozenset(),  # metadata columns where given, image properties always
        measure=measure,
        flag=attribute_flags,
        evidence_ids=("error_ids",),
        per_class=WORK,
        tests=tests,
    )
)
