"""Methods derived from the target layer's activations ``A`` and gradients ``g = d y^c / d A``.

All of them read what one shared forward (+ one backward of the target logits) captured, so any number of
them costs one pass. Notation follows ``shared/METHODS.md`` §A: ``A`` is ``[B, K, h, w]``, ``y^c`` the
pre-softmax logit of the explained class, ``Z = h * w``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from auditor.cams.context import CamContext, combine, first_component, upsample
from auditor.cams.layers import capture, get_module, inspect_model, layer_pass, stage_layers
from auditor.cams.registry import CAMS, register_cam
from auditor.cams.speed import chunks
from auditor.errors import MethodNotApplicableError
from auditor.ops import minmax


def _grads(ctx: CamContext) -> Tensor:
    g = ctx.data.gradients
    if g is None:  # the engine captures gradients for every method registered with needs="gradients"
        raise RuntimeError(f"gradients of layer {ctx.layer!r} were not captured")
    return g


@register_cam(
    "cam",
    family="activation",
    needs="activations",
    forwards="1",
    backwards="0",
    reference="Zhou et al., Learning Deep Features for Discriminative Localization, CVPR 2016, arXiv:1512.04150",
    channel_weighted=True,
)
def cam(ctx: CamContext) -> Tensor:
    """CAM: ``M_c = sum_k w^c_k A^k`` with ``w^c`` the classifier row of class ``c`` (bias ignored).

    Only defined for a head that is global average pooling followed by one Linear layer. The requirement is
    checked numerically: the logits must equal ``mean_ij(A) @ W.T + b`` for the batch, otherwise
    :class:`MethodNotApplicableError` is raised (use ``grad_cam`` / ``hires_cam`` for other heads).
    """
    info = inspect_model(ctx.model, ctx.images)
    acts = ctx.data.activations
    requirement = "cam requires the target layer to be followed by global average pooling and one Linear layer"
    if info.head_linear is None:
        raise MethodNotApplicableError(f"{requirement}; no Linear layer produces the model's logits")
    linear = get_module(ctx.model, info.head_linear)
    assert isinstance(linear, nn.Linear)  # inspect_model only records nn.Linear heads
    weight = linear.weight.detach().float()
    if weight.shape[1] != acts.shape[1]:
        raise MethodNotApplicableError(
            f"{requirement}; layer {ctx.layer!r} has {acts.shape[1]} channels but the head "
            f"{info.head_linear!r} takes {weight.shape[1]} features"
        )
    bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros(weight.shape[0])
    predicted = acts.mean((2, 3)) @ weight.T + bias.to(acts.device)
    tol = 1e-3 * (1.0 + ctx.logits.abs().max().item())
    if not torch.allclose(predicted, ctx.logits, atol=tol, rtol=1e-3):
        raise MethodNotApplicableError(
            f"{requirement}; the logits are not mean(A) @ W.T + b for layer {ctx.layer!r} and head "
            f"{info.head_linear!r} (max difference {(predicted - ctx.logits).abs().max().item():.3g})"
        )
    return ctx.weighted(weight[ctx.targets], acts)


@register_cam(
    "grad_cam",
    family="gradient",
    needs="gradients",
    forwards="1",
    backwards="1 (to the target layer)",
    reference="Selvaraju et al., Grad-CAM, ICCV 2017, arXiv:1610.02391",
    channel_weighted=True,
)
def grad_cam(ctx: CamContext) -> Tensor:
    """Grad-CAM: ``alpha_k = (1/Z) sum_ij g^k_ij``; map ``sum_k alpha_k A^k`` (ReLU applied by the core)."""
    return ctx.weighted(_grads(ctx).mean((2, 3)), ctx.data.activations)


def gradcampp_weights(d1: Tensor, d2: Tensor, d3: Tensor, acts: Tensor) -> Tensor:
    """Grad-CAM++ channel weights from first/second/third derivative terms (closed form).

    ``alpha_ij = d2_ij / (2 d2_ij + (sum_ab A_ab) d3_ij)``, ``alpha := 0`` where ``d1 = 0``;
    ``w_k = sum_ij alpha_ij ReLU(d1_ij)``. Denominators smaller in magnitude than ``1e-6 * max|den|`` (per
    image) are clamped to that magnitude, keeping their sign: a *relative* floor, because an absolute eps
    (pytorch-grad-cam's 1e-6) is as large as typical denominators at ResNet ``layer4`` scale.

    Args:
        d1, d2, d3: ``[B, K, h, w]`` (``g, g^2, g^3`` or their averages over noisy copies).
        acts: ``[B, K, h, w]`` activations.

    Returns:
        ``[B, K]`` channel weights.
    """
    sum_a = acts.sum((2, 3), keepdim=True)
    den = 2 * d2 + sum_a * d3
    floor = 1e-6 * den.abs().flatten(1).amax(1).view(-1, 1, 1, 1)
    small = den.abs() < floor
    den = torch.where(small, torch.where(den < 0, -floor, floor), den)
    alpha = torch.where(d1 != 0, d2 / torch.where(den == 0, torch.ones_like(den), den), torch.zeros_like(den))
    return (alpha * d1.clamp_min(0)).sum((2, 3))


@register_cam(
    "grad_cam_pp",
    family="gradient",
    needs="gradients",
    forwards="1",
    backwards="1 (to the target layer)",
    reference="Chattopadhyay et al., Grad-CAM++, WACV 2018, arXiv:1710.11063",
    channel_weighted=True,
)
def grad_cam_pp(ctx: CamContext) -> Tensor:
    """Grad-CAM++, closed form under ``Y = exp(S)`` (Eq. 19 as in pytorch-grad-cam), relative eps.

    ``alpha = g^2 / (2 g^2 + sum_ab A_ab g^3)``, ``w_k = sum_ij alpha ReLU(g)``. The official code's extra
    per-channel renormalisation of alpha is not applied (it is not in the paper).
    """
    g = _grads(ctx)
    return ctx.weighted(gradcampp_weights(g, g * g, g * g * g, ctx.data.activations), ctx.data.activations)


@register_cam(
    "xgrad_cam",
    family="gradient",
    needs="gradients",
    forwards="1",
    backwards="1 (to the target layer)",
    reference="Fu et al., Axiom-based Grad-CAM, BMVC 2020, arXiv:2008.02312",
    channel_weighted=True,
)
def xgrad_cam(ctx: CamContext) -> Tensor:
    """XGrad-CAM: ``alpha_k = sum_ij (A^k_ij / sum_ab A^k_ab) g^k_ij``.

    Channels whose activation sum is ~0 (``|sum A| <= 1e-7 * max_k |sum A|``, dead channels) get weight 0
    instead of an eps-divided blow-up.
    """
    acts = ctx.data.activations
    sums = acts.sum((2, 3))
    num = (acts * _grads(ctx)).sum((2, 3))
    dead = sums.abs() <= 1e-7 * sums.abs().amax(1, keepdim=True)
    weights = torch.where(dead, torch.zeros_like(num), num / torch.where(dead, torch.ones_like(sums), sums))
    return ctx.weighted(weights, acts)


@register_cam(
    "hires_cam",
    family="gradient",
    needs="gradients",
    forwards="1",
    backwards="1 (to the target layer)",
    reference="Draelos & Carin, Use HiResCAM instead of Grad-CAM, arXiv:2011.08891",
    channel_weighted=True,
)
def hires_cam(ctx: CamContext) -> Tensor:
    """HiResCAM: ``sum_k g^k * A^k`` element-wise (no spatial averaging of the gradient)."""
    return ctx.weighted(_grads(ctx), ctx.data.activations)


@register_cam(
    "grad_cam_elementwise",
    family="gradient",
    needs="gradients",
    forwards="1",
    backwards="1 (to the target layer)",
    reference="pytorch-grad-cam GradCAMElementWise (HiResCAM variant, arXiv:2011.08891)",
)
def grad_cam_elementwise(ctx: CamContext) -> Tensor:
    """Element-wise Grad-CAM: ``sum_k ReLU(g^k * A^k)`` (ReLU before the channel sum)."""
    return (_grads(ctx) * ctx.data.activations).clamp_min(0).sum(1)


def _layer_cam_single(ctx: CamContext, name: str) -> Tensor:
    data = ctx.layers[name]
    grads = data.gradients
    if grads is None:
        raise RuntimeError(f"gradients of layer {name!r} were not captured")
    return combine(grads.clamp_min(0), data.activations).clamp_min(0)


@register_cam(
    "layer_cam",
    family="gradient",
    needs="gradients",
    forwards="1",
    backwards="1 (to the shallowest layer)",
    reference="Jiang et al., LayerCAM, IEEE TIP 30:5875-5888, 2021",
    options={"layers": None, "gamma": 2.0},
    multi_layer=True,
)
def layer_cam(ctx: CamContext) -> Tensor:
    """LayerCAM: ``ReLU(sum_k ReLU(g^k_ij) A^k_ij)``; several layers are fused (paper Eq. 9).

    Multi-layer fusion: each layer's map is divided by its per-image maximum; the maps of all but the
    deepest layer are rescaled by ``tanh(gamma * M)`` (the paper scales shallow layers; torchcam scales all);
    maps are upsampled bilinearly to the finest layer's grid and fused by element-wise maximum (as torchcam;
    pytorch-grad-cam averages instead). A single layer gives the raw, unscaled map.
    """
    names = ctx.layer_names
    if len(names) == 1:
        return _layer_cam_single(ctx, names[0])
    gamma = float(ctx.options["gamma"])
    scaled = []
    for i, m in enumerate(_layer_cam_single(ctx, name) for name in names):
        peak = m.flatten(1).amax(1).view(-1, 1, 1)
        m = torch.where(peak > 0, m / torch.where(peak > 0, peak, torch.ones_like(peak)), torch.zeros_like(m))
        scaled.append(torch.tanh(gamma * m) if i < len(names) - 1 else m)
    return on_finest_grid(scaled).amax(0)


def on_finest_grid(maps: list[Tensor]) -> Tensor:
    """Per-layer maps ``[B, h_l, w_l]`` upsampled bilinearly to the finest of their grids: ``[L, B, h, w]``."""
    h, w = max((tuple(m.shape[-2:]) for m in maps), key=lambda s: s[0] * s[1])
    return torch.stack([upsample(m, (int(h), int(w))) for m in maps])


@register_cam(
    "eigen_cam",
    family="activation",
    needs="activations",
    forwards="1",
    backwards="0",
    reference="Muhammad & Yeasin, Eigen-CAM, IJCNN 2020, arXiv:2008.00299",
    class_sensitive=False,
)
def eigen_cam(ctx: CamContext) -> Tensor:
    """Eigen-CAM: first principal component of the activations (class-agnostic: ignores the target)."""
    return first_component(ctx.data.activations)


@register_cam(
    "eigen_grad_cam",
    family="gradient",
    needs="gradients",
    forwards="1",
    backwards="1 (to the target layer)",
    reference="pytorch-grad-cam EigenGradCAM (Eigen-CAM, arXiv:2008.00299, on g * A)",
)
def eigen_grad_cam(ctx: CamContext) -> Tensor:
    """EigenGrad-CAM: first principal component of ``g * A`` (class-conditional)."""
    return first_component(_grads(ctx) * ctx.data.activations)


@register_cam(
    "smooth_grad_cam_pp",
    family="gradient",
    needs="activations",
    forwards="1 + N (N = num_samples, default 4)",
    backwards="N (to the target layer)",
    reference="Omeiza et al., Smooth Grad-CAM++, arXiv:1908.01224",
    options={"num_samples": 4, "std": 0.3, "seed": 0},
    expensive=True,
    channel_weighted=True,
)
def smooth_grad_cam_pp(ctx: CamContext) -> Tensor:
    """Smooth Grad-CAM++: Grad-CAM++ with ``g, g^2, g^3`` averaged over N noisy copies ``x + eps``.

    ``eps ~ N(0, std^2)`` is added to the (normalized) input, as in torchcam (``num_samples=4, std=0.3``);
    the averaged first derivative feeds the ``ReLU(g)`` factor (torchcam uses the last sample's) and the
    activations come from the clean input (the shared pass).
    """
    n = int(ctx.options["num_samples"])
    if n < 1:
        raise ValueError(f"smooth_grad_cam_pp num_samples must be >= 1, got {n}")
    std = float(ctx.options["std"])
    acts = ctx.data.activations
    b = acts.shape[0]
    d1, d2, d3 = (torch.zeros_like(acts) for _ in range(3))
    for sl in chunks(b * n, ctx.batch_size):
        job = torch.arange(sl.start, sl.stop, device=acts.device)
        idx = job % b
        x = ctx.images[idx]
        # noise keyed by (sample, draw): the same for a sample in any batch (CamContext.keyed_noise)
        noisy = x + std * ctx.keyed_noise(idx, job // b, tuple(x.shape[1:])).to(x.dtype)
        _, layers = layer_pass(ctx.model, noisy, ctx.targets[idx], [ctx.layer], grad=True)
        g = layers[ctx.layer].gradients
        assert g is not None  # grad=True
        d1.index_add_(0, idx, g)
        d2.index_add_(0, idx, g * g)
        d3.index_add_(0, idx, g * g * g)
    return ctx.weighted(gradcampp_weights(d1 / n, d2 / n, d3 / n, acts), acts)


# --------------------------------------------------------------------------------------------------
# second-order and contrastive objectives, multi-layer refinement
# --------------------------------------------------------------------------------------------------


def hessian_vector(ctx: CamContext) -> tuple[Tensor, Tensor]:
    """Gradient ``g = d y^c / d A`` and Hessian-vector product ``H A = d (g . v) / d A`` at ``v = A``.

    One forward to the target layer with a double backward (``create_graph=True``). A head that is
    piecewise linear in ``A`` (ReLU, pooling, Linear) has ``H = 0``.

    Returns:
        ``(g, H A)``, both ``[B, K, h, w]`` on the layer's grid.
    """
    layout = ctx.data.layout
    # the fused attention kernels have no double backward; the math kernel computes the same attention
    with capture(ctx.model, [ctx.layer], grad=True) as slots, torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        logits = ctx.model(ctx.images)
        acts = slots[ctx.layer].tensor
        assert acts is not None  # the shared pass ran this layer already
        score = logits.gather(1, ctx.targets[:, None]).sum()
        (g,) = torch.autograd.grad(score, acts, create_graph=True)
        hvp = None
        if g.requires_grad:
            (hvp,) = torch.autograd.grad(g, acts, grad_outputs=acts.detach(), allow_unused=True)
    grid_g = layout.to_grid(g.detach())
    return grid_g, torch.zeros_like(grid_g) if hvp is None else layout.to_grid(hvp.detach())


@register_cam(
    "shapley_cam",
    family="gradient",
    needs="activations",
    forwards="2",
    backwards="2 (to the target layer; the second is a Hessian-vector product)",
    reference="Cai et al., CAMs as Shapley Value-based Explainers, arXiv:2501.06261",
    channel_weighted=True,
)
def shapley_cam(ctx: CamContext) -> Tensor:
    """ShapleyCAM: ``alpha_k = (1/Z) sum_ij (g - H A / 2)^k_ij``; map ``sum_k alpha_k A^k``.

    The second-order Taylor expansion of the target logit around ``A`` (the paper's Shapley-value reading of
    Grad-CAM), as pytorch-grad-cam's ``ShapleyCAM``; the explained score is the raw logit (the paper's
    ReST target is a softmax-residual alternative not used here). Equal to Grad-CAM where the head is
    piecewise linear.
    """
    g, hvp = hessian_vector(ctx)
    return ctx.weighted((g - 0.5 * hvp).mean((2, 3)), ctx.data.activations)


FINER_BASES = ("grad_cam", "grad_cam_pp", "layer_cam", "hires_cam", "xgrad_cam")


def finer_references(logits: Tensor, targets: Tensor, count: int) -> Tensor:
    """The ``count`` classes whose logits are closest to the target's, per image (target excluded).

    Args:
        logits: ``[B, C]``.
        targets: ``[B]``.
        count: references per image (capped at ``C - 1``).

    Returns:
        ``[B, min(count, C - 1)]`` class indices, nearest first.
    """
    distance = (logits - logits.gather(1, targets[:, None])).abs()
    distance = distance.scatter(1, targets[:, None], float("inf"))
    return distance.topk(min(count, logits.shape[1] - 1), dim=1, largest=False).indices


@register_cam(
    "finer_cam",
    family="gradient",
    needs="activations",
    forwards="2",
    backwards="1 (to the target layer)",
    reference="Zhang et al., Finer-CAM: Spotting the Difference Reveals Finer Details for Visual Explanation, "
    "CVPR 2025, arXiv:2501.11309",
    options={"base": "grad_cam", "gamma": 0.6, "num_references": 3},
)
def finer_cam(ctx: CamContext) -> Tensor:
    """Finer-CAM: the base method on the contrast ``y_c - gamma * mean_t y_{d_t}``.

    ``d_1..d_T`` are the ``num_references`` classes whose logits on the clean image are closest to the
    target's (:func:`finer_references`); the base method (``grad_cam`` by default, or ``grad_cam_pp``,
    ``layer_cam``, ``hires_cam``, ``xgrad_cam``) reads the gradient of the contrast instead of the logit.
    torchcam's definition (``gamma = 0.6``, 3 references); pytorch-grad-cam weights the references by their
    softmax probability instead.
    """
    base = str(ctx.options["base"])
    if base not in FINER_BASES:
        raise ValueError(f"finer_cam base must be one of {FINER_BASES}, got {base!r}")
    if ctx.logits.shape[1] < 2:
        raise MethodNotApplicableError("finer_cam contrasts the class with similar classes; the model has 1 output")
    gamma = float(ctx.options["gamma"])
    refs = finer_references(ctx.logits, ctx.targets, int(ctx.options["num_references"]))

    def contrast(logits: Tensor) -> Tensor:
        own = logits.gather(1, ctx.targets[:, None])[:, 0]
        return own - gamma * logits.gather(1, refs).mean(1)

    _, layers = layer_pass(ctx.model, ctx.images, ctx.targets, [ctx.layer], grad=True, objective=contrast)
    sub = dataclasses.replace(ctx, layers={**ctx.layers, ctx.layer: layers[ctx.layer]}, layer_names=[ctx.layer])
    return CAMS[base].fn(sub)


REFINE_BASES = ("grad_cam_pp", "grad_cam", "layer_cam", "hires_cam", "xgrad_cam")


@register_cam(
    "refine_cam",
    family="gradient",
    needs="gradients",
    forwards="1",
    backwards="1 (to the shallowest layer)",
    reference="torchcam RefineCAM / pytorch-grad-cam RefineCAM, 'How to Evaluate and Refine your CAM', "
    "arXiv:2605.14641",
    options={"layers": None, "base": "grad_cam_pp"},
    multi_layer=True,
    default_layers=stage_layers,
)
def refine_cam(ctx: CamContext) -> Tensor:
    """RefineCAM: the product of the base method's maps over several layers.

    Each layer's map (``grad_cam_pp`` by default) is ReLU'd, min-max normalized per image, upsampled
    bilinearly to the finest grid and the maps are multiplied element-wise (torchcam's ``fuse_cams``). A
    region survives only where every layer agrees, which removes the noise of shallow layers. Default
    layers: the target layer and up to two earlier stages at finer grids (``layer2, layer3, layer4`` on a
    ResNet); the ``layers`` option names them explicitly. Needs at least two layers.
    """
    base = str(ctx.options["base"])
    if base not in REFINE_BASES:
        raise ValueError(f"refine_cam base must be one of {REFINE_BASES}, got {base!r}")
    names = ctx.layer_names
    if len(names) < 2:
        raise MethodNotApplicableError(
            f"refine_cam needs at least two layers at different depths; got {names} "
            "(pass method_options: {refine_cam: {layers: [...]}})"
        )
    maps = [
        minmax(CAMS[base].fn(dataclasses.replace(ctx, layer=name, layer_names=[name])).clamp_min(0), (1, 2))
        for name in names
    ]
    return on_finest_grid(maps).prod(0)
