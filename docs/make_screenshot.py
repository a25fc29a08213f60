"""Regenerate ``docs/report.png`` (the README's picture) from the current ``auditor demo``'s report.

    python docs/make_screenshot.py        # about a minute on 2 CPU cores; needs Debian's chromium

It runs the demo, captures its report in headless Chromium (``auditor screenshot``, the browser test's code) and
records the SHA-256 of the report template it was rendered with in ``docs/report.png.json``:
``tests/test_readme_tables.py`` fails when the template has changed since, so the picture cannot go stale.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent
TEMPLATE = DOCS.parent / "auditor" / "outputs" / "templates" / "report.html.j2"
SHOT = DOCS / "report.png"
RECORD = DOCS / "report.png.json"


def template_sha256() -> str:
    """The SHA-256 of the report template."""
    return hashlib.sha256(TEMPLATE.read_bytes()).hexdigest()


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "auditor", "demo", "--out", tmp], check=True)
        subprocess.run([sys.executable, "-m", "auditor", "screenshot", f"{tmp}/run/report.html", str(SHOT)], check=True)
    RECORD.write_text(json.dumps({"template_sha256": template_sha256()}, indent=1) + "\n")
    print(f"wrote {SHOT} and {RECORD}")


if __name__ == "__main__":
    main()
