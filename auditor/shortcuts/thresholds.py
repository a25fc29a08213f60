"""Flag thresholds (config key ``thresholds``): the only knobs between a measurement and a verdict."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictInt


class Thresholds(BaseModel):
    """Flag thresholds (config key ``thresholds``). Heuristics, documented in the README."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(0.05, gt=0, lt=1, description="false discovery rate (Benjamini-Hochberg) of every test")
    min_group: StrictInt = Field(5, ge=2, description="smallest group or class tested")
    background_ratio: float = Field(
        1.0,
        gt=0,
        description="flag when the CI of the median mass-on-object / chance ratio lies below this (1 = a uniform map)",
    )
    background_medium: float = 0.8
    background_high: float = 0.5
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
    property_high: float = 0.5
    attribute_gap: float = Field(0.15, gt=0, le=1, description="least accuracy gap of a (class, value) group")
    attribute_medium: float = 0.25
    attribute_high: float = 0.4
    counterfactual_gap: float = Field(0.15, gt=0, le=1, description="least bg-only self - other call-rate gap")
    counterfactual_medium: float = 0.3
    counterfactual_high: float = 0.5
    cluster_min_share: float = Field(0.1, gt=0, le=1)
    cluster_effect: float = Field(
        0.3, gt=0, description="least gap between a cluster's object share (x chance) and its class's"
    )
