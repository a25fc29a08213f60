"""Oracle tests of the pieces behind realistic detection: margins, the rim leak, the region scan, colour
shifts, finer layers, and the grouping of flags into findings (closed-form answers on toy inputs)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from auditor.cams.layers import finer_layer, resolve_layer
from auditor.outputs.render import overlay
from auditor.outputs.report import _timing
from auditor.shortcuts import cues, windows
from auditor.shortcuts.catalog import Thresholds
from auditor.shortcuts.catalog import group_by_cause as group_findings
from auditor.shortcuts.flags import make_flag
from auditor.shortcuts.interventions import occlusion_scan, shift_intervention
from auditor.shortcuts.probes import box_masks, counterfactuals, flat_fill, margin_masks
from auditor.shortcuts.removals import counterfactual_summary
from tests.pipeline.tinynet import DeepNet

T = Thresholds()


def test_margin_grows_with_the_object_and_never_below_two_pixels() -> None:
    masks = torch.zeros(3, 64, 64, dtype=torch.bool)
    masks[0, 10:15, 10:15] = True  # area 25: 0.25 * 5 = 1.25 -> at least 2 px
    masks[1, 10:50, 10:50] = True  # area 1600: 0.25 * 40 = 10 px
    grown = margin_masks(masks)
    assert grown[0].sum() == 9 * 9 and grown[0, 8:17, 8:17].all()
    assert grown[1].sum() == 60 * 60 and grown[1, 0:60, 0:60].all()
    assert not grown[2].any()  # an empty mask stays empty


def test_box_and_flat_fill() -> None:
    masks = torch.zeros(1, 8, 8, dtype=torch.bool)
    masks[0, 1, 1:6] = True
    masks[0, 1:5, 1] = True  # an L
    box = box_masks(masks)
    assert box[0].sum() == 4 * 5 and box[0, 1:5, 1:6].all()
    images = torch.zeros(1, 3, 8, 8)
    images[:, 0] = 0.5
    images[0, :, 1:5, 1:6] = 9.0  # the object, to be removed
    filled = flat_fill(images, box)
    assert torch.allclose(filled[0, 0], torch.full((8, 8), 0.5)) and torch.allclose(filled[0, 1:], torch.zeros(2, 8, 8))


class _Red(nn.Module):
    """Class 1 when any pixel is red (R > 0.5 with G, B < 0.2): a model that reads only the object's colour."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        red = ((x[:, 0] > 0.5) & (x[:, 1] < 0.2) & (x[:, 2] < 0.2)).flatten(1).float().amax(1)
        return torch.stack([1 - red, red], 1) * 10


def test_a_rim_left_by_an_eroded_mask_fakes_background_reliance_only_without_a_margin() -> None:
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    disc = (yy - 16) ** 2 + (xx - 16) ** 2 <= 36
    eroded = (yy - 16) ** 2 + (xx - 16) ** 2 <= 16  # the mask misses a 2 px rim
    x = torch.full((1, 3, 32, 32), 0.4)
    x[0, :, disc] = torch.tensor([0.9, 0.05, 0.05])[:, None]
    cf = counterfactuals(_Red(), x, eroded[None], torch.tensor([1]), torch.tensor([True]), None)
    assert cf["cf_bg_pred"].tolist() == [1]  # the rim is still red: "the background" calls the class
    for version in ("bg_margin", "bg_box", "bg_flat"):
        assert cf[f"cf_{version}_pred"].tolist() == [0], version  # a margin takes the rim away


def test_counterfactual_evidence_is_the_weakest_margin_version() -> None:
    rows = []
    for i in range(20):
        label = "a" if i < 10 else "b"
        rows.append(
            {"id": str(i), "label": label, "pred": label, "correct": True, "cf_fg_pred": label,
             "cf_bg_pred": label, "cf_bg_margin_pred": label, "cf_bg_box_pred": label,
             "cf_bg_flat_pred": label if i % 2 == 0 else "b", "cf_mix_pred": "", "cf_mix_bg_label": ""}
        )  # fmt: skip
    res = counterfactual_summary(pd.DataFrame(rows), ["a", "b"])["a"]
    assert res["weakest"] == "bg_flat" and res["bg_only_self"] == 0.5 and res["versions"]["bg_box"]["self"] == 1.0


def test_scan_geometry_and_region() -> None:
    boxes = windows.grid_boxes(0.25, 0.125)
    assert len(boxes) == 49 and boxes[0] == [0.0, 0.0, 0.25, 0.25] and boxes[-1] == [0.75, 0.75, 1.0, 1.0]
    # a cue in the cell [0, 0.125] x [0.875, 1]: every window covering it drops by 1, the others by 0
    drops = np.array([[1.0 if b[0] < 0.125 and b[3] > 0.875 else 0.0 for b in boxes]] * 5)
    found = cues.scan_summary(drops, boxes, 0.15)
    assert found["peak"] == 1.0 and found["baseline"] == 0.0 and found["consistency"] == 1.0
    region = windows.locate(windows.importance(boxes, drops[0]))
    assert region[0] == 0.0 and region[3] == 1.0 and region[2] <= 0.25 and region[1] >= 0.75
    assert cues.control_box([0.0, 0.75, 0.25, 1.0]) == [0.75, 0.0, 1.0, 0.25]  # mirrored through the centre
    central = cues.control_box([0.4, 0.4, 0.6, 0.6])
    assert central[0] >= 0.6 or central[2] <= 0.4 or central[1] >= 0.6 or central[3] <= 0.4  # moved off it


class _TopLeft(nn.Module):
    """Class 0 logit = 8 * mean of the top-left 4 x 4 patch - 2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = 8 * x[:, :, :4, :4].mean((1, 2, 3)) - 2
        return torch.stack([s, torch.zeros_like(s)], 1)


def test_occlusion_scan_drops_only_where_the_tag_is() -> None:
    x = torch.zeros(3, 3, 16, 16)
    x[:, :, :4, :4] = 1.0
    boxes = [[0.0, 0.0, 0.25, 0.25], [0.75, 0.75, 1.0, 1.0]]
    drops = occlusion_scan(_TopLeft(), x, 0, boxes)
    assert drops.shape == (3, 2) and (drops[:, 0] > 0.8).all() and np.allclose(drops[:, 1], 0, atol=1e-6)


def test_occlusion_scan_reads_each_image_for_its_own_class() -> None:
    # class 1's p rises where class 0's falls: filling the tag lowers p(0) and raises p(1) by the same
    x = torch.zeros(4, 3, 16, 16)
    x[:, :, :4, :4] = 1.0
    boxes = [[0.0, 0.0, 0.25, 0.25], [0.75, 0.75, 1.0, 1.0]]
    each = occlusion_scan(_TopLeft(), x, [0, 1, 1, 0], boxes, chunk=3)  # chunks that split the box-major copies
    assert np.allclose(each[[0, 3]], occlusion_scan(_TopLeft(), x[[0, 3]], 0, boxes), atol=1e-6)
    assert np.allclose(each[[1, 2]], occlusion_scan(_TopLeft(), x[[1, 2]], 1, boxes), atol=1e-6)
    assert (each[[1, 2], 0] < -0.8).all()


class _Blue(nn.Module):
    """Class 1 when the image's mean blue exceeds its mean red."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x[:, 2].mean((1, 2)) - x[:, 0].mean((1, 2))
        return torch.stack([-d, d], 1) * 50


def test_a_model_that_follows_colour_follows_the_shift_but_not_its_control() -> None:
    blue = torch.rand(8, 3, 8, 8) * 0.2 + torch.tensor([0.3, 0.4, 0.6])[:, None, None]
    red = torch.rand(8, 3, 8, 8) * 0.2 + torch.tensor([0.6, 0.4, 0.3])[:, None, None]
    images = torch.cat([blue, red])
    res = shift_intervention(
        _Blue(), lambda rows: images[list(rows)], range(8), range(8, 16), 1, [0.3, 0.0, -0.3],
        to_pixels=lambda x: x, from_pixels=lambda x: x,
    )  # fmt: skip
    whole = res["whole"]
    assert res["outside"] is None
    assert whole["leave"] == 1.0 and whole["leave_control"] == 0.0 and whole["leave_p"] < 0.01
    assert whole["flip"] == 1.0 and whole["flip_control"] == 0.0 and whole["flip_p"] < 0.01


class _BlueObject(nn.Module):
    """Class 1 when the centre 4 x 4 patch (the object) is bluer than red: it reads only the object."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x[:, 2, 2:6, 2:6].mean((1, 2)) - x[:, 0, 2:6, 2:6].mean((1, 2))
        return torch.stack([-d, d], 1) * 50


def test_an_object_colour_model_does_not_follow_a_shift_that_spares_the_object() -> None:
    images = torch.full((16, 3, 8, 8), 0.45)
    images[:8, :, 2:6, 2:6] = torch.tensor([0.3, 0.3, 0.7])[:, None, None]  # blue objects: class 1
    images[8:, :, 2:6, 2:6] = torch.tensor([0.7, 0.3, 0.3])[:, None, None]  # red objects: class 0
    obj = torch.zeros(8, 8, dtype=torch.bool)
    obj[2:6, 2:6] = True
    res = shift_intervention(
        _BlueObject(), lambda rows: images[list(rows)], range(8), range(8, 16), 1, [0.45, 0.0, -0.45],
        to_pixels=lambda x: x, from_pixels=lambda x: x, keep=lambda rows: obj.expand(len(rows), 8, 8),
    )  # fmt: skip
    assert res["whole"]["leave"] == 1.0 and res["whole"]["flip"] == 1.0  # the object's colour moved too
    assert res["outside"]["leave"] == 0.0 and res["outside"]["flip"] == 0.0 and res["outside"]["kept"] == 0.25


def test_finer_layer_for_coarse_grids_only() -> None:
    model = DeepNet(6, blocks=5).eval()
    x = torch.zeros(1, 3, 64, 64)
    layer = resolve_layer(model, None, x)
    assert finer_layer(model, x, layer) == ((4, 4), "features.14")  # the 8 x 8 block before the last
    assert finer_layer(model, torch.zeros(1, 3, 128, 128), layer) == ((8, 8), None)  # fine enough


def _flag(kind: str, cls: str | None, sev: str, region: list[float] | None = None, attr: str | None = None) -> dict:
    return make_flag(kind, cls, attr, sev, 0.5, f"{kind} on {cls}", {}, (), region)  # type: ignore[return-value]


def test_flags_that_share_a_cause_become_one_finding() -> None:
    flags = [
        _flag("region_cue", "tagged", "high", [0.05, 0.75, 0.2, 0.9]),
        _flag("spatial_hotspot", "tagged", "medium", [0.0, 0.6, 0.35, 0.9]),
        _flag("counterfactual_background", "tagged", "high"),
        _flag("attribute_leak", "tank", "high", attr="weather"),
        _flag("attribute_leak", "truck", "medium", attr="weather"),
        _flag("background_reliance", "disc", "medium"),
        _flag("counterfactual_background", "square", "high"),
        _flag("global_cue", "dusk", "high", attr="brightness"),
        _flag("counterfactual_background", "dusk", "high"),
    ]
    findings = group_findings(flags)  # type: ignore[arg-type]
    by_cause = {(f["cause"], tuple(f["classes"])): f for f in findings}
    assert set(by_cause) == {
        ("region", ("tagged",)),
        ("attribute", ("tank", "truck")),
        ("background", ("disc", "square")),
        ("property", ("dusk",)),
    }
    region = by_cause[("region", ("tagged",))]
    assert region["region"] == [0.05, 0.75, 0.2, 0.9] and region["severity"] == "high" and len(region["flags"]) == 3
    assert "bottom-left corner" in region["sentence"]
    assert by_cause[("property", ("dusk",))]["flags"] == [
        "global_cue/dusk/brightness",
        "counterfactual_background/dusk/*",
    ]
    assert by_cause[("attribute", ("tank", "truck"))]["attribute"] == "weather"
    # two classes' regions at the same place (IoU >= 0.3) are one cause; far apart, two
    same = [_flag("region_cue", "a", "high", [0, 0, 0.2, 0.2]), _flag("region_cue", "b", "high", [0, 0, 0.2, 0.25])]
    apart = [_flag("region_cue", "a", "high", [0, 0, 0.2, 0.2]), _flag("region_cue", "b", "high", [0.8, 0.8, 1, 1])]
    assert len(group_findings(same)) == 1 and len(group_findings(apart)) == 2  # type: ignore[arg-type]


def test_overlay_leaves_the_image_where_the_map_is_low() -> None:
    dark = np.full((16, 16, 3), 10, np.uint8)
    low = np.zeros((4, 4), np.float32)
    low[0, 0] = 1.0
    out = overlay(dark, low)
    assert (out[12:, 12:] == 10).all()  # no colour cast over the cold part of a dark image
    assert out[0, 0].max() > 100  # the hot corner stands out


@pytest.mark.parametrize(
    ("key", "value", "want"),
    [("total_s", 12.34, ("total", "12.3 s")), ("analyses", 0.0123, ("analyses", "12 ms")),
     ("images_per_s_this_session", 17.9, ("images per second this session", "17.9 images/s"))],
)  # fmt: skip
def test_timings_carry_units(key: str, value: float, want: tuple[str, str]) -> None:
    assert _timing(key, value) == want


def test_a_model_that_calls_everything_one_class_gets_no_background_flag() -> None:
    """Its null pool (images it does not call the class) is empty: the null falls back to other classes'
    images, whose backgrounds also call the class, so there is no gap."""
    from auditor.shortcuts.counterfactual import counterfactual_flags
    from auditor.shortcuts.registry import FlagContext

    rows = [
        {"id": str(i), "label": "a" if i < 10 else "b", "pred": "a", "correct": i < 10, "cf_fg_pred": "a",
         "cf_bg_pred": "a", "cf_bg_margin_pred": "a", "cf_bg_box_pred": "a", "cf_bg_flat_pred": "a",
         "cf_mix_pred": "", "cf_mix_bg_label": ""}
        for i in range(20)
    ]  # fmt: skip
    res = counterfactual_summary(pd.DataFrame(rows), ["a", "b"])
    assert res["a"]["versions"]["bg_margin"]["null"] == "label" and res["a"]["gap"] == 0.0
    assert counterfactual_flags({"counterfactual": res}, FlagContext(T)) == []


def _sentence_of(*flags: dict) -> str:  # type: ignore[type-arg]
    (finding,) = group_findings(list(flags))  # type: ignore[arg-type]
    return str(finding["sentence"])


def test_a_finding_says_no_more_than_its_evidence() -> None:
    box = [0.05, 0.75, 0.2, 0.9]
    masked = make_flag("region_cue", "tagged", None, "high", 1.0, "m", {"object_overlap": 0.05}, (), box)
    unmasked = make_flag("region_cue", "tagged", None, "high", 1.0, "m", {"object_overlap": float("nan")}, (), box)
    weak = make_flag("region_cue", "tagged", None, "low", 0.2, "m", {"object_overlap": 0.05}, (), box)
    # "not by the object" only where masks measured the region off the objects
    assert "recognises tagged by" in _sentence_of(masked) and "not by the object" in _sentence_of(masked)
    assert "not by the object" not in _sentence_of(unmasked) and "no masks" in _sentence_of(unmasked)
    # a low finding never says the model recognises the class by it
    assert "recognises" not in _sentence_of(weak)
    assert _sentence_of(weak).startswith("Weak evidence: the model may tell tagged apart by the bottom-left")
    # maps alone say where the maps point, never what the model uses
    maps_only = _sentence_of(_flag("background_reliance", "disc", "medium"))
    assert maps_only.startswith("The maps of disc point to the background") and "recognises" not in maps_only
    low = _sentence_of(_flag("concept", "disc", "low", attr="concept 1"), _flag("background_reliance", "disc", "low"))
    assert "weak evidence" in low and "recognises" not in low
    # the object removed and the class still called: an intervention, and the sentence may say so
    assert "recognises square from the background" in _sentence_of(_flag("counterfactual_background", "square", "high"))
    assert "recognises" not in _sentence_of(_flag("global_cue", "dusk", "low", attr="colour"))
    # an attribute finding says what kind of attribute leads it
    prop = make_flag("attribute_leak", "a", "brightness", "high", 0.5, "m", {"kind": "property"})
    meta = make_flag("attribute_leak", "a", "sky", "high", 0.5, "m", {"kind": "metadata"})
    assert "follow the image property 'brightness'" in _sentence_of(prop)
    assert "follow the metadata attribute 'sky'" in _sentence_of(meta)
