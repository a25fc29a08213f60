"""Per-batch probes for the dataset-level analyses: image properties and counterfactual forwards.

Both run inside the streaming pass (a few extra forwards per image, no storage of images).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from auditor.ops import gaussian_kernel, separable_blur
from auditor.shortcuts.grids import GRID


def image_properties(pixels: Tensor) -> dict[str, Tensor]:
    """Simple image properties that can carry a shortcut when no metadata exists.

    Args:
        pixels: ``[B, 3, H, W]`` images in [0, 1] pixel space.

    Returns:
        ``{name: [B]}``: mean luminance, luminance standard deviation (contrast), mean R, G, B, and sharpness
        (variance of the Laplacian of the luminance).
    """
    lum = 0.299 * pixels[:, 0] + 0.587 * pixels[:, 1] + 0.114 * pixels[:, 2]
    lap = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], device=pixels.device)
    edges = F.conv2d(lum[:, None], lap[None, None])[:, 0]
    return {
        "brightness": lum.flatten(1).mean(1),
        "contrast": lum.flatten(1).std(1),
        "red": pixels[:, 0].flatten(1).mean(1),
        "green": pixels[:, 1].flatten(1).mean(1),
        "blue": pixels[:, 2].flatten(1).mean(1),
        "sharpness": edges.flatten(1).var(1),
    }


FRAME = 0.125  # the band along the border that stands in for the background where an image has no mask


def background_colour(pixels: Tensor, masks: Tensor, usable: Tensor) -> Tensor:
    """``[B, 3]`` mean colour of each image's background: outside its object grown by a margin where it has a
    mask (and at least 5% of the image is left), else in the band of :data:`FRAME` along the border.

    A class whose objects differ in colour from other classes' has another mean image colour, but not another
    background colour: the colour shifts of ``global_cue`` move the images by the difference of these.

    Args:
        pixels: ``[B, 3, H, W]`` images in [0, 1].
        masks: ``[B, H, W]`` bool object masks.
        usable: ``[B]`` bool, the masks to use.
    """
    b, _, h, w = pixels.shape
    band = torch.ones(h, w, dtype=torch.bool, device=pixels.device)
    fy, fx = max(1, round(FRAME * h)), max(1, round(FRAME * w))
    band[fy : h - fy, fx : w - fx] = False
    region = band.expand(b, h, w).clone()
    if bool(usable.any()):
        outside = ~margin_masks(masks[usable])
        enough = outside.flatten(1).float().mean(1) >= 0.05
        idx = torch.nonzero(usable).flatten()[enough]
        region[idx] = outside[enough]
    weight = region[:, None].float()
    return (pixels * weight).flatten(2).sum(2) / weight.flatten(2).sum(2).clamp_min(1.0)


def mask_grid(masks: Tensor) -> Tensor:
    """``[B, H, W]`` bool -> ``[B, 32, 32]`` object fraction per cell (area pooling)."""
    return F.adaptive_avg_pool2d(masks[:, None].float(), GRID)[:, 0]


def _smooth(x: Tensor, sigma: float) -> Tensor:
    """Gaussian blur; large sigmas are applied on an area-downsampled copy (cost independent of sigma)."""
    factor = max(1, int(sigma // 2))
    if factor == 1:
        return separable_blur(x, gaussian_kernel(sigma))
    small = F.avg_pool2d(x, factor, ceil_mode=True)
    return F.interpolate(
        separable_blur(small, gaussian_kernel(sigma / factor)), size=x.shape[-2:], mode="bilinear", align_corners=False
    )


def inpaint(images: Tensor, holes: Tensor) -> Tensor:
    """Fill ``holes`` from the surrounding pixels by normalized convolution at growing scales.

    ``fill = blur(x * known) / blur(known)``, first with a small Gaussian, then larger ones for what is
    still far from any known pixel. The fill is smooth and continuous with its surroundings, so the removed
    object's silhouette does not survive as a sharp, class-revealing edge (a mean-colour hole would leak the
    shape, the class-information leakage the ROAD paper describes).

    Args:
        images: ``[B, C, H, W]``.
        holes: ``[B, H, W]`` bool, pixels to replace.

    Returns:
        ``[B, C, H, W]`` with the holes filled.
    """
    known = (~holes)[:, None].to(images.dtype)
    out = images * known
    filled = known.clone()
    side = max(images.shape[-2:])
    for sigma in (side / 32, side / 16, side / 8, side / 4, side / 2):
        num = _smooth(images * known, sigma)
        den = _smooth(known, sigma)
        ok = (den > 1e-3) & (filled < 0.5)
        out = torch.where(ok, num / den.clamp_min(1e-3), out)
        filled = torch.where(ok, torch.ones_like(filled), filled)
    return torch.where(known > 0.5, images, out)


@dataclass
class Partners:
    """The background partners of a batch (``auditor.io.sources.background_partners``), loaded with it.

    Attributes:
        images: ``[B, C, H, W]`` normalized partner images (zeros where ``present`` is False).
        masks: ``[B, H, W]`` bool partner object masks.
        labels: ``[B]`` partner class indices (-1 where none).
        present: ``[B]`` bool.
    """

    images: Tensor
    masks: Tensor
    labels: Tensor
    present: Tensor


MARGIN = 0.25  # removal margin: a share of the square root of the object's area, at least MIN_MARGIN pixels
MIN_MARGIN = 2
VERSIONS = ("fg", "bg", "bg_margin", "bg_box", "bg_flat", "mix")


def margin_masks(masks: Tensor, share: float = MARGIN, least: int = MIN_MARGIN) -> Tensor:
    """Dilate each mask by ``max(least, round(share * sqrt(area)))`` pixels (a square structuring element).

    Real masks are imperfect: thresholded soft edges, polygons and coarse annotations leave the object's rim
    outside the mask, and a model still reads that remnant. A margin in proportion to the object's size
    removes it whatever the image resolution.

    Args:
        masks: ``[B, H, W]`` bool.

    Returns:
        ``[B, H, W]`` bool.
    """
    area = masks.flatten(1).float().sum(1)
    radius = torch.clamp(torch.round(share * area.sqrt()), min=least).long()
    out = masks.clone()
    for r in torch.unique(radius).tolist():
        sel = (radius == r).nonzero().flatten()
        x = masks[sel][:, None].float()
        # a square dilation is separable: a row max then a column max (cost 2k instead of k^2 per pixel)
        x = F.max_pool2d(x, (1, 2 * r + 1), stride=1, padding=(0, r))
        out[sel] = F.max_pool2d(x, (2 * r + 1, 1), stride=1, padding=(r, 0))[:, 0] > 0
    return out & (area > 0)[:, None, None]


def box_masks(masks: Tensor) -> Tensor:
    """``[B, H, W]`` bool -> the filled bounding box of each mask (empty stays empty)."""
    rows, cols = masks.any(2), masks.any(1)  # [B, H], [B, W]
    return rows[:, :, None] & cols[:, None, :]


def flat_fill(images: Tensor, holes: Tensor) -> Tensor:
    """Fill ``holes`` with the mean colour of each image outside them: the object's silhouette stays, its
    colour, texture and rim do not (and no colour is propagated from the rim, as inpainting can)."""
    known = (~holes)[:, None].to(images.dtype)
    mean = (images * known).sum((2, 3), keepdim=True) / known.sum((2, 3), keepdim=True).clamp_min(1)
    return torch.where(holes[:, None], mean.expand_as(images), images)


def counterfactuals(
    model: nn.Module, images: Tensor, masks: Tensor, labels: Tensor, usable: Tensor, partners: Partners | None
) -> dict[str, Tensor]:
    """Predictions on foreground-only, background-only and background-swapped versions of the images.

    Foreground-only sets the background to 0 in normalized space (the dataset-mean colour).
    Background-only removes the object four ways, because masks are imperfect and every removal leaks
    something: ``bg`` inpaints the exact mask (:func:`inpaint`); ``bg_margin`` inpaints the mask grown by
    a margin in proportion to the object's size (:func:`margin_masks`), so a rim left outside the mask goes
    too; ``bg_box`` inpaints the bounding box of that grown mask (no silhouette survives); ``bg_flat``
    fills the grown mask with the image's mean background colour (no colour is propagated from a rim).
    The swapped version pastes image i's object onto its partner's background, inpainted over the
    partner's grown mask: the partner is an image of another class chosen by sample id (Background
    Challenge "Mixed-Rand"), so the result does not depend on which images share a batch.

    Args:
        model: classifier in eval mode.
        images: ``[B, C, H, W]`` normalized.
        masks: ``[B, H, W]`` bool object masks.
        labels: ``[B]``.
        usable: ``[B]`` bool, images with a non-empty mask.
        partners: the batch's background partners, or None (no swapped version).

    Returns:
        ``cf_<version>_pred`` and ``cf_<version>_prob`` for each of :data:`VERSIONS`, and
        ``cf_mix_bg_label``, and ``cf_<version>_kept`` for the four background-only versions (the share of
        the image each leaves: a removal of a large object can leave nothing to inpaint from), ``[B]`` each
        (prob = probability of the image's own label; NaN / -1 where not usable).
    """
    b = images.shape[0]
    nan = torch.full((b,), float("nan"))
    none = torch.full((b,), -1, dtype=torch.long)
    has_partner = usable.cpu() & (partners.present.cpu() if partners is not None else torch.zeros(b, dtype=torch.bool))
    m = masks[:, None].to(images.dtype)
    grown = margin_masks(masks) if bool(usable.any()) else masks  # once per batch: every removal reads it

    def version(key: str, sel: Tensor) -> Tensor:  # built for the forwarded rows only: inpainting is costly
        x, mk = images[sel], masks[sel]
        if key == "fg":
            return x * m[sel]
        if key == "bg":
            return inpaint(x, mk)
        if key == "bg_margin":
            return inpaint(x, grown[sel])
        if key == "bg_box":
            return inpaint(x, box_masks(grown[sel]))
        if key == "bg_flat":
            return flat_fill(x, grown[sel])
        assert partners is not None
        pm = partners.masks.to(images.device)[sel]
        background = inpaint(partners.images.to(images.device)[sel], margin_masks(pm))
        return x * m[sel] + background * (1 - m[sel])

    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for key in VERSIONS:
            ok = has_partner if key == "mix" else usable.cpu()
            pred, prob = none.clone(), nan.clone()
            if bool(ok.any()):
                sel = ok.nonzero().flatten().to(images.device)
                probs = model(version(key, sel)).float().softmax(1)
                pred[ok] = probs.argmax(1).cpu()
                prob[ok] = probs.gather(1, labels[sel, None])[:, 0].cpu()
            out[f"cf_{key}_pred"], out[f"cf_{key}_prob"] = pred, prob
    out["cf_mix_bg_label"] = torch.where(has_partner, partners.labels.cpu(), none) if partners is not None else none
    removed = {"bg": masks, "bg_margin": grown, "bg_box": box_masks(grown), "bg_flat": grown}
    for key, holes in removed.items():  # how much image each removal leaves to inpaint from and to carry a cue
        kept = 1 - holes.flatten(1).float().mean(1).cpu()
        out[f"cf_{key}_kept"] = torch.where(usable.cpu(), kept, nan)
    return out
