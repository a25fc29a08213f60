"""auditor: dataset-level shortcut-detection auditor for image classifiers."""

__version__ = "0.1.0"

from auditor.cams import CAMS, compute_cam, compute_cams
from auditor.config import load_config
from auditor.errors import AuditorError, ConfigError, DataError, MethodNotApplicableError, ModelError
from auditor.metrics import METRICS
from auditor.pipeline import run_audit

__all__ = [
    "CAMS",
    "METRICS",
    "AuditorError",
    "ConfigError",
    "DataError",
    "MethodNotApplicableError",
    "ModelError",
    "__version__",
    "compute_cam",
    "compute_cams",
    "load_config",
    "run_audit",
]
