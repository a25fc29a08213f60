"""The README's tables follow the registries: the thresholds table is generated from the analyses' ``Params``
(``AUDITOR_UPDATE_README=1`` rewrites it), and the method, metric and flag-kind tables name exactly the
registered names, with the registry's family and direction. A name added, renamed or removed without its
row fails here."""

from __future__ import annotations

import os
import re
from pathlib import Path

from auditor.cams import CAMS
from auditor.metrics import METRICS
from auditor.shortcuts.catalog import Thresholds, registered, thresholds_table

README = Path(__file__).parents[1] / "README.md"
START, END = "<!-- thresholds:start -->\n", "<!-- thresholds:end -->"


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    nxt = re.search(r"^#{2,3} ", text[start + len(heading) :], re.M)
    return text[start : start + len(heading) + (nxt.start() if nxt else len(text))]


def _rows(section: str) -> list[list[str]]:
    """The cells of the first markdown table's body rows whose first cell names something in backticks."""
    return [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("| `")
    ]


def _names(cell: str) -> list[str]:
    return re.findall(r"`([a-z0-9_]+)`", cell)


def test_the_thresholds_table_is_generated_from_the_analyses_params() -> None:
    text = README.read_text()
    table = thresholds_table()
    if os.environ.get("AUDITOR_UPDATE_README"):
        text = text[: text.index(START) + len(START)] + table + text[text.index(END) :]
        README.write_text(text)
    assert text[text.index(START) + len(START) : text.index(END)] == table
    for name, info in Thresholds.model_fields.items():
        assert info.description, f"threshold {name} has no description for the README"


def test_the_method_table_names_every_registered_method_with_its_family() -> None:
    rows = _rows(_section(README.read_text(), "## CAM methods"))
    assert sorted(_names(r[0])[0] for r in rows) == sorted(CAMS.names())
    for r in rows:
        assert r[1] == CAMS[_names(r[0])[0]].family, r[0]


def test_the_metric_table_names_every_registered_metric_with_its_direction() -> None:
    rows = _rows(_section(README.read_text(), "## Metrics"))
    named = {n: r for r in rows for n in _names(r[0])}
    assert set(named) == set(METRICS.names())
    for r in rows:
        names, better = _names(r[0]), re.split(r"\s*[/,]\s*", r[1])
        assert len(better) in (1, len(names)), r[0]
        for n, b in zip(names, better * len(names) if len(better) == 1 else better, strict=True):
            assert b == METRICS[n].direction, (n, b)


def test_the_flag_table_names_every_registered_kind() -> None:
    rows = _rows(_section(README.read_text(), "### What each kind needs, and how it guards against false alarms"))
    assert sorted(_names(r[0])[0] for r in rows) == sorted(k for a in registered() for k in a.kinds)


def test_the_readme_screenshot_was_taken_with_the_current_report_template() -> None:
    """``docs/report.png`` records the template it shows; a changed template needs a new picture."""
    import hashlib
    import json

    root = Path(__file__).parents[1]
    template = root / "auditor" / "outputs" / "templates" / "report.html.j2"
    record = json.loads((root / "docs" / "report.png.json").read_text())
    assert record["template_sha256"] == hashlib.sha256(template.read_bytes()).hexdigest(), (
        "the report template changed after docs/report.png was taken: run python docs/make_screenshot.py"
    )
