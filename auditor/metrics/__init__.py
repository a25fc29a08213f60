"""Metrics: localization (masks/boxes), faithfulness (the model itself) and sanity checks."""

from auditor.metrics import faithfulness, localization  # noqa: F401  (registers the metrics)
from auditor.metrics.localization import max_box_acc
from auditor.metrics.registry import METRICS, Metric, MetricInputs, MetricResult

#: The default ("fast") metric set (DESIGN.md §3): every localization metric on every sample; the
#: faithfulness metrics (average_drop, increase_in_confidence, deletion/insertion) on the ``expensive`` subset.
FAST_METRICS: tuple[str, ...] = (
    "energy_in_mask",
    "energy_outside_mask",
    "pointing_game",
    "relevance_rank_accuracy",
    "mask_iou",
    "box_iou",
    "average_drop",
    "increase_in_confidence",
    "deletion_auc",
    "insertion_auc",
)

__all__ = ["FAST_METRICS", "METRICS", "Metric", "MetricInputs", "MetricResult", "max_box_acc"]
