"""The finer localization layer (``run.localize``): chosen for a coarse target grid, and recognised again when
the config that holds it is read back (a merge, a Ray actor), so every process reads the same layers."""

from __future__ import annotations

import torch
import torchvision

from auditor.config import AuditConfig
from auditor.io.models import LoadedModel
from auditor.run.localize import plan_localization


def _config(**options: object) -> AuditConfig:
    raw = {
        "model": {"arch": "resnet18", "num_classes": 3},
        "data": {"manifest": "audit.csv", "image_size": 64},
        "methods": ["grad_cam", "layer_cam"],
        "method_options": options,
    }
    return AuditConfig.model_validate(raw)


def test_a_resolved_config_read_back_keeps_the_finer_layer() -> None:
    loaded = LoadedModel(torchvision.models.resnet18(num_classes=3).eval(), False, "resnet18")
    probe = torch.zeros(1, 3, 64, 64)
    methods = ["grad_cam", "layer_cam"]
    resolved, info = plan_localization(_config(), loaded, probe, methods)
    assert info["grid"] == [2, 2] and info["fine_layer"] is not None  # 2 x 2 at 64 px: a finer layer is fused
    assert resolved.method_options["layer_cam"]["layers"] == [info["fine_layer"], info["layer"]]
    again, info_again = plan_localization(resolved, loaded, probe, methods)  # what a merge reads back
    assert info_again == info and again.method_options == resolved.method_options
    # layers the user chose are kept, and said to be
    chosen = _config(layer_cam={"layers": ["layer3", "layer4"]})
    _, kept = plan_localization(chosen, loaded, probe, methods)
    assert kept["fine_layer"] is None and "set by the config" in kept["note"]
