"""Pixel-space methods: guided backpropagation, Guided Grad-CAM and Deconvnet.

Both fail the model-parameter randomization test (Adebayo et al. 2018): they behave like edge detectors
and barely depend on the top layers. They are here for visual deep-dives, not for shortcut claims. Their
signed ``[B, 3, H, W]`` attribution is reduced to ``[B, H, W]`` by the maximum absolute value over channels.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from auditor.cams.context import CamContext, combine, upsample
from auditor.cams.registry import register_cam
from auditor.errors import MethodNotApplicableError

#: Activation modules whose backward pass is "guided". For ReLU this is exactly Springenberg et al.'s rule;
#: for smooth activations the same positive-gradient gate is applied after the activation's own derivative.
GUIDED_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Mish,
)


class _PositiveGradient(torch.autograd.Function):
    """Identity forward; backward passes only the positive part of the incoming gradient."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad.clamp_min(0)


@contextmanager
def guided(model: nn.Module) -> Iterator[int]:
    """Within the block, every activation module's output passes through a positive-gradient gate.

    Hooks are removed on exit. Yields the number of activation modules guided.
    """
    handles = [
        m.register_forward_hook(lambda _m, _i, out: _PositiveGradient.apply(out))
        for m in model.modules()
        if isinstance(m, GUIDED_ACTIVATIONS)
    ]
    try:
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()


class _DeconvReLU(torch.autograd.Function):
    """``ReLU`` forward; backward ``ReLU(R_out)``: the forward activation's sign does not gate the signal."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad.clamp_min(0)


@contextmanager
def deconvolved(model: nn.Module) -> Iterator[int]:
    """Within the block, every ``nn.ReLU`` backpropagates by the deconvnet rule (inputs recomputed through
    :class:`_DeconvReLU`; in-place ReLUs run out of place meanwhile, so their input is still the
    pre-activation). Hooks are removed and ``inplace`` flags restored on exit. Yields the ReLU count."""
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    inplace = [m.inplace for m in relus]
    for m in relus:
        m.inplace = False
    handles = [m.register_forward_hook(lambda _m, inp, _out: _DeconvReLU.apply(inp[0])) for m in relus]
    try:
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in zip(relus, inplace, strict=True):
            m.inplace = flag


def _gated_gradient(model: nn.Module, images: Tensor, targets: Tensor, gate: Any, what: str) -> Tensor:
    """Input gradient of the target logits with ``gate(model)`` (a context yielding how many activation
    modules it rewired) active; raises when it rewired none."""
    x = images.detach().clone().requires_grad_(True)
    with gate(model) as count, torch.enable_grad():
        if count == 0:
            raise MethodNotApplicableError(
                f"{what}; this model has none (activations applied functionally cannot be hooked)"
            )
        logits = model(x)
        (grad,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), x)
    return grad


def guided_gradients(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
    """Guided-backprop input gradient of the target logits.

    ``R_in = R_out * 1[x_in > 0] * 1[R_out > 0]`` at every ReLU.

    Args:
        model: classifier in eval mode.
        images: ``[B, C, H, W]``.
        targets: ``[B]``.

    Returns:
        ``[B, C, H, W]`` signed attribution.
    """
    what = "guided backpropagation needs activation modules (nn.ReLU, nn.GELU, ...)"
    return _gated_gradient(model, images, targets, guided, what)


@register_cam(
    "guided_backprop",
    family="pixel",
    needs="nothing",
    forwards="1",
    backwards="1 (to the input)",
    reference="Springenberg et al., Striving for Simplicity, ICLR-W 2015, arXiv:1412.6806",
    output="pixel",
)
def guided_backprop(ctx: CamContext) -> Tensor:
    """Guided backpropagation, reduced to ``[B, H, W]`` by ``max_c |R_c|``."""
    return guided_gradients(ctx.model, ctx.images, ctx.targets).abs().amax(1)


@register_cam(
    "guided_grad_cam",
    family="pixel",
    needs="gradients",
    forwards="2",
    backwards="1 (to the target layer) + 1 (to the input)",
    reference="Selvaraju et al., Grad-CAM, ICCV 2017, arXiv:1610.02391",
    output="pixel",
)
def guided_grad_cam(ctx: CamContext) -> Tensor:
    """Guided Grad-CAM: ``GB(x) * Up(ReLU(Grad-CAM))`` (bilinear, as in the paper), then ``max_c |.|``.

    Grad-CAM comes from the shared (unguided) pass; guided backprop runs as a second pass.
    """
    data = ctx.data
    assert data.gradients is not None  # needs="gradients"
    gc = combine(data.gradients.mean((2, 3)), data.activations).clamp_min(0)
    gc = upsample(gc, (int(ctx.images.shape[2]), int(ctx.images.shape[3])))
    return guided_gradients(ctx.model, ctx.images, ctx.targets).abs().amax(1) * gc


@register_cam(
    "deconvnet",
    family="pixel",
    needs="nothing",
    forwards="1",
    backwards="1 (to the input)",
    reference="Zeiler & Fergus, Visualizing and Understanding Convolutional Networks, ECCV 2014, arXiv:1311.2901",
    output="pixel",
)
def deconvnet(ctx: CamContext) -> Tensor:
    """Deconvnet: the backward pass with ``R_in = ReLU(R_out)`` at every ``nn.ReLU`` (the forward mask
    ``1[x_in > 0]`` of the gradient is dropped; max-pooling keeps its switches), reduced by ``max_c |R_c|``.

    Other activation modules keep their own derivative; a model without ``nn.ReLU`` modules (functional
    ReLUs) cannot be deconvolved and raises :class:`~auditor.errors.MethodNotApplicableError`.
    """
    grad = _gated_gradient(ctx.model, ctx.images, ctx.targets, deconvolved, "deconvnet needs nn.ReLU modules")
    return grad.abs().amax(1)
