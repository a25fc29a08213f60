"""Interventions on the images: does a candidate region, or a global property, itself move the model?

(i) Remove a region from the class's images (ROAD noisy linear imputation, so no blank patch is
introduced): the class probability should drop. (ii) Paste it into other classes' images: the class
probability should rise (SpRAy's tag-pasting test, ImageNet-W's watermark logic). Each is compared, image
by image, with the same intervention on a control box: paired one-sided Wilcoxon tests of test minus
control. (iii) Shift the images' colour toward the other classes' and, as a control, away: paired sign
tests. Every p-value enters the run's one Benjamini-Hochberg family (``catalog.run_analyses``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn

from auditor.metrics.faithfulness import noisy_linear_impute
from auditor.shortcuts.probes import inpaint

Region = Sequence[float] | Sequence[Sequence[float]]  # one normalized [x0, y0, x1, y1] box, or a union of boxes


def boxes_of(region: Region) -> list[list[float]]:
    """The boxes of a region: ``[box]`` for one box, the boxes of a union as given."""
    if len(region) and isinstance(region[0], Sequence):
        return [[float(v) for v in box] for box in region]  # type: ignore[union-attr]
    return [[float(v) for v in region]]  # type: ignore[arg-type]


def region_mask(region: Region, size: int) -> Tensor:
    """``[S, S]`` bool for a normalized ``[x0, y0, x1, y1]`` box or a union of boxes (rounded outwards)."""
    mask = torch.zeros(size, size, dtype=torch.bool)
    for box in boxes_of(region):
        x0, y0 = math.floor(box[0] * size), math.floor(box[1] * size)
        x1, y1 = math.ceil(box[2] * size), math.ceil(box[3] * size)
        mask[y0:y1, x0:x1] = True
    return mask


def _wilcoxon_greater(v: np.ndarray) -> float:
    return float(stats.wilcoxon(v, alternative="greater").pvalue) if np.any(v != 0) else 1.0


@dataclass
class _Changes:
    """Per-image changes of p(class) under one region's removal and transplant."""

    drop: np.ndarray  # [n_own] p(cls | image) - p(cls | region removed)
    gain: np.ndarray  # [n_other] p(cls | region pasted) - p(cls | image)
    flips: np.ndarray  # [n_other] bool, the prediction becomes the class


def _remove_and_paste(
    model: nn.Module,
    own: Tensor,
    other: Tensor,
    cls: int,
    region: Region,
    keys: Sequence[int],
    base: tuple[Tensor, Tensor],
    to_pixels: Callable[[Tensor], Tensor],
    from_pixels: Callable[[Tensor], Tensor],
) -> _Changes:
    """Remove ``region`` from ``own`` (ROAD imputation, noise keyed per image) and paste the same place of
    ``own`` into ``other`` (donor ``j % n_own`` for the ``j``-th image), with the forwards; ``base`` = the
    unchanged images' class probabilities (``[n_own, C]``, ``[n_other, C]``)."""
    mask = region_mask(region, own.shape[-1]).to(own.device)
    pix = to_pixels(own).detach().double().cpu().numpy()
    hole = mask.cpu().numpy()
    imputed = np.stack(
        [noisy_linear_impute(p, hole, 0.01, np.random.default_rng(k)) for p, k in zip(pix, keys, strict=True)]
    )
    removed = from_pixels(torch.tensor(imputed, dtype=own.dtype, device=own.device))
    donors = own[torch.arange(other.shape[0], device=own.device) % own.shape[0]]
    pasted = torch.where(mask[None, None], donors, other)
    with torch.no_grad():
        p_own, p_removed = base[0][:, cls], _prob(model, removed)[:, cls]
        q_other = base[1]
        q_pasted = _prob(model, pasted) if len(pasted) else q_other  # no other class's images: nothing pasted
    return _Changes(
        drop=(p_own - p_removed).cpu().numpy().astype(np.float64),
        gain=(q_pasted[:, cls] - q_other[:, cls]).cpu().numpy().astype(np.float64),
        flips=((q_pasted.argmax(1) == cls) & (q_other.argmax(1) != cls)).cpu().numpy(),
    )


def _prob(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).float().softmax(1)


def _mean(v: np.ndarray) -> float:
    """The mean, NaN for no values (a run of one class has no other images to paste into)."""
    return float(v.mean()) if v.size else float("nan")


def region_intervention(
    model: nn.Module,
    load: Callable[[Sequence[int]], Tensor],
    own_rows: Sequence[int],
    other_rows: Sequence[int],
    cls: int,
    region: Region,
    control: Region,
    *,
    to_pixels: Callable[[Tensor], Tensor],
    from_pixels: Callable[[Tensor], Tensor],
    noise_keys: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Remove the region from ``own_rows`` images and paste it into ``other_rows`` images; the same with a
    control box, on the same images; paired tests of test minus control per image.

    The control box (same size, elsewhere: ``grids.control_box``) is the null: removing or pasting any
    patch of that size moves p(class) a little (inpainting is not perfect, a pasted patch is new content).
    Per image, the test's change minus the control's (the control floored at 0: a control that *raises*
    p(class) earns the region nothing) is the effect; its mean is ``*_effect`` and a one-sided Wilcoxon
    signed-rank test of those differences gives ``*_p``.

    Args:
        model: classifier in eval mode.
        load: rows -> ``[n, 3, S, S]`` normalized images on the model's device.
        own_rows: rows of the class's images.
        other_rows: rows of other classes' images.
        cls: the class index.
        region: normalized ``[x0, y0, x1, y1]`` box, or a union of boxes (a border band).
        control: the control box (or union of boxes), of about the region's area.
        to_pixels / from_pixels: normalization inverse / forward.
        noise_keys: one key per ``own_rows`` image seeding its imputation noise (keyed by sample, so the
            noise of one image does not depend on which others were drawn); default: the row numbers.

    Returns:
        ``{n_removed, n_pasted, removal_drop, paste_gain, paste_flips, control: {region, removal_drop,
        paste_gain, paste_flips}, removal_effect, removal_p, paste_effect, paste_p}``: the mean drop of
        p(class) after removal, the mean gain after pasting and the share of other-class images whose
        prediction becomes the class, for the region and the control; the paired effects and p-values.
        Without ``other_rows`` the transplant's means and effect are NaN and its p-value 1.
    """
    own = load(own_rows)
    other = load(other_rows) if len(other_rows) else own[:0]
    keys = list(own_rows) if noise_keys is None else list(noise_keys)
    if len(keys) != len(own_rows):
        raise ValueError(f"{len(keys)} noise keys for {len(own_rows)} images")
    with torch.no_grad():
        p_own = _prob(model, own)
        base = (p_own, _prob(model, other) if len(other_rows) else p_own[:0])
    test = _remove_and_paste(model, own, other, cls, region, keys, base, to_pixels, from_pixels)
    ctrl = _remove_and_paste(model, own, other, cls, control, keys, base, to_pixels, from_pixels)
    removal = test.drop - np.maximum(ctrl.drop, 0.0)
    paste = test.gain - np.maximum(ctrl.gain, 0.0)
    return {
        "n_removed": len(own_rows),
        "n_pasted": len(other_rows),
        "removal_drop": float(test.drop.mean()),
        "paste_gain": _mean(test.gain),
        "paste_flips": _mean(test.flips),
        "control": {
            "region": boxes_of(control)[0] if len(boxes_of(control)) == 1 else boxes_of(control),
            "removal_drop": float(ctrl.drop.mean()),
            "paste_gain": _mean(ctrl.gain),
            "paste_flips": _mean(ctrl.flips),
        },
        "removal_effect": float(removal.mean()),
        "removal_p": _wilcoxon_greater(removal),
        "paste_effect": _mean(paste),
        "paste_p": _wilcoxon_greater(paste),
    }


def occlusion_scan(
    model: nn.Module, images: Tensor, cls: int | Sequence[int], boxes: Sequence[Sequence[float]], chunk: int = 64
) -> np.ndarray:
    """The drop of p(``cls``) when each box of the image is filled in from its surroundings.

    The fill is :func:`~auditor.shortcuts.probes.inpaint` (normalized convolution from the pixels around
    the box), so no blank patch and no hard edge is introduced. Every image gets the same box, so a cue
    that stays at the same place in every image shows as a box where *all* images drop, while an object
    that moves from image to image spreads its drops over many boxes.

    Args:
        model: classifier in eval mode.
        images: ``[n, 3, S, S]`` normalized images.
        cls: the class index, or one per image (other classes' images, each read for its own label).
        boxes: normalized ``[x0, y0, x1, y1]`` boxes (:func:`region_mask` rounds them outwards).
        chunk: images per forward.

    Returns:
        ``[n, len(boxes)]`` float64: p(cls | image) - p(cls | image with the box filled).
    """
    n, size = images.shape[0], images.shape[-1]
    drops = np.zeros((n, len(boxes)))
    if n == 0:
        return drops
    per = max(1, chunk // max(n, 1))  # boxes filled and forwarded together: one forward of ~chunk images
    of = torch.as_tensor(cls, dtype=torch.long, device=images.device).expand(n)  # [n] the class read per image

    def prob(x: Tensor) -> Tensor:  # x: box-major copies of the n images, so image i % n reads class of[i % n]
        reads = of.repeat(len(x) // n)
        parts = [model(x[i : i + chunk]).float().softmax(1) for i in range(0, len(x), chunk)]
        return torch.cat(parts).gather(1, reads[:, None])[:, 0]

    with torch.no_grad():
        base = prob(images)
        for j0 in range(0, len(boxes), per):
            group = boxes[j0 : j0 + per]
            holes = torch.stack([region_mask(b, size) for b in group]).to(images.device)  # [k, S, S]
            filled = inpaint(images.repeat(len(group), 1, 1, 1), holes.repeat_interleave(n, 0))  # box-major
            p = prob(filled).view(len(group), n)
            drops[:, j0 : j0 + len(group)] = (base[None] - p).T.cpu().numpy()
    return drops


def _sign_test(a: np.ndarray, b: np.ndarray) -> float:
    """One-sided exact sign test that outcome ``a`` happens more often than ``b`` on the same images."""
    up, down = int((a & ~b).sum()), int((b & ~a).sum())
    return float(stats.binomtest(up, up + down, 0.5, alternative="greater").pvalue) if up + down else 1.0


def shift_intervention(
    model: nn.Module,
    load: Callable[[Sequence[int]], Tensor],
    own_rows: Sequence[int],
    other_rows: Sequence[int],
    cls: int,
    delta: Sequence[float],
    *,
    to_pixels: Callable[[Tensor], Tensor],
    from_pixels: Callable[[Tensor], Tensor],
    keep: Callable[[Sequence[int]], Tensor] | None = None,
) -> dict[str, Any]:
    """Shift a global image property (the per-channel mean colour) toward and away from the class's.

    ``delta`` = other classes' mean colour minus the class's (pixel space, per channel). The class's
    images are shifted by ``+delta`` (toward the others) and, as a control of the same size, by
    ``-delta``; the other classes' images by ``-delta`` (toward the class) and by ``+delta``. When the
    prediction follows the property, the class's images leave the class under the first shift and not
    under its control, and the other images become the class under the shift toward it, not under its
    control. A model broken by any large colour change leaves or flips under both: no effect.

    The test runs twice: on the whole image (``whole``) and sparing the pixels ``keep`` returns
    (``outside``: the objects grown by a margin, or where the model's map is hot). A model that reads the
    *object's* colour (a red disc against a blue square) follows the whole-image shift but not the one
    that spares the object; a colour cast moves the prediction from outside the object too.

    Args:
        keep: rows -> ``[n, S, S]`` bool, the pixels the ``outside`` test leaves unshifted (None: no
            ``outside`` test).

    Returns:
        ``{whole, outside}`` (``outside`` None without ``keep``), each ``{n_own, n_other, leave,
        leave_control, leave_p, flip, flip_control, flip_p, kept}``: shares of the class's images (those
        predicted as the class) that leave it, and of the other images (those not predicted as the class)
        that become it, under the shift and its control; ``*_p`` = one-sided sign tests of shift vs
        control on the same images; ``kept`` = the mean share of pixels spared.
    """
    own, other = load(own_rows), load(other_rows)
    d = torch.tensor(list(delta), dtype=own.dtype, device=own.device).view(1, -1, 1, 1)

    def pred(x: Tensor, spared: Tensor | None = None, sign: float = 0.0) -> np.ndarray:
        with torch.no_grad():
            if sign:
                shifted = from_pixels((to_pixels(x) + sign * d).clamp(0, 1))
                x = shifted if spared is None else torch.where(spared[:, None], x, shifted)
            return model(x).argmax(1).cpu().numpy()

    called = pred(own) == cls
    not_called = pred(other) != cls

    def outcome(s_own: Tensor | None, s_other: Tensor | None) -> dict[str, Any]:
        leave, leave_ctrl = (pred(own, s_own, 1.0) != cls)[called], (pred(own, s_own, -1.0) != cls)[called]
        flip, flip_ctrl = (
            (pred(other, s_other, -1.0) == cls)[not_called],
            (pred(other, s_other, 1.0) == cls)[not_called],
        )
        kept = [float(m.float().mean()) for m in (s_own, s_other) if m is not None]
        return {
            "n_own": int(called.sum()),
            "n_other": int(not_called.sum()),
            "leave": _share(leave),
            "leave_control": _share(leave_ctrl),
            "leave_p": _sign_test(leave, leave_ctrl),
            "flip": _share(flip),
            "flip_control": _share(flip_ctrl),
            "flip_p": _sign_test(flip, flip_ctrl),
            "kept": float(np.mean(kept)) if kept else 0.0,
        }

    outside = None
    if keep is not None:
        outside = outcome(keep(own_rows).to(own.device), keep(other_rows).to(own.device))
    return {"whole": outcome(None, None), "outside": outside}


def _share(v: np.ndarray) -> float:
    return float(v.mean()) if v.size else float("nan")


def graft_intervention(
    model: nn.Module,
    load: Callable[[Sequence[int]], Tensor],
    own_rows: Sequence[int],
    other_rows: Sequence[int],
    cls: int,
    keep: Callable[[Sequence[int]], Tensor],
) -> dict[str, Any]:
    """Graft the class's backgrounds behind other classes' objects, against other classes' backgrounds.

    Each other-class image (the recipient) keeps the pixels ``keep`` spares in it (its object: the mask with a
    margin, else where its map is hot) and the places the donor's own spared pixels cover (so no part of the
    donor's object comes along); every other pixel comes from the donor. The donor is a class image (the test)
    or the next other-class image (the null: any background with its object left out). Per recipient, the
    test's p(class) minus the null's is the effect; a one-sided Wilcoxon test of them gives ``paste_p``. The
    reverse, on the class's images: the next other-class image's background against the next class image's.

    Args:
        model: classifier in eval mode.
        load: rows -> ``[n, 3, S, S]`` normalized images on the model's device.
        own_rows / other_rows: the class's images and other classes' images (each at least 2).
        cls: the class index.
        keep: rows -> ``[n, S, S]`` bool, the pixels of each image that stay its own.

    Returns:
        ``{n_removed, n_pasted, paste_flips, null_flips, paste_effect, paste_p, removal_flips, removal_null_flips,
        removal_effect, removal_p}``: the shares of the recipients the class's and the null's backgrounds turn into
        the class; the mean p(class) gain of the recipients over the null and its p-value; the same for the reverse
        (the removal): the shares of the class's images no longer called the class on other classes' backgrounds
        and on other class images' backgrounds, and p(class) with a class background minus with another's.
    """
    own, other = load(own_rows), load(other_rows)
    k_own, k_other = keep(own_rows).to(own.device), keep(other_rows).to(own.device)

    def graft(rec: Tensor, k_rec: Tensor, don: Tensor, k_don: Tensor) -> Tensor:
        stay = (k_rec | k_don)[:, None]
        return torch.where(stay, rec, don)

    def shift(x: Tensor) -> Tensor:
        return torch.roll(x, 1, dims=0)  # image i takes image i-1's background: never its own

    donors = torch.arange(len(other_rows), device=own.device) % len(own_rows)
    with torch.no_grad():
        test = _prob(model, graft(other, k_other, own[donors], k_own[donors]))
        null = _prob(model, graft(other, k_other, shift(other), shift(k_other)))
        recipients = torch.arange(len(own_rows), device=own.device) % len(other_rows)
        swapped = _prob(model, graft(own, k_own, other[recipients], k_other[recipients]))
        kept = _prob(model, graft(own, k_own, shift(own), shift(k_own)))
    paste = (test[:, cls] - null[:, cls]).cpu().numpy()
    removal = (kept[:, cls] - swapped[:, cls]).cpu().numpy()
    return {
        "n_removed": len(own_rows),
        "n_pasted": len(other_rows),
        "paste_flips": _share((test.argmax(1) == cls).cpu().numpy()),
        "null_flips": _share((null.argmax(1) == cls).cpu().numpy()),
        "paste_effect": _mean(paste),
        "paste_p": _wilcoxon_greater(paste),
        "removal_flips": _share((swapped.argmax(1) != cls).cpu().numpy()),
        "removal_null_flips": _share((kept.argmax(1) != cls).cpu().numpy()),
        "removal_effect": _mean(removal),
        "removal_p": _wilcoxon_greater(removal),
    }
