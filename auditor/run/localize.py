"""Maps fine enough to localize: when the target layer's grid is coarse for the image, LayerCAM also
reads an earlier, finer layer (multi-layer fusion), so the spatial analyses can say *where*.

At 64 px a ResNet's last block gives a 2 x 2 map: no hotspot can exist and "energy in mask" sits at
chance for every class. LayerCAM's fusion of a shallow and a deep layer (Jiang et al. 2021, Eq. 9) keeps
the deep layer's class sensitivity at the shallow layer's resolution.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import Tensor

from auditor.cams import CAMS
from auditor.cams.layers import finer_layer, resolve_layer
from auditor.config import AuditConfig
from auditor.io.models import LoadedModel

log = logging.getLogger("auditor")
MIN_SIDE = 7


def plan_localization(
    cfg: AuditConfig, loaded: LoadedModel, probe: Tensor, methods: list[str]
) -> tuple[AuditConfig, dict[str, Any]]:
    """Add a finer layer to LayerCAM when the target layer's grid is under 7 x 7 (``localization: auto``).

    Returns:
        ``(config, info)``; ``info`` (``summary.json`` ``run.localization``) = ``{layer, grid, fine_layer,
        method, note}``; the config gains ``method_options.layer_cam.layers = [fine, target]`` when a
        finer layer is used (so ``config.resolved.yaml`` and resume see it).
    """
    info: dict[str, Any] = {"layer": None, "grid": None, "fine_layer": None, "method": None, "note": ""}
    if loaded.scripted:
        return cfg, info | {"note": "TorchScript model: no layer can be read"}
    layer = cfg.model.target_layer
    if not any(CAMS[m].needs != "nothing" for m in methods):
        return cfg, info | {"note": "no method reads a layer"}
    if isinstance(layer, list):
        return cfg, info | {"note": "several target layers named: kept as configured"}
    name = resolve_layer(loaded.module, layer, probe)
    grid, fine = finer_layer(loaded.module, probe, name, MIN_SIDE)
    info |= {"layer": name, "grid": list(grid)}
    if min(grid) >= MIN_SIDE:
        return cfg, info
    log.warning(
        "the target layer %r gives %dx%d maps at %d px: too coarse to say where in the image a class's evidence is",
        name,
        grid[0],
        grid[1],
        cfg.data.image_size,
    )
    if cfg.localization == "off":
        return cfg, info | {"note": "localization: off"}
    if "layer_cam" not in methods:
        return cfg, info | {"note": "layer_cam is not among the methods: no finer map"}
    chosen = info | {"fine_layer": fine, "method": "layer_cam"}
    if "layers" in cfg.method_options.get("layer_cam", {}):
        if fine is not None and list(cfg.method_options["layer_cam"]["layers"]) == [fine, name]:
            return cfg, chosen  # this rule's own choice, read back from a resolved config (merge, Ray actors)
        return cfg, info | {"note": "method_options.layer_cam.layers set by the config: kept"}
    if fine is None:
        return cfg, info | {"note": "no earlier layer has a finer grid"}
    log.warning("LayerCAM also reads %r and fuses it with %r for a finer map", fine, name)
    options = {**cfg.method_options, "layer_cam": {**cfg.method_options.get("layer_cam", {}), "layers": [fine, name]}}
    return cfg.model_copy(update={"method_options": options}), chosen
