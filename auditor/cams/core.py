"""Shared machinery of the CAM engine: input checks and the model's state (the bottom of the package).

Every CAM method is a small pure function of a :class:`CamContext` (what was captured at the target
layer(s), plus callables that run the model) returning a *signed* map at the layer's resolution
``[B, h, w]``. The engine does everything else once: validation of images and targets (here), automatic
target layer resolution and scoped capture (:mod:`auditor.cams.layers`), chunking and precision
(:mod:`auditor.cams.speed`), restoring the model's train/eval mode, ReLU, validity flags and upsampling.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a parameter-free model)."""
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def check_images(images: Tensor, device: torch.device) -> Tensor:
    """Validate a batch of images and move it to ``device``.

    Args:
        images: ``[B, C, H, W]`` floating-point tensor (normalized as the model expects).
        device: the model's device.

    Returns:
        The images as a float tensor on ``device``, detached from any graph.
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape [B, C, H, W], got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(
            f"images must have shape [B, C, H, W]; got shape {tuple(images.shape)}"
            + (" (add a batch dimension with images[None])" if images.ndim == 3 else "")
        )
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point (normalized), got dtype {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch (B = 0)")
    out = images.clone() if images.is_inference() else images
    return out.detach().to(device, non_blocking=True)


def check_targets(targets: Tensor | Sequence[int] | int, batch: int, device: torch.device) -> Tensor:
    """Validate explained classes: exactly one integer class index per image.

    Args:
        targets: ``[B]`` integer tensor or a sequence of ``B`` ints.
        batch: number of images ``B``.
        device: the model's device.

    Returns:
        ``[B]`` long tensor on ``device``.
    """
    if isinstance(targets, int):
        raise TypeError(
            f"targets must give one class per image ({batch} images); got a single int. "
            f"Use torch.full(({batch},), {targets}) to explain the same class for every image"
        )
    t = torch.as_tensor(targets)
    if t.ndim != 1:
        raise ValueError(f"targets must be a 1-D sequence of class indices, got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"targets must be integer class indices, got dtype {t.dtype}")
    if t.numel() != batch:
        raise ValueError(f"targets has {t.numel()} entries for {batch} images; pass exactly one target class per image")
    return t.to(device=device, dtype=torch.long)


def check_target_range(targets: Tensor, num_outputs: int) -> None:
    """Raise if a target index is outside the model's ``num_outputs`` logits."""
    bad = ((targets < 0) | (targets >= num_outputs)).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"target {int(targets[i])} for image {i} is out of range: the model has {num_outputs} outputs")


# --------------------------------------------------------------------------------------------------
# model state
# --------------------------------------------------------------------------------------------------


@contextmanager
def model_state(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for the duration and restore every module's mode afterwards.

    Eval mode matters: in train mode BatchNorm couples the images of a batch, so one image's map would
    depend on the others. Raises under ``torch.inference_mode`` (no autograd is possible there).
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "auditor cannot explain inside torch.inference_mode(): gradients are impossible there; "
            "call it outside that block (torch.no_grad() is fine)"
        )
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode
