"""auditor: dataset-level shortcut-detection auditor for image classifiers.

The public API is imported on first use (PEP 562), so ``import auditor.outputs.gate`` (``auditor gate``)
does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from auditor.errors import AuditorError, ConfigError, DataError, MethodNotApplicableError, ModelError
from auditor.version import __version__

if TYPE_CHECKING:  # what type checkers see; at run time the names below load on first use
    from auditor.api import AuditResult, audit
    from auditor.cams import CAMS, compute_cam, compute_cams
    from auditor.config import load_config
    from auditor.metrics import METRICS
    from auditor.run.local import run_audit

_LAZY = {
    "audit": "auditor.api",
    "AuditResult": "auditor.api",
    "CAMS": "auditor.cams",
    "compute_cam": "auditor.cams",
    "compute_cams": "auditor.cams",
    "METRICS": "auditor.metrics",
    "load_config": "auditor.config",
    "run_audit": "auditor.run.local",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'auditor' has no attribute {name!r}")


__all__ = [
    "CAMS",
    "METRICS",
    "AuditResult",
    "AuditorError",
    "ConfigError",
    "DataError",
    "MethodNotApplicableError",
    "ModelError",
    "__version__",
    "audit",
    "compute_cam",
    "compute_cams",
    "load_config",
    "run_audit",
]
