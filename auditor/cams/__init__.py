"""The CAM engine: every CAM-family method behind one registry (``CAMS``) and two entry points."""

from auditor.cams import gradient, perturbation, pixel  # noqa: F401  (registers the methods)
from auditor.cams.engine import CamOutput, CamResult, compute_cam, compute_cams
from auditor.cams.registry import CAMS, CamMethod

__all__ = ["CAMS", "CamMethod", "CamOutput", "CamResult", "compute_cam", "compute_cams"]
