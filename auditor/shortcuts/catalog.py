"""Every analysis module; importing this registers them all (the order is the order their flags are built)."""

from auditor.shortcuts import (
    attributes,
    background,
    clusters,
    concepts,
    counterfactual,
    cues,
    hotspots,
    properties,
    reliability,
)

MODULES = (background, hotspots, cues, properties, attributes, counterfactual, clusters, concepts, reliability)
