"""The CAM engine: every CAM-family method behind one registry (``CAMS``) and two entry points."""

# isort: off
# importing registers the methods; the import order is the order `auditor methods` lists them (CAM first)
from auditor.cams import gradient, activation, perturbation, pixel, transformer  # noqa: F401

# isort: on
from auditor.cams.engine import CamOutput, CamResult, compute_cam, compute_cams
from auditor.cams.registry import CAMS, CamMethod

#: The default ("fast") method set (DESIGN.md §3): gradient methods sharing one forward + one backward.
#: ``cam`` joins them where the head is GAP + one Linear layer (the run decides per model).
FAST_METHODS: tuple[str, ...] = ("grad_cam", "grad_cam_pp", "hires_cam", "layer_cam")

__all__ = ["CAMS", "FAST_METHODS", "CamMethod", "CamOutput", "CamResult", "compute_cam", "compute_cams"]
