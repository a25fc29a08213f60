"""Localization metrics against hand-computed values, including empty-mask, zero-map and single-pixel cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from auditor.metrics import METRICS, MetricInputs, max_box_acc
from auditor.metrics.localization import box_iou_matrix, boxes_from_mask

MASK_METRICS = [n for n, m in METRICS.items() if m.needs == "mask"]


def _run(
    name: str,
    maps: torch.Tensor,
    masks: torch.Tensor,
    scale: torch.Tensor | None = None,
    boxes: list[torch.Tensor] | None = None,
    **options: object,
) -> tuple[list[float], dict]:
    inputs = MetricInputs(maps=maps.float(), masks=masks.bool(), scale=scale, boxes=boxes)
    res = METRICS[name](inputs, **options)
    return res.value.tolist(), {k: v.tolist() for k, v in res.extras.items()}


def test_energy_in_and_outside_mask() -> None:
    maps = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    masks = torch.tensor([[[1, 0], [0, 1]]])
    value, extra = _run("energy_in_mask", maps, masks)
    assert value == [pytest.approx(0.5)] and extra["energy_in_mask_chance"] == [0.5]
    value, extra = _run("energy_outside_mask", maps, torch.tensor([[[1, 1], [1, 0]]]))
    assert value == [pytest.approx(0.4)] and extra["energy_outside_mask_chance"] == [pytest.approx(0.25)]


@pytest.mark.parametrize("name", MASK_METRICS)
def test_empty_mask_and_zero_map_are_nan_never_a_hit(name: str) -> None:
    maps = torch.stack([torch.rand(6, 6) + 0.1, torch.zeros(6, 6)])
    masks = torch.zeros(2, 6, 6, dtype=torch.bool)
    masks[1, 2, 2] = True
    value, extra = _run(name, maps, masks)
    assert math.isnan(value[0])  # empty mask
    assert math.isnan(value[1])  # zero map
    for key, col in extra.items():
        if key.endswith("_chance"):
            assert math.isnan(col[0]) and not math.isnan(col[1])


def test_single_pixel_map_inside_single_pixel_mask() -> None:
    maps = torch.zeros(1, 8, 8)
    maps[0, 3, 5] = 2.0
    masks = torch.zeros(1, 8, 8, dtype=torch.bool)
    masks[0, 3, 5] = True
    for name in ("energy_in_mask", "pointing_game", "relevance_rank_accuracy", "mask_iou", "box_iou"):
        assert _run(name, maps, masks)[0] == [pytest.approx(1.0)], name
    assert _run("energy_outside_mask", maps, masks)[0] == [pytest.approx(0.0)]


def test_pointing_game_tolerance_is_strict_and_scaled() -> None:
    maps = torch.zeros(1, 10, 10)
    maps[0, 2, 2] = 1.0
    masks = torch.zeros(1, 10, 10, dtype=torch.bool)
    masks[0, 2, 6] = True  # distance 4 from the peak
    assert _run("pointing_game", maps, masks, tolerance=5.0)[0] == [1.0]
    assert _run("pointing_game", maps, masks, tolerance=4.0)[0] == [0.0]  # strict <
    assert _run("pointing_game", maps, masks, tolerance=8.0, scale=torch.tensor([0.5]))[0] == [0.0]
    assert _run("pointing_game", maps, masks, tolerance=8.0, scale=torch.tensor([0.6]))[0] == [1.0]
    _, extra = _run("pointing_game", maps, masks, tolerance=1.5)
    assert extra["pointing_game_chance"] == [pytest.approx(9 / 100)]  # the 3x3 block around the pixel


def test_rank_accuracy_and_mask_iou() -> None:
    maps = torch.arange(16.0).view(1, 4, 4)  # pixel 15 highest, then 14, 13
    masks = torch.zeros(1, 16, dtype=torch.bool)
    masks[0, [15, 14, 0]] = True
    masks = masks.view(1, 4, 4)
    assert _run("relevance_rank_accuracy", maps, masks)[0] == [pytest.approx(2 / 3)]
    assert _run("mask_iou", maps, masks)[0] == [pytest.approx(2 / (6 - 2))]
    _, extra = _run("mask_iou", maps, masks)
    a = 3 / 16
    assert extra["mask_iou_chance"] == [pytest.approx(a / (2 - a))]


def test_ties_do_not_favour_the_top_left_corner() -> None:
    maps = torch.ones(200, 8, 8)  # one plateau: every pixel ties
    masks = torch.zeros(200, 8, 8, dtype=torch.bool)
    masks[:, 0, 0] = True  # the corner memory-order ranking would pick
    hits = _run("pointing_game", maps, masks, tolerance=0.5)[0]
    assert sum(hits) == 0


def test_boxes_and_box_iou() -> None:
    mask = np.zeros((8, 10), dtype=bool)
    mask[1:3, 1:4] = True
    mask[5:8, 6:10] = True
    np.testing.assert_array_equal(boxes_from_mask(mask), [[1, 1, 4, 3], [6, 5, 10, 8]])
    iou = box_iou_matrix(np.array([[0.0, 0.0, 4.0, 4.0]]), np.array([[2.0, 0.0, 6.0, 4.0]]))
    assert iou[0, 0] == pytest.approx(8 / 24)
    maps = torch.zeros(1, 8, 10)
    maps[0, 2:6, 3:7] = 1.0  # predicted box x 3..7, y 2..6
    value, extra = _run("box_iou", maps, torch.ones(1, 8, 10), boxes=[torch.tensor([[3.0, 2.0, 9.0, 6.0]])])
    assert value == [pytest.approx(16 / 24)]
    assert len(extra["box_iou_curve"][0]) == 20


def test_max_box_acc_v2() -> None:
    curves = np.array([[0.2, 0.6], [0.8, 0.4], [np.nan, np.nan]])
    # delta 0.3 -> best threshold gives 1.0; 0.5 -> 0.5; 0.7 -> 0.5
    assert max_box_acc(curves) == pytest.approx((1.0 + 0.5 + 0.5) / 3)
    assert math.isnan(max_box_acc(np.full((2, 3), np.nan)))


@pytest.mark.parametrize("radius", [0.5, 1.5, 4.2, 10.0, 15.0])
def test_disk_reach_fft_equals_direct_convolution(radius: float) -> None:
    from auditor.metrics.localization import disk_kernel, disk_reach

    masks = torch.rand(3, 40, 50) > 0.97
    kernel = disk_kernel(radius, masks.device)
    r = kernel.shape[0] // 2
    direct = torch.nn.functional.conv2d(masks.float()[:, None], kernel[None, None], padding=r)[:, 0] > 0.5
    assert torch.equal(disk_reach(masks, radius), direct)
    # brute force on one image: distance to the nearest mask pixel < radius
    ys, xs = masks[0].nonzero(as_tuple=True)
    gy, gx = torch.meshgrid(torch.arange(40), torch.arange(50), indexing="ij")
    d2 = ((gy[..., None] - ys) ** 2 + (gx[..., None] - xs) ** 2).min(-1).values
    assert torch.equal(disk_reach(masks, radius)[0], d2 < radius**2)


def _maps_for_box_tests() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    maps = []
    for size in (5, 17, 40):
        low = torch.from_numpy(rng.random((1, 1, 4, 4)).astype(np.float32) ** 2)
        smooth = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
        maps += [smooth.numpy(), smooth.numpy() + rng.random((size, size)).astype(np.float32) * 0.5]
        maps.append(np.round(rng.random((size, size)) * 20) / 20)  # values exactly on the thresholds (ties)
        maps.append((rng.random((size, size)) > 0.7).astype(np.float32))  # binary: a plateau at every level
    maps += [np.zeros((6, 6)), np.pad(np.ones((1, 1)), 3)]  # constant, a single pixel
    return maps


@pytest.mark.parametrize("step", [0.05, 0.1, 0.013])
def test_one_pass_box_curve_equals_one_labelling_per_threshold(step: float) -> None:
    """The union-find over runs gives the very boxes of per-threshold 8-connected labelling."""
    from auditor.metrics.components import box_iou_curve
    from auditor.metrics.localization import best_box_iou

    grid = np.arange(0.0, 1.0 - 1e-9, step)
    for cam in _maps_for_box_tests():
        h, w = cam.shape
        gt = np.array([[0.1 * w, 0.2 * h, 0.6 * w, 0.9 * h], [0.5 * w, 0.0, 1.0 * w, 0.4 * h]])
        np.testing.assert_array_equal(box_iou_curve(cam, gt, grid), best_box_iou(cam, gt, grid))
    single = box_iou_curve(np.pad(np.ones((2, 3)), 2), np.array([[2.0, 2.0, 5.0, 4.0]]), np.array([0.5]))
    assert single.tolist() == [1.0]  # the box of the only component is the ground truth
    with pytest.raises(ValueError, match="increasing"):
        box_iou_curve(np.ones((3, 3)), np.array([[0.0, 0.0, 1.0, 1.0]]), np.array([0.5, 0.2]))
