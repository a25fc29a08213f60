"""Flag thresholds (config key ``thresholds``): the only knobs between a measurement and a verdict."""

from __future__ import annotations

from itertools import pairwise
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator


class Thresholds(BaseModel):
    """Flag thresholds (config key ``thresholds``). Heuristics, documented in the README."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="Benjamini-Hochberg false discovery rate of the run's one family: every test whose p-value can "
        "raise a flag (summary analyses.tests)",
    )
    min_group: StrictInt = Field(5, ge=2, description="smallest group or class tested")
    background_ratio: float = Field(
        1.0,
        gt=0,
        description="flag when the CI of the median mass-on-object / chance ratio lies below this (1 = a uniform map)",
    )
    background_medium: float = Field(0.8, gt=0, description="medium at or below this ratio")
    background_high: float = Field(0.5, gt=0, description="high at or below this ratio")
    hotspot_lift: float = Field(2.0, gt=1, description="class mass in the region / other classes' mass there")
    hotspot_concentration: float = Field(
        2.0, gt=1, description="class mass in the region / the region's share of the image (uniform map: 1)"
    )
    hotspot_max_area: float = Field(0.15, gt=0, le=1, description="largest region (share of the image)")
    hotspot_persistence: float = Field(0.5, gt=0, le=1, description="share of the class's maps hot in the region")
    hotspot_object_overlap: float = Field(0.5, ge=0, le=1, description="regions mostly on the object are not flagged")
    intervention_effect: float = Field(0.05, ge=0, description="least mean probability change that confirms a hotspot")
    intervention_images: StrictInt = Field(32, ge=4)
    cue_images: StrictInt = Field(
        12, ge=0, description="images per class scanned for a region cue (mask-free); 0 turns the scan off"
    )
    cue_window: float = Field(0.25, gt=0, le=0.5, description="side of the scan's windows (share of the image side)")
    cue_drop: float = Field(
        0.15, gt=0, le=1, description="least median p(class) drop at a place, above the class's other places"
    )
    concept_images: StrictInt = Field(
        16, ge=0, description="images per class whose activations are factorized into concepts (DFF); 0 = off"
    )
    concept_count: StrictInt = Field(4, ge=1, description="concepts fitted per class")
    concept_share: float = Field(
        0.25, gt=0, le=1, description="least share of the class's attention a flagged concept carries (medium: 2x)"
    )
    concept_on_ratio: float = Field(
        0.5, ge=0, lt=1, description="most heat a flagged concept puts on the object, as a multiple of chance"
    )
    property_effect: float = Field(
        0.25,
        gt=0,
        le=1,
        description="least share of images that follow a colour shift beyond the opposite shift (global_cue)",
    )
    property_high: float = Field(0.5, gt=0, le=1, description="high when the whole-image effect reaches this")
    attribute_gap: float = Field(0.15, gt=0, le=1, description="least accuracy gap of a (class, value) group")
    attribute_medium: float = Field(0.25, gt=0, le=1, description="medium from this accuracy gap")
    attribute_high: float = Field(0.4, gt=0, le=1, description="high from this accuracy gap")
    counterfactual_gap: float = Field(0.15, gt=0, le=1, description="least bg-only self - other call-rate gap")
    counterfactual_medium: float = Field(0.3, gt=0, le=1, description="medium from this gap")
    counterfactual_high: float = Field(0.5, gt=0, le=1, description="high from this gap")
    counterfactual_min_kept: float = Field(
        0.25,
        ge=0,
        lt=1,
        description="least share of the image an object removal must leave to be used (large objects' box "
        "removals take nearly all of it); a class with no such removal is not measured and vetoes nothing",
    )
    cluster_min_share: float = Field(0.1, gt=0, le=1)
    cluster_effect: float = Field(
        0.3, gt=0, description="least gap between a cluster's object share (x chance) and its class's"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        """Severity levels in order (a medium level above the high one made high unreachable) and a scan that
        can call a place common to a class's images (under 4 images it was silently off)."""
        problems = []
        if 0 < self.cue_images < 4:
            problems.append(f"cue_images must be 0 (the scan off) or at least 4; got {self.cue_images}")
        for chain in (
            ("background_high", "background_medium", "background_ratio"),  # ratios: lower is worse
            ("property_effect", "property_high"),
            ("attribute_gap", "attribute_medium", "attribute_high"),
            ("counterfactual_gap", "counterfactual_medium", "counterfactual_high"),
        ):
            values = [getattr(self, k) for k in chain]
            if any(a > b for a, b in pairwise(values)):
                got = ", ".join(f"{k}={v}" for k, v in zip(chain, values, strict=True))
                problems.append(f"{' <= '.join(chain)} must hold; got {got}")
        if problems:
            raise ValueError("; ".join(problems))
        return self
