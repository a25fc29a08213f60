"""Gradient-free methods on the target layer's activations: FEM, KPCA-CAM, Deep Feature Factorization, and
the RandomCAM baseline.

All read the activations of the shared forward (``A`` is ``[B, K, h, w]``, ``Z = h * w``); none looks at the
explained class except DFF, which labels its concepts with the model's own linear head.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from auditor.cams.context import CamContext
from auditor.cams.layers import get_module, inspect_model
from auditor.cams.registry import register_cam
from auditor.errors import MethodNotApplicableError
from auditor.ops import factorize


@register_cam(
    "fem",
    family="activation",
    needs="activations",
    forwards="1",
    backwards="0",
    reference=(
        "Fuad et al., Features Understanding in 3D CNNs for Actions Recognition in Video, IPTA 2020 "
        "(hal-02963298); pytorch-grad-cam FEM"
    ),
    options={"k": 2.0},
    class_sensitive=False,
    channel_weighted=True,
)
def fem(ctx: CamContext) -> Tensor:
    """FEM (Feature Explanation Method): k-sigma channel selection, gradient-free.

    Per image and channel, ``t_k = mean(A^k) + k * std(A^k)`` (population std over the ``Z`` positions);
    ``w_k = (1/Z) sum_ij 1[A^k_ij > t_k]`` is the share of positions where the channel fires exceptionally;
    map ``sum_k w_k A^k``. Class-agnostic: it shows what the layer finds salient, not what a class uses.
    """
    k = float(ctx.options["k"])
    acts = ctx.data.activations
    mean = acts.mean((2, 3), keepdim=True)
    std = acts.std((2, 3), keepdim=True, correction=0)
    weights = (acts > mean + k * std).float().mean((2, 3))
    return ctx.weighted(weights, acts)


KERNELS = ("linear", "poly", "rbf", "sigmoid", "cosine")


def kernel_matrix(x: Tensor, kernel: str, gamma: float | None, degree: int = 3, coef0: float = 1.0) -> Tensor:
    """Kernel matrix of the rows of ``x`` with scikit-learn's definitions (``gamma=None`` -> ``1 / features``).

    Args:
        x: ``[B, n, d]`` observations (rows) per image.
        kernel: one of :data:`KERNELS`.
        gamma: kernel coefficient for poly / rbf / sigmoid.
        degree: poly degree.
        coef0: independent term of poly / sigmoid.

    Returns:
        ``[B, n, n]``.
    """
    g = 1.0 / x.shape[-1] if gamma is None else float(gamma)
    dot = x @ x.transpose(1, 2)
    if kernel == "linear":
        return dot
    if kernel == "poly":
        return (g * dot + coef0) ** degree
    if kernel == "sigmoid":
        return torch.tanh(g * dot + coef0)
    if kernel == "rbf":
        sq = (x * x).sum(-1)
        return torch.exp(-g * (sq[:, :, None] + sq[:, None, :] - 2 * dot).clamp_min(0))
    if kernel == "cosine":
        norm = x.norm(dim=-1).clamp_min(1e-12)
        return dot / (norm[:, :, None] * norm[:, None, :])
    raise ValueError(f"kpca_cam kernel must be one of {KERNELS}, got {kernel!r}")


def kernel_first_component(x: Tensor, kernel: str, gamma: float | None) -> Tensor:
    """Scores of each observation on the first kernel principal component (scikit-learn ``KernelPCA``).

    The kernel matrix is double-centred; with its top eigenpair ``(lambda, v)`` the score is
    ``sqrt(lambda) v``, signed so that its largest-magnitude entry is positive (scikit-learn's ``svd_flip``).
    With the linear kernel this is exactly the PCA projection of Eigen-CAM.

    Args:
        x: ``[B, n, d]`` observations per image (already centred over ``n`` by the caller, as
            pytorch-grad-cam does).
        kernel, gamma: see :func:`kernel_matrix`.

    Returns:
        ``[B, n]``; all-zero where the top eigenvalue is not positive.
    """
    k = kernel_matrix(x, kernel, gamma)
    n = k.shape[-1]
    one = torch.full((n, n), 1.0 / n, dtype=k.dtype, device=k.device)
    kc = k - one @ k - k @ one + one @ k @ one
    kc = (kc + kc.transpose(1, 2)) / 2
    vals, vecs = torch.linalg.eigh(kc)
    lam, v = vals[:, -1], vecs[:, :, -1]
    proj = v * lam.clamp_min(0).sqrt()[:, None]
    peak = proj.gather(1, proj.abs().argmax(1, keepdim=True))
    return torch.where(peak < 0, -proj, proj)


@register_cam(
    "kpca_cam",
    family="activation",
    needs="activations",
    forwards="1",
    backwards="0",
    reference="Karmani et al., KPCA-CAM: Visual Explainability of Deep Computer Vision Models using Kernel PCA, "
    "MMSP 2024, arXiv:2410.00267",
    options={"kernel": "sigmoid", "gamma": None},
    class_sensitive=False,
)
def kpca_cam(ctx: CamContext) -> Tensor:
    """KPCA-CAM: Eigen-CAM with kernel PCA: the positions' scores on the first kernel principal component.

    The ``Z x K`` activations are centred over positions (as pytorch-grad-cam), the ``Z x Z`` kernel matrix
    (``sigmoid`` by default, ``gamma = 1/K``) is centred and its top eigenvector scaled by
    ``sqrt(eigenvalue)`` (scikit-learn ``KernelPCA(n_components=1)``). Class-agnostic. Cost ``O(Z^3)`` per
    image: fine at ``7 x 7`` to ``28 x 28`` grids.
    """
    acts = ctx.data.activations
    b, _, h, w = acts.shape
    obs = acts.flatten(2).transpose(1, 2).double()
    finite = torch.isfinite(obs).flatten(1).all(1)
    obs = torch.where(finite[:, None, None], obs, torch.zeros_like(obs))
    obs = obs - obs.mean(1, keepdim=True)
    proj = kernel_first_component(obs, str(ctx.options["kernel"]), ctx.options["gamma"])
    proj = torch.where(finite[:, None], proj, torch.full_like(proj, float("nan")))  # flagged invalid
    return proj.float().view(b, h, w)


@register_cam(
    "random_cam",
    family="activation",
    needs="activations",
    forwards="1",
    backwards="0",
    reference="pytorch-grad-cam RandomCAM (baseline: channel weights drawn uniformly from [-1, 1])",
    options={"seed": 0},
    class_sensitive=False,
    channel_weighted=True,
)
def random_cam(ctx: CamContext) -> Tensor:
    """RandomCAM: ``w_k ~ U(-1, 1)`` per image and channel; map ``sum_k w_k A^k``.

    A baseline that every metric should beat: a metric that scores RandomCAM like Grad-CAM does not separate
    explanations from noise. The draw is keyed by the sample's key and ``seed``, so a sample gets the same
    weights in any batch.
    """
    acts = ctx.data.activations
    b, k = acts.shape[:2]
    img = torch.arange(b, device=acts.device)
    weights = 2 * ctx.keyed_uniform(img, torch.zeros_like(img), (k,)) - 1
    return ctx.weighted(weights.to(acts.dtype), acts)


# --------------------------------------------------------------------------------------------------
# Deep Feature Factorization
# --------------------------------------------------------------------------------------------------


def linear_head(model: nn.Module, example: Tensor, channels: int) -> nn.Linear | None:
    """The model's final ``nn.Linear`` when it takes ``channels`` features (the GAP + Linear head of CAM)."""
    info = inspect_model(model, example)
    if info.head_linear is None:
        return None
    head = get_module(model, info.head_linear)
    return head if isinstance(head, nn.Linear) and head.in_features == channels else None


@register_cam(
    "dff",
    family="activation",
    needs="activations",
    forwards="1",
    backwards="0",
    reference="Collins et al., Deep Feature Factorization for Concept Discovery, ECCV 2018, arXiv:1806.10206",
    options={"n_components": 5},
)
def dff(ctx: CamContext) -> Tensor:
    """DFF map: the heatmap of the image's concept that the model's head scores highest for the class.

    Per image, the ``K x Z`` activations are factorized into ``n_components`` concepts (:func:`factorize`);
    each concept embedding is scored by the model's final Linear layer (pytorch-grad-cam's
    ``computation_on_concepts``) and the map is the heatmap ``H_j`` of the concept with the highest logit for
    the explained class. Raises :class:`MethodNotApplicableError` when the head is not one Linear layer on
    the target layer's channels. The dataset-level DFF analysis (concepts per class) is
    :mod:`auditor.shortcuts.concepts`.
    """
    acts = ctx.data.activations
    b, k, h, w = acts.shape
    head = linear_head(ctx.model, ctx.images, k)
    if head is None:
        raise MethodNotApplicableError(
            f"dff scores its concepts with a final Linear layer taking the {k} channels of layer {ctx.layer!r}; "
            "this model has none"
        )
    out = torch.zeros(b, h, w)
    arrays = acts.detach().cpu().numpy()
    for i in range(b):
        embeddings, heat, offset = factorize(arrays[i].reshape(k, -1), int(ctx.options["n_components"]))
        concepts = embeddings + offset
        with torch.no_grad():
            scores = head(torch.as_tensor(concepts.T, dtype=head.weight.dtype, device=head.weight.device))
        best = int(scores[:, int(ctx.targets[i])].argmax())
        out[i] = torch.as_tensor(heat[best].reshape(h, w), dtype=torch.float32)
    return out.to(acts.device)
