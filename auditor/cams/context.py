"""What a method function receives (:class:`CamContext`), and the steps every method shares: combine the
channel weights with the activations, finalize (ReLU + validity), upsample."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from auditor.cams.layers import LayerData
from auditor.cams.speed import autocast

# --------------------------------------------------------------------------------------------------
# combine, finalize, upsample
# --------------------------------------------------------------------------------------------------


def combine(weights: Tensor, activations: Tensor) -> Tensor:
    """Weighted channel sum: ``sum_k w_k * A^k``.

    Args:
        weights: ``[B, K]`` channel weights or ``[B, K, h, w]`` element weights.
        activations: ``[B, K, h, w]``.

    Returns:
        ``[B, h, w]`` signed map.
    """
    if weights.ndim == 2:
        return torch.einsum("bk,bkhw->bhw", weights, activations)
    return (weights * activations).sum(1)


def first_component(x: Tensor) -> Tensor:
    """Projection of each spatial position on the first principal component of the channels.

    ``O = reshape(x) in R^{(h w) x K}``, columns centred over positions, thin SVD ``O = U S V^T``, map
    ``O v_1``. The SVD's sign is arbitrary, so the sign is fixed such that the largest-magnitude value is
    positive (the correction of Seg-Eigen-CAM; pytorch-grad-cam's EigenCAM leaves it arbitrary). An image
    with non-finite values gets an all-NaN projection (flagged invalid downstream) instead of an SVD error.

    Args:
        x: ``[B, K, h, w]``.

    Returns:
        ``[B, h, w]`` signed projection.
    """
    b, _, h, w = x.shape
    obs = x.flatten(2).transpose(1, 2).double()
    finite = torch.isfinite(obs).flatten(1).all(1)
    obs = torch.where(finite[:, None, None], obs, torch.zeros_like(obs))  # SVD cannot take NaN/inf
    obs = obs - obs.mean(1, keepdim=True)
    _, _, vh = torch.linalg.svd(obs, full_matrices=False)
    proj = (obs @ vh[:, 0, :, None])[..., 0]
    flip = proj.amin(1).abs() > proj.amax(1).abs()
    proj = torch.where(flip[:, None], -proj, proj)
    proj = torch.where(finite[:, None], proj, torch.full_like(proj, float("nan")))  # flagged by finalize()
    return proj.float().view(b, h, w)


def finalize(signed: Tensor) -> tuple[Tensor, Tensor]:
    """ReLU a signed map and flag the maps that carry no information.

    Args:
        signed: ``[B, h, w]`` raw signed map.

    Returns:
        ``(map [B, h, w] float32 >= 0 without NaN/inf, valid [B] bool)``; ``valid`` is False where the
        map had a non-finite value or is constant after the ReLU (e.g. all zero), and such a map comes
        back as zeros: a constant map ranks no pixel above another, whatever its level.
    """
    signed = signed.float()
    finite = torch.isfinite(signed).flatten(1).all(1)
    relu = torch.nan_to_num(signed, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)
    flat = relu.flatten(1)
    valid = finite & ~(flat.amax(1) <= flat.amin(1))
    return torch.where(valid[:, None, None], relu, torch.zeros_like(relu)), valid


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear (``align_corners=False``) resize of ``[B, h, w]`` maps to ``size``; identity if equal."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


# --------------------------------------------------------------------------------------------------
# what a method function receives
# --------------------------------------------------------------------------------------------------


@dataclass
class CamContext:
    """Everything a CAM method function may use.

    Attributes:
        model: the classifier, in eval mode, with no auditor hooks attached.
        images: ``[B, C, H, W]`` on the model's device.
        targets: ``[B]`` explained class indices.
        logits: ``[B, num_classes]`` of the unperturbed images (detached).
        layers: captured layers by name (activations/gradients on ``[B, K, h, w]`` grids).
        layer: the method's target layer name (or the first of several for multi-layer methods).
        layer_names: every layer this method uses (in depth order).
        options: the method's options, defaults filled in.
        batch_size: chunk size for extra forwards (masked / noisy / ablated inputs).
        mixed_precision: run extra forwards under autocast.
    """

    model: nn.Module
    images: Tensor
    targets: Tensor
    logits: Tensor
    layers: dict[str, LayerData]
    layer: str
    layer_names: list[str]
    options: dict[str, Any]
    batch_size: int
    generator: torch.Generator | None = None
    mixed_precision: bool = False
    sample_keys: Tensor | None = None  # [B] int64: per-sample keys of random draws (default: batch position)

    @property
    def data(self) -> LayerData:
        """The captured data of the method's (first) target layer."""
        return self.layers[self.layer]

    def weighted(self, weights: Tensor, activations: Tensor) -> Tensor:
        """The method's channel combination: :func:`combine`, or with the ``eigen_smooth`` option the first
        principal component of the weighted activations ``w * A`` (pytorch-grad-cam's ``eigen_smooth``).

        Args:
            weights: ``[B, K]`` channel weights or ``[B, K, h, w]`` element weights.
            activations: ``[B, K, h, w]``.

        Returns:
            ``[B, h, w]`` signed map.
        """
        if self.options.get("eigen_smooth"):
            w = weights[:, :, None, None] if weights.ndim == 2 else weights
            return first_component(w * activations)
        return combine(weights, activations)

    def forward(self, inputs: Tensor) -> Tensor:
        """Logits ``[n, num_classes]`` of extra inputs, without gradients (float32 out).

        With ``mixed_precision`` the forward runs under autocast (bfloat16 on CPU, float16 on CUDA).
        """
        with torch.no_grad(), autocast(inputs.device, self.mixed_precision):
            return self.model(inputs).float()

    def scores(self, inputs: Tensor, targets: Tensor, kind: str = "logit") -> Tensor:
        """Score ``[n]`` of class ``targets[i]`` for ``inputs[i]``: raw logit or softmax probability."""
        logits = self.forward(inputs)
        if kind == "prob":
            logits = logits.softmax(1)
        elif kind != "logit":
            raise ValueError(f"score must be 'logit' or 'prob', got {kind!r}")
        return logits.gather(1, targets[:, None])[:, 0]

    def base_scores(self, kind: str = "logit") -> Tensor:
        """Score ``[B]`` of the unperturbed images for their targets."""
        logits = self.logits.softmax(1) if kind == "prob" else self.logits
        return logits.gather(1, self.targets[:, None])[:, 0]

    def keyed_noise(self, img: Tensor, draw: Tensor, shape: tuple[int, ...]) -> Tensor:
        """Standard normal noise ``[n, *shape]``, row ``j`` seeded by (image ``img[j]``'s key, ``draw[j]``, seed).

        Each row's noise depends only on its own sample and draw index, never on the batch it shares or
        on how the work is chunked, so a sample gets the same noise in any batch, order or shard.
        """
        return self._keyed(img, draw, shape, torch.randn)

    def keyed_uniform(self, img: Tensor, draw: Tensor, shape: tuple[int, ...]) -> Tensor:
        """Uniform ``[0, 1)`` draws ``[n, *shape]``, keyed like :meth:`keyed_noise`."""
        return self._keyed(img, draw, shape, torch.rand)

    def _keyed(self, img: Tensor, draw: Tensor, shape: tuple[int, ...], sampler: Any) -> Tensor:
        keys = self.sample_keys if self.sample_keys is not None else torch.arange(self.images.shape[0])
        seed = int(self.options.get("seed", 0))
        gen = torch.Generator(device=self.images.device)
        rows = []
        for i, d in zip(img.tolist(), draw.tolist(), strict=True):
            gen.manual_seed((int(keys[i]) * 1_000_003 + d * 7919 + seed) % (2**63 - 1))
            rows.append(sampler(shape, generator=gen, device=self.images.device))
        return torch.stack(rows) if rows else torch.empty((0, *shape), device=self.images.device)

    def rng(self) -> torch.Generator:
        """A generator seeded from the method's ``seed`` option, on the images' device."""
        if self.generator is None:
            self.generator = torch.Generator(device=self.images.device)
            self.generator.manual_seed(int(self.options.get("seed", 0)))
        return self.generator
