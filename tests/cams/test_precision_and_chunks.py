"""Automatic chunk sizes and optional mixed precision of the perturbation forwards."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from auditor import compute_cams
from auditor.cams.speed import MAX_CHUNK_CPU, auto_chunk, choose_memory_format, set_memory_format
from auditor.stats import spearman_rows
from tests.conftest import SmallCNN
from tests.shortcuts.planted import make, tensors, train


def test_auto_chunk_is_bounded_cached_and_shrinks_with_image_size(small_cnn: SmallCNN) -> None:
    small = auto_chunk(small_cnn.eval(), torch.randn(2, 3, 16, 16))
    assert 1 <= small <= MAX_CHUNK_CPU
    assert auto_chunk(small_cnn, torch.randn(2, 3, 16, 16)) == small
    import torchvision

    big = torchvision.models.resnet18(num_classes=2).eval()
    assert auto_chunk(big, torch.randn(2, 3, 512, 512)) <= auto_chunk(big, torch.randn(2, 3, 64, 64))


def test_default_chunking_gives_the_same_maps(small_cnn: SmallCNN) -> None:
    x = torch.randn(3, 3, 16, 16)
    auto = compute_cams(small_cnn, x, [0, 1, 2], methods=["score_cam"])["score_cam"].maps
    tiny = compute_cams(small_cnn, x, [0, 1, 2], methods=["score_cam"], batch_size=3)["score_cam"].maps
    assert auto is not None and tiny is not None
    torch.testing.assert_close(auto, tiny, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    model = train(make("stamp", 60, 0), steps=120)
    x, y = tensors(make("stamp", 4, 3))
    return model, x, y


@pytest.mark.parametrize("method", ["score_cam", "ss_cam", "is_cam", "rise", "ablation_cam", "occlusion"])
def test_mixed_precision_maps_rank_like_fp32(method: str, trained: tuple) -> None:  # type: ignore[type-arg]
    model, x, y = trained
    opts = {
        "rise": {"num_masks": 300},
        "ss_cam": {"num_samples": 2},
        "is_cam": {"num_samples": 2},
        "occlusion": {"window": 8, "stride": 4},
    }.get(method, {})
    full = compute_cams(model, x, y, methods=[method], options={method: opts})[method].maps
    half = compute_cams(model, x, y, methods=[method], options={method: opts}, mixed_precision=True)[method].maps
    assert full is not None and half is not None
    rho = spearman_rows(full.flatten(1).numpy(), half.flatten(1).numpy())
    assert np.nanmin(rho) > 0.99, rho  # bfloat16 on this CPU


def test_occlusion_keeps_float32_under_cpu_bfloat16(trained: tuple) -> None:  # type: ignore[type-arg]
    model, x, y = trained
    opts = {"occlusion": {"window": 8, "stride": 8}}
    full = compute_cams(model, x, y, methods=["occlusion"], options=opts)["occlusion"].maps
    half = compute_cams(model, x, y, methods=["occlusion"], options=opts, mixed_precision=True)["occlusion"].maps
    assert full is not None and half is not None
    torch.testing.assert_close(half, full)  # bfloat16 deltas ranked 0.979 with float32: not used


def test_memory_format_choice_leaves_the_model_in_the_chosen_format(small_cnn: SmallCNN) -> None:
    import copy

    model = copy.deepcopy(small_cnn).eval()  # the fixture is shared: leave it as it was
    x = torch.randn(4, 3, 16, 16)
    before = model(x).detach()
    fmt = choose_memory_format(model, x, repeat=1)
    assert fmt in ("channels_last", "contiguous")
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    nhwc = conv.weight.is_contiguous(memory_format=torch.channels_last) and conv.weight.shape[-1] > 1
    assert nhwc == (fmt == "channels_last")
    for f in ("channels_last", "contiguous"):
        set_memory_format(model, f)
        torch.testing.assert_close(model(x).detach(), before, atol=1e-5, rtol=1e-5)
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 2)).eval()
    assert choose_memory_format(mlp, x) == "contiguous"  # nothing to gain: not timed


def test_every_method_gives_the_same_maps_in_channels_last(small_cnn: SmallCNN) -> None:
    import copy

    from auditor.cams import CAMS

    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 2])
    nhwc = copy.deepcopy(small_cnn).eval()
    set_memory_format(nhwc, "channels_last")
    small = {"rise": {"num_masks": 32}, "occlusion": {"window": 8, "stride": 8}}
    for name in CAMS:
        requires = CAMS[name].requires
        if requires is not None and requires(small_cnn, x) is not None:
            continue  # LeGrad: no attention in a CNN (its contract tests run on a ViT)
        opts = {name: small.get(name, {})}
        a = compute_cams(small_cnn.eval(), x, t, methods=[name], options=opts)[name].maps
        b = compute_cams(nhwc, x, t, methods=[name], options=opts)[name].maps
        assert a is not None and b is not None
        torch.testing.assert_close(b, a, atol=1e-4 * float(a.abs().max()) + 1e-8, rtol=1e-3, msg=name)


def test_balanced_chunks_cover_the_jobs_in_the_fewest_even_chunks() -> None:
    from auditor.cams.speed import balanced_chunks

    assert [(s.start, s.stop) for s in balanced_chunks(32, 15)] == [(0, 11), (11, 22), (22, 32)]
    assert list(balanced_chunks(0, 4)) == []
    for total in range(1, 50):
        for size in range(1, 17):
            parts = list(balanced_chunks(total, size))
            sizes = [p.stop - p.start for p in parts]
            assert parts[0].start == 0 and parts[-1].stop == total
            assert all(a.stop == b.start for a, b in itertools.pairwise(parts))
            assert len(parts) == -(-total // size) and max(sizes) <= size and max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="batch_size"):
        list(balanced_chunks(3, 0))
