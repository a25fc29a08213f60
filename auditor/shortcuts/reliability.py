"""``unreliable_method``: a method whose maps survive the randomization of the model's top layers.

The measurement is the run's model-parameter randomization test (``summary.sanity.mprt``, Adebayo et al.
2018, arXiv:1810.03292); this analysis only judges it, and other flags are downgraded when they rest on
such methods alone.
"""

from __future__ import annotations

from auditor.shortcuts.findings import Cause
from auditor.shortcuts.flags import Flag, make_flag
from auditor.shortcuts.registry import Analysis, AnalysisInputs, FlagContext, Measurement, register_analysis


def measure(inputs: AnalysisInputs) -> Measurement:
    return {}  # summary.sanity.mprt holds the numbers


def unreliable_flags(measured: Measurement, ctx: FlagContext) -> list[Flag]:
    """``unreliable_method`` for every method whose maps survive the randomization of the model's top layers."""
    mprt = ctx.mprt
    if not mprt:
        return []
    flags = []
    for m, r in mprt["methods"].items():
        if r["unreliable"]:
            rho = r["spearman"][min(1, len(r["spearman"]) - 1)]
            msg = (
                f"{m}'s maps barely change when the model's top layers are re-initialized (rank correlation "
                f"{rho:.2f}): they reflect the architecture more than what this model learned."
            )
            evidence = {"spearman": r["spearman"], "ssim": r["ssim"], "blocks": mprt["randomized_blocks"]}
            flags.append(make_flag("unreliable_method", None, m, "medium", rho, msg, evidence, [m]))
    return flags


ANALYSIS = register_analysis(
    Analysis(
        name="reliability",
        kinds={"unreliable_method": Cause("method")},
        needs=frozenset({"mprt"}),
        measure=measure,
        flag=unreliable_flags,
    )
)
