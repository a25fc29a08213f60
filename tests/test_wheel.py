"""The installed wheel, not only the editable checkout: build it, install it apart, run the commands from it.

An editable install reads templates and resources from the source tree, so a file missing from the wheel's
package data passes every other test and breaks ``pip install auditor`` (the report templates once did).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        text=True,
    )
    (found,) = out.glob("auditor-*.whl")
    return found


def test_the_wheel_ships_every_file_of_the_package(wheel: Path) -> None:
    tracked = subprocess.run(["git", "ls-files", "auditor"], cwd=ROOT, capture_output=True, text=True, check=True)
    data = {p for p in tracked.stdout.split() if not p.endswith(".py")}
    assert data, "no package data found: is this a git checkout?"
    shipped = set(zipfile.ZipFile(wheel).namelist())
    assert data <= shipped, f"missing from the wheel: {sorted(data - shipped)}"


@pytest.mark.slow
def test_demo_report_and_gate_run_from_the_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        text=True,
    )
    # the wheel's copy comes first on the path; the working folder is not the checkout
    env = {**os.environ, "PYTHONPATH": str(site)}

    def auditor(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "auditor", *args], cwd=tmp_path, env=env, capture_output=True, text=True
        )

    where = subprocess.run(
        [sys.executable, "-c", "import auditor; print(auditor.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout
    demo = auditor("demo", "--out", "demo")
    assert demo.returncode == 0, demo.stderr[-3000:]
    run = tmp_path / "demo" / "run"
    assert (run / "report.html").stat().st_size > 10_000
    (run / "report.html").unlink()
    report = auditor("report", str(run))
    assert report.returncode == 0 and (run / "report.html").exists(), report.stderr[-3000:]
    gate = auditor("gate", str(run))
    # the demo's model learned the weather: the packaged default rules fail on its high flags
    assert gate.returncode == 1, gate.stdout + gate.stderr
    checks = json.loads((run / "gate.json").read_text())
    assert checks["passed"] is False and any(c["status"] == "FAIL" for c in checks["checks"]), checks
