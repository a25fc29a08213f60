"""``auditor compare`` at many classes: every delta in the JSON, the HTML limited to what changed."""

from __future__ import annotations

import numpy as np
import pandas as pd

from auditor.outputs.compare import SHOWN_CLASSES, metric_deltas, shown_rows
from auditor.outputs.render import environment

COLUMNS = {"energy_in_mask": {"metric": "energy_in_mask", "direction": "higher"}}


def _tables(classes: int, per_class: int = 8) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Two runs' rows on the same images: run b puts less attention on the object in class c0000 only."""
    names = [f"c{i:04d}" for i in range(classes)]
    labels = np.repeat(names, per_class)
    rng = np.random.default_rng(0)
    a = pd.DataFrame(
        {
            "id": [f"s{i}" for i in range(len(labels))],
            "method": "grad_cam",
            "target": "label",
            "label": labels,
            "energy_in_mask": rng.uniform(0.4, 0.6, len(labels)),
        }
    )
    b = a.copy()
    b["energy_in_mask"] = a["energy_in_mask"] + rng.normal(0, 0.01, len(a)) - 0.3 * (labels == "c0000")
    return a, b, names


def test_every_class_delta_is_computed_and_the_html_lists_those_that_changed() -> None:
    a, b, classes = _tables(60)
    (block,) = metric_deltas(a, b, classes, COLUMNS)
    assert len(block["rows"]) == 61  # the all-classes row and one per class
    worse = [r["cls"] for r in block["rows"] if r["tone"] == "worse"]
    assert "c0000" in worse and "*" in worse
    shown, hidden = shown_rows(block["rows"], len(classes))
    changed = {r["cls"] for r in block["rows"][1:] if r["tone"]}
    assert shown[0]["cls"] == "*" and {r["cls"] for r in shown[1:]} == changed
    assert hidden == 61 - len(shown) and hidden >= 50
    html = (
        environment()
        .get_template("compare.html.j2")
        .render(
            name_a="a", name_b="b", dataset_id="d", n=len(a), flag_changes=[], changed=[], changed_method="-",
            deltas=[{**block, "rows": shown, "hidden": hidden}],
        )
    )  # fmt: skip
    assert f"{hidden} more class rows, whose interval includes 0" in html
    assert html.count("<tr><td>c0") == len(shown) - 1


def test_up_to_the_limit_every_class_row_is_shown() -> None:
    a, b, classes = _tables(SHOWN_CLASSES, per_class=4)
    (block,) = metric_deltas(a, b, classes, COLUMNS)
    assert shown_rows(block["rows"], len(classes)) == (block["rows"], 0)
