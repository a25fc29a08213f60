"""Every analysis module; importing this registers them all (the order is the order their flags are built)."""

from auditor.shortcuts import attributes, background, clusters, counterfactual, hotspots, reliability

MODULES = (background, hotspots, attributes, counterfactual, clusters, reliability)
