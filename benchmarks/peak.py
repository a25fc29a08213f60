"""Peak resident memory of a child process, measured so that the parent's memory is not counted.

``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` is wrong for this on Linux: a child started by
``subprocess`` keeps the high-water mark of the address space it had before ``exec``, which is the parent's.
A child of a parent holding 2 GB reports 2 GB even when it never uses more than 10 MB (measured here:
2,074 MiB against a ``VmHWM`` of 11 MiB). Each command runs under a small wrapper process instead, whose
own children's ``ru_maxrss`` carries only the wrapper's few MiB on top; or, in a child that is our own
code, ``VmHWM`` of ``/proc/self/status``, which counts only the address space after ``exec``.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

WRAP = (
    "import resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[2:])\n"
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "sys.exit(done.returncode)\n"
)


def wrapped(cmd: list[str], peak_file: Path) -> list[str]:
    """``cmd`` run under the wrapper, which writes the command's peak RSS (KiB) to ``peak_file``."""
    return [sys.executable, "-c", WRAP, str(peak_file), *cmd]


def peak_mib(peak_files: list[Path]) -> float:
    """The largest peak RSS (MiB) the wrapped commands wrote."""
    return max(int(p.read_text()) for p in peak_files) / 1024


def own_peak_mib() -> float:
    """This process's peak RSS (MiB) since it started its program (``VmHWM``; ``ru_maxrss`` off Linux)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
