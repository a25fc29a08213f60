"""Methods that score perturbed inputs: Score-CAM family, Ablation-CAM, occlusion, RISE.

Their cost is forward passes, so every method flattens its (image, channel | mask | window) jobs into one
index range and evaluates it in chunks of ``batch_size`` forwards; perturbed inputs are built per chunk and
never materialised for a whole batch (no ``B x K x C x H x W`` tensor). "Removed" means 0 in the model's
normalized input space (= the dataset-mean colour), as in every reference implementation.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import weakref
from collections.abc import Callable

import torch
import torch.fx
from torch import Tensor, nn

from auditor.cams.context import CamContext, upsample
from auditor.cams.layers import Layout, get_module
from auditor.cams.registry import register_cam
from auditor.cams.speed import balanced_chunks, chunks
from auditor.ops import minmax

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Score-CAM family
# --------------------------------------------------------------------------------------------------

MaskFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (masks, repeat, image, channel) -> masks


def _channel_scores(ctx: CamContext, repeats: int, perturb: MaskFn, *, exact_zero: bool) -> Tensor:
    """Mean over ``repeats`` of the target logit of ``x * mask`` for every (image, channel).

    The mask of channel ``k`` is ``H^k = minmax(Up(A^k))`` (bilinear, ``align_corners=False``, then min-max
    per channel), transformed per repeat by ``perturb(H [n, H, W], repeat [n], image [n], channel [n])``.

    Args:
        ctx: method context.
        repeats: number of perturbed copies per (image, channel), averaged.
        perturb: mask transform for a chunk of jobs.
        exact_zero: when True, ``perturb`` maps an all-zero mask to an all-zero mask, so the input of a
            constant channel is the all-zero image for every repeat: it is scored once per target class
            instead of once per job (many ``layer4`` channels are dead for a given image).

    Returns:
        ``[B, K]`` mean target logit.
    """
    acts = ctx.data.activations
    b, k = acts.shape[:2]
    size = (int(ctx.images.shape[2]), int(ctx.images.shape[3]))
    flat = acts.flatten(2)
    constant = flat.amax(2) <= flat.amin(2)  # [B, K]
    out = torch.zeros(b * k, device=acts.device)
    if exact_zero and bool(constant.any()):
        zero_logits = ctx.forward(torch.zeros_like(ctx.images[:1]))[0]
        out[constant.flatten()] = zero_logits[ctx.targets].repeat_interleave(k)[constant.flatten()]
        jobs = (~constant).flatten().nonzero().flatten()
    else:
        jobs = torch.arange(b * k, device=acts.device)
    pairs = jobs.repeat_interleave(repeats)
    reps = torch.arange(repeats, device=acts.device).repeat(jobs.numel())
    sums = torch.zeros(b * k, device=acts.device)
    for sl in chunks(pairs.numel(), ctx.batch_size):
        job, rep = pairs[sl], reps[sl]
        img, chan = job // k, job % k
        masks = minmax(upsample(acts[img, chan], size), (1, 2))
        masks = perturb(masks, rep, img, chan)
        sums.index_add_(0, job, ctx.scores(ctx.images[img] * masks[:, None], ctx.targets[img]))
    out[jobs] = sums[jobs] / repeats
    return out.view(b, k)


@register_cam(
    "score_cam",
    family="perturbation",
    needs="activations",
    forwards="1 + K (K = channels; dead channels share one forward)",
    backwards="0",
    reference="Wang et al., Score-CAM, CVPR-W 2020, arXiv:1910.01279",
    channel_weighted=True,
)
def score_cam(ctx: CamContext) -> Tensor:
    """Score-CAM: ``alpha = softmax_k(y^c(x * H^k))``, ``H^k = minmax(Up(A^k))``, map ``sum_k alpha_k A^k``.

    The paper's Algorithm 1 with logits and a softmax across channels (the baseline term cancels), as in
    pytorch-grad-cam except for ``align_corners=False`` upsampling (the official code and torchcam).
    """
    scores = _channel_scores(ctx, 1, lambda m, _r, _i, _c: m, exact_zero=True)
    return ctx.weighted(scores.softmax(1), ctx.data.activations)


@register_cam(
    "ss_cam",
    family="perturbation",
    needs="activations",
    forwards="1 + N*K (N = num_samples, default 35)",
    backwards="0",
    reference="Wang et al., SS-CAM: Smoothed Score-CAM, arXiv:2006.14255",
    options={"num_samples": 35, "std": 2.0, "seed": 0},
    channel_weighted=True,
)
def ss_cam(ctx: CamContext) -> Tensor:
    """SS-CAM (torchcam): ``alpha = softmax_k(mean_n[y^c((H^k + delta_n) * x) - y^c(x)])``.

    ``delta_n ~ N(0, std^2)`` per pixel, added to the normalized, upsampled activation map (not clipped);
    keyed by sample, channel and repeat (:meth:`CamContext.keyed_noise`), so batches do not change it.
    """
    n = int(ctx.options["num_samples"])
    std = float(ctx.options["std"])

    def noisy(masks: Tensor, rep: Tensor, img: Tensor, chan: Tensor) -> Tensor:
        return masks + std * ctx.keyed_noise(img, chan * n + rep, tuple(masks.shape[1:])).to(masks.dtype)

    scores = _channel_scores(ctx, n, noisy, exact_zero=False) - ctx.base_scores()[:, None]
    return ctx.weighted(scores.softmax(1), ctx.data.activations)


@register_cam(
    "is_cam",
    family="perturbation",
    needs="activations",
    forwards="1 + N*K (N = num_samples, default 10)",
    backwards="0",
    reference="Naidu et al., IS-CAM: Integrated Score-CAM, arXiv:2010.03023",
    options={"num_samples": 10},
    channel_weighted=True,
)
def is_cam(ctx: CamContext) -> Tensor:
    """IS-CAM (torchcam): ``alpha = softmax_k(mean_i[y^c(beta_i H^k * x) - y^c(x)])``.

    ``beta_i = i (i + 1) / (2 N)`` for ``i = 1..N``: torchcam's cumulative coefficient, which exceeds 1 for
    large ``i`` (masks amplify the input); a plain Riemann sum over [0, 1] would differ.
    """
    n = int(ctx.options["num_samples"])
    betas = torch.tensor([(i + 1) * (i + 2) / (2 * n) for i in range(n)], device=ctx.images.device)

    def scaled(masks: Tensor, rep: Tensor, _img: Tensor, _chan: Tensor) -> Tensor:
        return masks * betas[rep][:, None, None]

    scores = _channel_scores(ctx, n, scaled, exact_zero=True) - ctx.base_scores()[:, None]
    return ctx.weighted(scores.softmax(1), ctx.data.activations)


# --------------------------------------------------------------------------------------------------
# Ablation-CAM
# --------------------------------------------------------------------------------------------------


class _LeafTracer(torch.fx.Tracer):
    """fx tracer that keeps the target layer as one opaque call."""

    def __init__(self, leaf: str) -> None:
        super().__init__()
        self.leaf = leaf

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name == self.leaf or super().is_leaf_module(m, module_qualified_name)


HEAD_CHUNK = 512  # ablated rows per head-only forward

_TAILS: weakref.WeakKeyDictionary[nn.Module, dict[str, nn.Module | None]] = weakref.WeakKeyDictionary()


def head_after(model: nn.Module, layer: str) -> nn.Module | None:
    """The part of ``model`` after ``layer`` as a module ``A -> logits``, or None if it cannot be split.

    Uses ``torch.fx``: the model is traced with ``layer`` as a leaf; the nodes the output needs are copied
    into a new graph whose input is the layer's output. Returns None when the model cannot be traced or the
    output also depends on the input through a path that bypasses ``layer`` (a skip connection around it).
    The head shares the model's parameters. Cached per model and layer.
    """
    cache = _TAILS.setdefault(model, {})
    if layer in cache:
        return cache[layer]
    tail: nn.Module | None = None
    try:
        tracer = _LeafTracer(layer)
        graph = tracer.trace(model)
    except (torch.fx.proxy.TraceError, TypeError, NotImplementedError, RuntimeError, AttributeError) as err:
        log.debug("model is not fx-traceable (%s); Ablation-CAM re-runs the whole network", err)
        graph = None
    if graph is not None:
        tail = _cut_graph(tracer.root, graph, layer)
    cache[layer] = tail
    return tail


def _cut_graph(root: nn.Module, graph: torch.fx.Graph, layer: str) -> nn.Module | None:
    cuts = [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
    outputs = [n for n in graph.nodes if n.op == "output"]
    if len(cuts) != 1 or len(outputs) != 1:
        return None
    cut = cuts[0]
    needed: set[torch.fx.Node] = set()
    stack = [outputs[0]]
    while stack:
        node = stack.pop()
        if node in needed or node is cut:
            continue
        if node.op == "placeholder":
            return None  # the output sees the input through a path that bypasses the layer
        needed.add(node)
        stack.extend(node.all_input_nodes)
    new = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {cut: new.placeholder("activation")}
    for node in graph.nodes:
        if node in needed:
            env[node] = new.node_copy(node, lambda n: env[n])
    return torch.fx.GraphModule(root, new)


def _ablated_logits_full(ctx: CamContext, layout: Layout, img: Tensor, chan: Tensor) -> Tensor:
    """Logits of images ``img`` with channel ``chan`` of the target layer zeroed, by re-running everything."""
    ablated = layout.ablate(ctx.data.raw[img], chan)
    handle = get_module(ctx.model, ctx.layer).register_forward_hook(lambda _m, _i, _o: ablated)
    try:
        return ctx.forward(ctx.images[img])
    finally:
        handle.remove()


@register_cam(
    "ablation_cam",
    family="perturbation",
    needs="activations",
    forwards="1 + K (only the layers after the target layer when the graph splits)",
    backwards="0",
    reference="Desai & Ramaswamy, Ablation-CAM, WACV 2020",
    channel_weighted=True,
)
def ablation_cam(ctx: CamContext) -> Tensor:
    """Ablation-CAM: ``w_k = (y^c - y^c_k) / y^c`` with channel ``k`` of the target layer set to 0.

    The ablation value is 0 as in the paper (pytorch-grad-cam uses ``min(A) - 1e7`` for layers with negative
    activations). When the network splits at the target layer (``torch.fx``), only the layers after it are
    re-run for each ablated channel; otherwise the whole network is. Note: ``y^c`` is a logit, so the
    weights explode or flip sign when it is near zero or negative (a known weakness of the method).
    """
    data = ctx.data
    layout = data.layout
    b, k = data.activations.shape[:2]
    base = ctx.base_scores()
    head = head_after(ctx.model, ctx.layer)
    if head is not None:
        with torch.no_grad():
            check = head(data.raw).float()
        if not torch.allclose(check, ctx.logits, atol=1e-4 * (1 + ctx.logits.abs().max().item()), rtol=1e-3):
            log.debug("fx head of %r does not reproduce the logits; re-running the whole network", ctx.layer)
            head = None
    ablated = torch.empty(b * k, device=ctx.images.device)
    # Head-only rows are one layer output each (e.g. 512x7x7 floats), far smaller than an image forward.
    chunk = ctx.batch_size if head is None else max(ctx.batch_size, HEAD_CHUNK)
    for sl in balanced_chunks(b * k, chunk):
        job = torch.arange(sl.start, sl.stop, device=ctx.images.device)
        img, chan = job // k, job % k
        if head is not None:
            with torch.no_grad():
                logits = head(layout.ablate(data.raw[img], chan)).float()
        else:
            logits = _ablated_logits_full(ctx, layout, img, chan)
        ablated[sl] = logits.gather(1, ctx.targets[img][:, None])[:, 0]
    weights = (base[:, None] - ablated.view(b, k)) / base[:, None]
    return ctx.weighted(weights, data.activations)


# --------------------------------------------------------------------------------------------------
# Occlusion and RISE (black box: need only the model)
# --------------------------------------------------------------------------------------------------


def window_starts(length: int, window: int, stride: int) -> Tensor:
    """Window start offsets along one axis: ``ceil((length - window) / stride) + 1`` windows from 0 (captum).

    The last window may run past the edge and is clipped.
    """
    if window < 1 or stride < 1:
        raise ValueError(f"occlusion window and stride must be >= 1, got window={window}, stride={stride}")
    count = max(0, math.ceil((length - window) / stride)) + 1
    return torch.arange(count) * stride


@register_cam(
    "occlusion",
    family="perturbation",
    needs="nothing",
    hooks=False,
    forwards="1 + windows (ceil((H-w)/s)+1)^2",
    backwards="0",
    reference="Zeiler & Fergus, Visualizing and Understanding Convolutional Networks, ECCV 2014, arXiv:1311.2901",
    options={"window": 16, "stride": 8, "baseline": 0.0, "score": "prob", "importance": "drop"},
    output="pixel",
)
def occlusion(ctx: CamContext) -> Tensor:
    """Occlusion sensitivity (captum ``Occlusion`` semantics).

    For each window ``P`` (size ``window``, step ``stride``, first at 0): ``delta = f_c(x) - f_c(x with P
    := baseline)`` (``importance: drop``, captum's), or ``delta = 1 - p_c(x with P := baseline)``
    (``importance: complement``, Zeiler & Fergus's "probability of the correct class" read as importance;
    probabilities only); a pixel's value is the mean ``delta`` over the windows covering it. ``f_c`` is
    the softmax probability (``score: prob``, as in Zeiler & Fergus) or the logit (``score: logit``).
    """
    win, stride = int(ctx.options["window"]), int(ctx.options["stride"])
    kind = str(ctx.options["score"])
    importance = str(ctx.options["importance"])
    if importance not in ("drop", "complement"):
        raise ValueError(f"occlusion importance must be 'drop' or 'complement', got {importance!r}")
    if importance == "complement" and kind != "prob":
        raise ValueError("occlusion importance 'complement' (1 - p) needs score: prob")
    b, _, h, w = ctx.images.shape
    dev = ctx.images.device
    ys, xs = window_starts(h, win, stride).to(dev), window_starts(w, win, stride).to(dev)
    n_win = ys.numel() * xs.numel()
    rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)

    def patches(pos: Tensor) -> Tensor:  # [n] window index -> [n, h, w] bool
        y0, x0 = ys[pos // xs.numel()], xs[pos % xs.numel()]
        in_y = (rows[None] >= y0[:, None]) & (rows[None] < y0[:, None] + win)
        in_x = (cols[None] >= x0[:, None]) & (cols[None] < x0[:, None] + win)
        return in_y[:, :, None] & in_x[:, None, :]

    counts = torch.zeros(h, w, device=dev)
    for sl in chunks(n_win, 4096):
        counts += patches(torch.arange(sl.start, sl.stop, device=dev)).sum(0)
    if ctx.mixed_precision and dev.type == "cpu":
        # bfloat16 resolves a probability near 1 to 1/256, coarser than most windows' deltas: its maps fell
        # to rank correlation 0.979 with float32 (benchmarks/README.md). Occlusion stays float32 there.
        ctx = dataclasses.replace(ctx, mixed_precision=False)
    # The unperturbed score on the same precision path as the occluded ones, so that (under mixed precision)
    # the forward's rounding error cancels in the differences instead of biasing every window.
    base = ctx.scores(ctx.images, ctx.targets, kind) if ctx.mixed_precision else ctx.base_scores(kind)
    total = torch.zeros(b, h, w, device=dev)
    baseline = float(ctx.options["baseline"])
    for sl in balanced_chunks(b * n_win, ctx.batch_size):
        job = torch.arange(sl.start, sl.stop, device=dev)
        img, pos = job // n_win, job % n_win
        patch = patches(pos)
        x = torch.where(patch[:, None], torch.full_like(ctx.images[img], baseline), ctx.images[img])
        ref = base[img] if importance == "drop" else torch.ones_like(base[img])
        delta = ref - ctx.scores(x, ctx.targets[img], kind)
        total.index_add_(0, img, delta[:, None, None] * patch)
    return total / counts.clamp_min(1)


RISE_MASK_BLOCK = 256


def rise_masks(n: int, cells: int, p: float, size: tuple[int, int], generator: torch.Generator) -> Tensor:
    """RISE masks (eclique/RISE ``generate_masks``), ``[n, H, W]`` float in [0, 1].

    A binary ``cells x cells`` grid with ``P(1) = p`` is upsampled bilinearly to ``(cells + 1) * cell``
    pixels (``cell = ceil(H / cells)``), shifted by a random offset in ``[0, cell)`` and cropped to ``H x W``.
    """
    h, w = size
    dev = generator.device
    ch, cw = math.ceil(h / cells), math.ceil(w / cells)
    grid = (torch.rand(n, 1, cells, cells, generator=generator, device=dev) < p).float()
    up = torch.nn.functional.interpolate(
        grid, size=((cells + 1) * ch, (cells + 1) * cw), mode="bilinear", align_corners=False
    )[:, 0]
    dy = torch.randint(0, ch, (n,), generator=generator, device=dev)
    dx = torch.randint(0, cw, (n,), generator=generator, device=dev)
    rows = dy[:, None] + torch.arange(h, device=dev)[None]
    cols = dx[:, None] + torch.arange(w, device=dev)[None]
    return up[torch.arange(n, device=dev)[:, None, None], rows[:, :, None], cols[:, None, :]]


@register_cam(
    "rise",
    family="perturbation",
    needs="nothing",
    hooks=False,
    forwards="N (num_masks, default 4000)",
    backwards="0",
    reference="Petsiuk et al., RISE, BMVC 2018, arXiv:1806.07421",
    options={"num_masks": 4000, "cells": 7, "p": 0.5, "score": "prob", "seed": 0},
    output="pixel",
)
def rise(ctx: CamContext) -> Tensor:
    """RISE: ``S(lambda) = 1 / (p N) sum_n f_c(x * M_n) M_n(lambda)`` with random smooth masks.

    Paper defaults (N = 4000, 7 x 7 cells, p = 0.5) and softmax probabilities; the same seeded masks are
    used for every image of the batch, generated chunk by chunk.
    """
    n, cells, p = int(ctx.options["num_masks"]), int(ctx.options["cells"]), float(ctx.options["p"])
    kind = str(ctx.options["score"])
    if not 0 < p <= 1:
        raise ValueError(f"rise p must be in (0, 1], got {p}")
    b, _, h, w = ctx.images.shape
    per_img = min(b, ctx.batch_size)
    per_mask = max(1, ctx.batch_size // per_img)
    gen = ctx.rng()
    sal = torch.zeros(b, h, w, device=ctx.images.device)
    # Masks come from the generator in fixed blocks, so image i gets the same masks whatever the batch.
    for block in chunks(n, RISE_MASK_BLOCK):
        masks_block = rise_masks(block.stop - block.start, cells, p, (h, w), gen)
        for msl in chunks(masks_block.shape[0], per_mask):
            masks = masks_block[msl]
            m = masks.shape[0]
            for isl in chunks(b, per_img):
                x = (ctx.images[isl, None] * masks[None, :, None]).flatten(0, 1)
                t = ctx.targets[isl].repeat_interleave(m)
                scores = ctx.scores(x, t, kind).view(-1, m)
                sal[isl] += torch.einsum("bm,mhw->bhw", scores, masks)
    return sal / (n * p)
