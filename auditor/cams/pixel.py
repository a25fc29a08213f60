"""Pixel-space methods: guided backpropagation, Guided Grad-CAM, Deconvnet and FullGrad.

Both fail the model-parameter randomization test (Adebayo et al. 2018): they behave like edge detectors
and barely depend on the top layers. They are here for visual deep-dives, not for shortcut claims. Their
signed ``[B, 3, H, W]`` attribution is reduced to ``[B, H, W]`` by the maximum absolute value over channels.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
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


# --------------------------------------------------------------------------------------------------
# FullGrad
# --------------------------------------------------------------------------------------------------

#: Modules whose bias FullGrad attributes: the bias is added to the module's output.
BIAS_MODULES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)


def effective_bias(module: nn.Module) -> Tensor | None:
    """The constant a module adds to its output: a conv/linear bias, or BatchNorm's folded
    ``beta - mean * gamma / sqrt(var + eps)`` (eval mode, running statistics). None when it adds none."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.running_mean is None or module.running_var is None:
            return None
        scale = module.weight if module.weight is not None else torch.ones_like(module.running_mean)
        shift = module.bias if module.bias is not None else torch.zeros_like(module.running_mean)
        return (shift - module.running_mean * scale / torch.sqrt(module.running_var + module.eps)).detach()
    bias = getattr(module, "bias", None)
    return bias.detach() if isinstance(bias, Tensor) else None


def _bias_modules(model: nn.Module) -> list[tuple[str, nn.Module, Tensor]]:
    out = []
    for name, module in model.named_modules():
        if isinstance(module, BIAS_MODULES):
            bias = effective_bias(module)
            if bias is not None:
                out.append((name, module, bias))
    return out


def full_gradients(model: nn.Module, images: Tensor, targets: Tensor) -> tuple[Tensor, list[tuple[str, Tensor]]]:
    """FullGrad's decomposition of the target logit: input-gradients and bias-gradients.

    For a network whose only non-linearities are piecewise linear (ReLU, max-pooling) and whose constants are
    the biases of ``Conv2d`` / ``BatchNorm2d`` (eval) / ``Linear`` modules, completeness holds:
    ``y^c = sum(grad_x * x) + sum_l sum(grad_{z_l} * b_l)`` (Srinivas & Fleuret 2019, Eq. 2).

    Args:
        model: classifier in eval mode.
        images: ``[B, C, H, W]``.
        targets: ``[B]``.

    Returns:
        ``(grad_x * x [B, C, H, W], [(module name, grad_z * b)])`` where each bias term has the module's
        output shape (``[B, K, h, w]`` for conv / BatchNorm; any shape for Linear, bias on the last axis).
    """
    mods = _bias_modules(model)
    outs: dict[str, Tensor] = {}

    def make_hook(name: str) -> Any:
        def hook(_m: nn.Module, _i: Any, out: Any) -> Any:
            if isinstance(out, Tensor):
                outs[name] = out
                return out.clone()  # a later in-place op must not rewrite the tensor differentiated
            return None

        return hook

    handles = [m.register_forward_hook(make_hook(name)) for name, m, _ in mods]
    x = images.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            logits = model(x)
            used = [(name, bias) for name, _, bias in mods if name in outs and outs[name].requires_grad]
            grads = torch.autograd.grad(
                logits.gather(1, targets[:, None]).sum(), [x, *[outs[n] for n, _ in used]], allow_unused=True
            )
    finally:
        for handle in handles:
            handle.remove()
    kinds = {name: isinstance(m, nn.Linear) for name, m, _ in mods}
    terms = []
    for (name, bias), g in zip(used, grads[1:], strict=True):
        if g is None:
            continue
        # a Linear's bias runs along the last axis ([B, D], tokens [B, N, D], Swin's [B, H, W, C]); a conv's
        # and a BatchNorm's along the channels (dim 1)
        shape = [1] * (g.ndim - 1) + [-1] if kinds[name] else [1, -1] + [1] * (g.ndim - 2)
        terms.append((name, g * bias.to(g.dtype).view(shape)))
    grad_x = grads[0] if grads[0] is not None else torch.zeros_like(x)
    return grad_x * x.detach(), terms


def _fullgrad_requires(model: nn.Module, example: Tensor) -> str | None:
    spatial = [name for name, m, _ in _bias_modules(model) if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    if not spatial:
        return "fullgrad needs the biases of Conv2d / BatchNorm2d layers (their gradient maps); this model has none"
    return None


@register_cam(
    "fullgrad",
    family="pixel",
    needs="nothing",
    forwards="1",
    backwards="1 (to the input)",
    reference="Srinivas & Fleuret, Full-Gradient Representation for Neural Network Visualization, NeurIPS 2019, "
    "arXiv:1905.00780",
    options={"scale": "layer"},
    output="pixel",
    requires=_fullgrad_requires,
)
def fullgrad(ctx: CamContext) -> Tensor:
    """FullGrad: ``psi(|grad_x * x|) + sum_l sum_channels psi(|grad_z_l * b_l|)`` over conv / BatchNorm layers.

    ``psi`` is the authors' post-processing (idiap/fullgrad-saliency): absolute value, min-max per image over
    all channels of the layer, channel sum, bilinear upsampling to the input (``align_corners=True``). With
    ``scale: channel`` every channel is min-max scaled on its own, then upsampled (``align_corners=False``)
    and summed, as pytorch-grad-cam's ``FullGrad``. Linear biases belong to the decomposition but have no
    spatial map. Raises :class:`MethodNotApplicableError` when the model has no Conv2d / BatchNorm2d bias.
    """
    mode = str(ctx.options["scale"])
    if mode not in ("layer", "channel"):
        raise ValueError(f"fullgrad scale must be 'layer' or 'channel', got {mode!r}")
    reason = _fullgrad_requires(ctx.model, ctx.images)
    if reason:
        raise MethodNotApplicableError(reason)
    size = (int(ctx.images.shape[2]), int(ctx.images.shape[3]))
    input_term, terms = full_gradients(ctx.model, ctx.images, ctx.targets)

    def psi(t: Tensor) -> Tensor:
        # (t - min) / (max - min + eps) with the eps each reference adds (not a floor: tiny terms stay tiny)
        dims, eps = ((2, 3), 1e-7) if mode == "channel" else ((1, 2, 3), 1e-6)
        t = t.abs().float()
        t = t - t.amin(dim=dims, keepdim=True)
        t = t / (t.amax(dim=dims, keepdim=True) + eps)
        # interpolation is linear: summing the channels first gives the same map, upsampled once
        return F.interpolate(t.sum(1, keepdim=True), size=size, mode="bilinear", align_corners=mode == "layer")[:, 0]

    spatial = {name for name, m in ctx.model.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))}
    total = psi(input_term)
    for name, term in terms:
        if name in spatial:  # Linear biases complete the decomposition but have no channel-first map
            total = total + psi(term)
    return total
