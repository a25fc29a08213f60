"""Flag thresholds (config key ``thresholds``): the only knobs between a measurement and a verdict.

Each analysis declares its own parameters (a ``Params`` model in its module, extending :class:`SharedParams`);
the config's flat ``thresholds`` model is all of them (``catalog.Thresholds``). The parameters several
analyses read live here.
"""

from __future__ import annotations

from itertools import pairwise
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt


class SharedParams(BaseModel):
    """The thresholds several analyses read (multiple testing, group sizes, interventions, the object)."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(
        0.05,
        gt=0,
        lt=1,
        description="Benjamini-Hochberg false discovery rate of the run's one family of tests: every test whose "
        "p-value can raise a flag (the maps' hotspot tests, the region and hotspot interventions' paired tests, the "
        "colour shifts' sign tests, the counterfactual's and attributes' Fisher tests, the background Wilcoxon "
        "tests); summary.json analyses.tests lists each with its p and q",
    )
    min_group: StrictInt = Field(5, ge=2, description="smallest group or class tested")
    intervention_effect: float = Field(
        0.05,
        ge=0,
        description="least mean change of p(class) beyond a control box's (paired, per image) that confirms a region "
        "or hotspot by its removal or its transplant",
    )
    intervention_images: StrictInt = Field(
        32, ge=4, description="images of the class, and of other classes, each intervention and colour shift uses"
    )
    high_effect: float = Field(
        0.5,
        gt=0,
        le=1,
        description="an effect comparable to taking the class away, which a high region flag needs: its removal "
        "lowering p(class), or its transplant raising it, by this much beyond the control box, or the transplant "
        "turning this share of other images into the class; weaker confirmed effects grade medium",
    )
    hotspot_object_overlap: float = Field(
        0.5, ge=0, le=1, description="with masks, a region or hotspot more on the objects than this is the object"
    )
    counterfactual_gap: float = Field(
        0.15,
        gt=0,
        le=1,
        description="least gap, object removed, between the share of the class's images still called the class and "
        "the share of other images called it (the null); below it the background does not carry the class, which "
        "also clears background_reliance and global_cue",
    )
    triage: StrictBool = Field(
        True,
        description="run the region scan, border test and colour shifts in full only on classes where a flag is "
        "within reach (some image's p(class) reaches the flag's least effect) and a probe on a few images reaches "
        "half of that effect, and the background graft only on classes some image of which has p(class) of "
        "high_effect; summary.json analyses.triage gives each class left out and why (false: every test on every "
        "class)",
    )
    counterfactual_min_kept: float = Field(
        0.25,
        ge=0,
        lt=1,
        description="least share of the image an object removal must leave to be used (large objects' box "
        "removals take nearly all of it); a class with no such removal is not measured and vetoes nothing",
    )


def ordered(params: BaseModel, *chain: str) -> BaseModel:
    """Raise when the fields of ``chain`` are not in non-decreasing order (a medium level above the high one
    made high unreachable)."""
    values = [getattr(params, k) for k in chain]
    if any(a > b for a, b in pairwise(values)):
        got = ", ".join(f"{k}={v}" for k, v in zip(chain, values, strict=True))
        raise ValueError(f"{' <= '.join(chain)} must hold; got {got}")
    return params


P = TypeVar("P", bound=SharedParams)


def params_of(thresholds: SharedParams, kind: type[P]) -> P:
    """``thresholds`` seen as one analysis's parameters (the config's thresholds hold every analysis's)."""
    if not isinstance(thresholds, kind):
        raise TypeError(f"thresholds {type(thresholds).__name__} lack {kind.__module__}.{kind.__name__}")
    return thresholds
