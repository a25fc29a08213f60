"""auditor: dataset-level shortcut-detection auditor for image classifiers."""

from auditor.cams import CAMS, compute_cam, compute_cams
from auditor.errors import AuditorError, ConfigError, DataError, MethodNotApplicableError, ModelError

__version__ = "0.1.0"

__all__ = [
    "CAMS",
    "AuditorError",
    "ConfigError",
    "DataError",
    "MethodNotApplicableError",
    "ModelError",
    "__version__",
    "compute_cam",
    "compute_cams",
]
