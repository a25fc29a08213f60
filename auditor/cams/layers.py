"""Layers: names, layouts (CNN grids and ViT token sequences), automatic resolution and scoped capture.

Hooks are registered inside :func:`capture` and removed in ``finally``; gradients come from
``torch.autograd.grad``, so no parameter ``.grad`` is ever written.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from auditor.cams.core import check_target_range
from auditor.registry import did_you_mean

log = logging.getLogger(__name__)

# Modules whose output is a pooled / flattened / dropped-out version of a feature map. A feature map that
# only exists as the output of one of these is not a "conv block" output and is never auto-selected.
_POOL_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Flatten,
    nn.Linear,
)
# modules that hand their input on unchanged (in eval mode): their own record is skipped, not the tensor, which
# is also the output of the real layer before them (timm's ConvNeXt ends its stages with an Identity norm_pre)
_PASS_TYPES: tuple[type[nn.Module], ...] = (nn.modules.dropout._DropoutNd, nn.Identity)
_MAX_PREFIX_TOKENS = 8


# --------------------------------------------------------------------------------------------------
# layers: names, layouts, automatic resolution
# --------------------------------------------------------------------------------------------------


def get_module(model: nn.Module, name: str) -> nn.Module:
    """Return the sub-module called ``name`` (a ``named_modules()`` name), with close matches on a miss."""
    modules = dict(model.named_modules())
    if name == "" or name not in modules:
        names = [n for n in modules if n]
        hint = did_you_mean(name, names)
        if not hint:
            tops = [n for n, _ in model.named_children()]
            hint = f" (top-level modules: {', '.join(tops)})"
        raise ValueError(f"unknown layer {name!r}{hint}")
    return modules[name]


@dataclass(frozen=True)
class Layout:
    """How a layer's raw output maps to a ``[B, K, h, w]`` grid.

    ``kind`` is ``"nchw"`` for convolutional feature maps, ``"nhwc"`` for channels-last maps (timm's Swin, the
    LayerNorm inside a ConvNeXt block) or ``"tokens"`` for ``[B, N, D]`` token sequences
    where the first ``prefix`` tokens (class/register tokens) are dropped and the rest form an ``h x w``
    grid in row-major order.
    """

    kind: str
    h: int
    w: int
    prefix: int = 0

    def to_grid(self, raw: Tensor) -> Tensor:
        """``[B, K, h, w]`` (nchw) or ``[B, N, D]`` (tokens) -> ``[B, K, h, w]`` float32."""
        if self.kind == "nchw":
            return raw.float()
        if self.kind == "nhwc":
            return raw.float().permute(0, 3, 1, 2)
        b, _, d = raw.shape
        return raw[:, self.prefix :, :].float().reshape(b, self.h, self.w, d).permute(0, 3, 1, 2)

    def ablate(self, raw: Tensor, channel: Tensor, value: float = 0.0) -> Tensor:
        """Copy of ``raw`` (``n`` rows) with channel ``channel[i]`` of row ``i`` set to ``value`` on the grid."""
        out = raw.clone()
        rows = torch.arange(raw.shape[0], device=raw.device)
        if self.kind == "nchw":
            out[rows, channel] = value
        elif self.kind == "nhwc":
            out[rows, :, :, channel] = value
        else:  # prefix (class/register) tokens are not part of the grid and stay untouched
            tokens = torch.arange(self.prefix, raw.shape[1], device=raw.device)
            out[rows[:, None], tokens[None], channel[:, None]] = value
        return out


def infer_layout(shape: Sequence[int], image_hw: tuple[int, int]) -> Layout | None:
    """Infer a grid layout from a layer output shape, or None when it has no spatial grid.

    4-D outputs are NCHW, or NHWC when only that reading gives a grid of the image's aspect ratio (``[B, 7, 7,
    768]`` for a square image). 3-D outputs ``[B, N, D]`` are token sequences: the smallest number of
    prefix tokens ``p <= 8`` such that ``N - p`` factors into ``h x w`` with ``h / w`` close to the image's
    aspect ratio (``h, w >= 2``) is used.
    """
    if len(shape) == 4:
        h, w = int(shape[2]), int(shape[3])
        if h * w <= 1:
            return None
        aspect = image_hw[0] / image_hw[1]
        fits = [abs(a / b - aspect) <= 0.15 * aspect for a, b in ((h, w), (int(shape[1]), int(shape[2])))]
        if not fits[0] and fits[1] and int(shape[1]) * int(shape[2]) > 1:
            return Layout("nhwc", int(shape[1]), int(shape[2]))
        return Layout("nchw", h, w)
    if len(shape) != 3:
        return None
    n = int(shape[1])
    aspect = image_hw[0] / image_hw[1]
    for prefix in range(0, min(_MAX_PREFIX_TOKENS, n - 4) + 1):
        m = n - prefix
        h = round(math.sqrt(m * aspect))
        for hh in (h, h - 1, h + 1):
            if hh >= 2 and m % hh == 0:
                ww = m // hh
                if ww >= 2 and abs(hh / ww - aspect) <= 0.15 * aspect:
                    return Layout("tokens", hh, ww, prefix)
    return None


@dataclass
class ModelInfo:
    """What one dry-run forward taught us about a model for a given input shape."""

    default_layer: str | None
    head_linear: str | None
    num_outputs: int


_INFO_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], ModelInfo]] = weakref.WeakKeyDictionary()


def inspect_model(model: nn.Module, example: Tensor) -> ModelInfo:
    """Run one forward on ``example[:1]`` with a hook on every module and resolve defaults (cached).

    The default target layer is the output of the last convolutional block: the last module (in
    completion order) whose output is a spatial ``[B, K, h, w]`` map that is not the output of a pooling,
    flatten or dropout layer; among modules returning that same tensor the shortest name wins (``layer4``
    rather than ``layer4.1.relu``). For token models (ViT-style ``[B, N, D]`` outputs completing after the
    last spatial map) it is the first token-shaped module inside the last block, e.g. the last block's
    first LayerNorm: the block *outputs* of the last block get no gradient on patch tokens when only the
    class token feeds the head.

    Args:
        model: the classifier (already in eval mode).
        example: ``[B, C, H, W]`` images; only the first is used.
    """
    key = tuple(example.shape[1:])
    per_model = _INFO_CACHE.setdefault(model, {})
    if key in per_model:
        return per_model[key]
    records, logits = _record_outputs(model, example[:1])
    head = next(
        (n for n, m, out in reversed(records) if isinstance(m, nn.Linear) and tuple(out.shape) == tuple(logits.shape)),
        None,
    )
    default = _known_default(model) or _default_layer(records, (int(example.shape[2]), int(example.shape[3])))
    info = ModelInfo(default, head, int(logits.shape[1]))
    per_model[key] = info
    return info


Records = list[tuple[str, nn.Module, Tensor]]


def _record_outputs(model: nn.Module, example: Tensor) -> tuple[Records, Tensor]:
    """``(name, module, output)`` of every named module that returns a tensor, in completion order (pass-through
    modules left out: their output is their input); the logits."""
    records: Records = []

    def make_hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, _inp: Any, out: Any) -> None:
            # outputs batched otherwise (Swin's windows: [B * windows, ...]) are not per-image features
            if isinstance(out, Tensor) and out.ndim >= 2 and out.shape[0] == example.shape[0]:
                records.append((name, module, out))

        return hook

    handles = [
        module.register_forward_hook(make_hook(name))
        for name, module in model.named_modules()
        if name and not isinstance(module, _PASS_TYPES)
    ]
    try:
        with torch.no_grad():
            logits = model(example)
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"the model must return logits of shape [B, num_classes]; it returned {shape}")
    return records, logits


def _known_default(model: nn.Module) -> str | None:
    """Defaults the shape rule cannot find. Hugging Face Swin: the final LayerNorm over the last stage's tokens
    (every token feeds the average pool; a relative-position-bias module's 4-D output would pass for a map)."""
    base = getattr(model, "base_model", None)
    prefix = getattr(model, "base_model_prefix", "")
    swin = base is not None and base is not model and prefix and type(base).__name__.startswith("Swin")
    return f"{prefix}.layernorm" if swin and isinstance(getattr(base, "layernorm", None), nn.Module) else None


def _default_layer(records: Records, image_hw: tuple[int, int]) -> str | None:
    """The last conv block's output, or the first token module of the last block of a token model."""
    pooled = {id(out) for _, module, out in records if isinstance(module, _POOL_TYPES)}
    layouts: dict[str, Layout] = {}
    last_spatial = -1
    for i, (name, _, out) in enumerate(records):
        layout = infer_layout(out.shape, image_hw)
        if layout is None or id(out) in pooled:
            continue
        layouts[name] = layout
        if layout.kind != "tokens":
            last_spatial = i
    token_after = [
        i for i, (name, _, out) in enumerate(records) if i > last_spatial and out.ndim == 3 and name in layouts
    ]
    if token_after:
        return _last_block_input(records, token_after)
    if last_spatial >= 0:
        target = records[last_spatial][2]
        same = [(name.count("."), -i, name) for i, (name, _, out) in enumerate(records) if out is target]
        return min(same)[2]
    return None


def _last_block_input(records: list[tuple[str, nn.Module, Tensor]], token_idx: list[int]) -> str:
    """Name of the first token-shaped module inside the last repeated block of a token model."""
    names = [records[i][0] for i in token_idx]
    # A "block" is a module whose name ends in an index-like component under a container,
    # e.g. "encoder.layers.encoder_layer_11" or "blocks.11".
    blocks: list[str] = []
    for name in names:
        parts = name.split(".")
        for depth in range(len(parts), 0, -1):
            last = parts[depth - 1]
            if last.isdigit() or last.rstrip("0123456789") != last:
                blocks.append(".".join(parts[:depth]))
                break
    if not blocks:
        return names[-1]
    last_block = blocks[-1]
    inside = [n for n in names if n.startswith(last_block + ".")]
    return inside[0] if inside else last_block


def resolve_layer(model: nn.Module, layer: str | None, example: Tensor) -> str:
    """Return ``layer`` after checking it exists, or the auto-resolved default layer when None."""
    if layer is not None:
        if not isinstance(layer, str):
            raise TypeError(f"layer must be a module name (str), got {type(layer).__name__}")
        get_module(model, layer)
        return layer
    info = inspect_model(model, example)
    if info.default_layer is None:
        raise ValueError(
            "could not find a spatial feature layer automatically (no 4-D conv output and no token grid); "
            "pass layer='<module name>' explicitly"
        )
    return info.default_layer


def layout_for(model: nn.Module, name: str, raw: Tensor, image_hw: tuple[int, int]) -> Layout:
    """Layout of the captured output ``raw`` of layer ``name``; raises when it has no spatial grid."""
    layout = infer_layout(raw.shape, image_hw)
    if layout is None:
        raise ValueError(
            f"layer {name!r} outputs shape {tuple(raw.shape)}, which has no spatial grid "
            "(expected [B, K, h, w] or [B, N, D] tokens); choose an earlier layer"
        )
    return layout


# --------------------------------------------------------------------------------------------------
# capture
# --------------------------------------------------------------------------------------------------


@dataclass
class _Slot:
    tensor: Tensor | None = None
    calls: int = 0
    order: int = -1  # completion order among the captured layers (depth order for sequential nets)


@contextmanager
def capture(model: nn.Module, names: Sequence[str], *, grad: bool) -> Iterator[dict[str, _Slot]]:
    """Record the outputs of the named layers during forwards run inside the block.

    Hooks are removed in ``finally``. Each hook hands a clone of the output to the rest of the network so
    that a later in-place op (``ReLU(inplace=True)``) cannot alter what was captured. With ``grad=True``
    the first captured layer is re-rooted as a leaf that requires grad, so a later
    ``torch.autograd.grad`` only traverses the head of the network (the model's layers before the target
    layer are never back-propagated through, and parameters with ``requires_grad=False`` are fine).
    """
    slots = {name: _Slot() for name in names}
    modules = {name: get_module(model, name) for name in names}
    state = {"rooted": False}

    def make_hook(name: str) -> Callable[[nn.Module, Any, Any], Tensor]:
        def hook(_module: nn.Module, _inp: Any, out: Any) -> Tensor:
            if not isinstance(out, Tensor):
                raise TypeError(
                    f"layer {name!r} returns {type(out).__name__}, not a tensor; choose a layer returning a tensor"
                )
            slot = slots[name]
            slot.calls += 1
            slot.order = sum(s.calls > 0 for s in slots.values()) - 1
            if slot.calls > 1:
                raise ValueError(
                    f"layer {name!r} runs more than once per forward (the module is reused); "
                    "choose a layer that runs once, e.g. its parent block"
                )
            if grad and (not state["rooted"] or not out.requires_grad):
                out = out.detach().requires_grad_(True)
                state["rooted"] = True
            slot.tensor = out
            return out.clone()

        return hook

    handles = [modules[name].register_forward_hook(make_hook(name)) for name in names]
    try:
        yield slots
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class LayerData:
    """Activations (and gradients) of one layer on a ``[B, K, h, w]`` grid, float32."""

    name: str
    layout: Layout
    activations: Tensor
    gradients: Tensor | None
    raw: Tensor  # the layer's output as the network produced it (detached), for ablation
    order: int = 0  # completion order among the layers captured together


def layer_pass(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    layers: Sequence[str],
    *,
    grad: bool,
    objective: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, dict[str, LayerData]]:
    """One forward (and, with ``grad``, one backward of the target logits) capturing ``layers``.

    Args:
        model: classifier in eval mode.
        images: ``[B, C, H, W]`` on the model's device.
        targets: ``[B]`` class indices whose logits are differentiated.
        layers: module names to capture.
        grad: whether gradients ``d y^c / d A`` are needed.
        objective: ``logits [B, C] -> [B]`` differentiated instead of the target logits (Finer-CAM's
            contrast); None = ``logits[b, targets[b]]``.

    Returns:
        ``(logits [B, num_classes] detached, {name: LayerData})``.
    """
    image_hw = (int(images.shape[2]), int(images.shape[3]))
    with capture(model, layers, grad=grad) as slots, torch.set_grad_enabled(grad):
        logits = model(images)
        if not isinstance(logits, Tensor) or logits.ndim != 2:
            raise ValueError("the model must return logits of shape [B, num_classes]")
        check_target_range(targets, logits.shape[1])
        missing = [n for n, s in slots.items() if s.tensor is None]
        if missing:
            raise ValueError(f"layer(s) {missing} did not run during the forward pass; choose layers the model uses")
        tensors = [s.tensor for s in slots.values() if s.tensor is not None]
        grads: Sequence[Tensor | None] = [None] * len(tensors)
        if grad:
            score = (logits.gather(1, targets[:, None])[:, 0] if objective is None else objective(logits)).sum()
            if not score.requires_grad:
                raise ValueError(f"the model's output does not depend on layer(s) {list(layers)}")
            grads = torch.autograd.grad(score, tensors, allow_unused=True)
    out: dict[str, LayerData] = {}
    for (name, slot), g in zip(slots.items(), grads, strict=True):
        raw = slot.tensor
        assert raw is not None  # checked above; narrows the type
        if grad and g is None:
            raise ValueError(f"the model's output does not depend on layer {name!r}; choose another layer")
        layout = layout_for(model, name, raw, image_hw)
        out[name] = LayerData(
            name=name,
            layout=layout,
            activations=layout.to_grid(raw.detach()),
            gradients=layout.to_grid(g) if g is not None else None,
            raw=raw.detach(),
            order=slot.order,
        )
    return logits.detach(), out


def finer_layer(model: nn.Module, example: Tensor, layer: str, min_side: int = 7) -> tuple[tuple[int, int], str | None]:
    """The grid of ``layer`` and, when it is coarser than ``min_side``, the deepest earlier layer that is not.

    A 2 x 2 map cannot say where in the image a class's evidence lies; an earlier convolutional layer
    can. The candidate is the last module (in completion order, before ``layer``) whose output is a
    spatial ``[B, K, h, w]`` map with ``min(h, w) >= min_side`` and is not a pooling output; among modules
    returning the same tensor the shortest name wins.

    Args:
        model: the classifier (eval mode).
        example: ``[B, C, H, W]`` images; only the first is used.
        layer: the target layer's name.
        min_side: the smallest grid side considered fine enough.

    Returns:
        ``((h, w) of layer, finer layer name or None)``; None when the grid is fine enough, when the layer's
        output has no grid recorded, or when no earlier layer qualifies (token models keep one grid).
    """
    records, _ = _record_outputs(model, example[:1])
    hw = (int(example.shape[2]), int(example.shape[3]))
    index = next((i for i, (name, _, _) in enumerate(records) if name == layer), None)
    layout = infer_layout(records[index][2].shape, hw) if index is not None else None
    if index is None or layout is None:
        return (0, 0), None
    grid = (layout.h, layout.w)
    if min(grid) >= min_side:
        return grid, None
    pooled = {id(out) for _, module, out in records if isinstance(module, _POOL_TYPES)}
    best = None
    for i, (_, _, out) in enumerate(records[:index]):
        cand = infer_layout(out.shape, hw)
        if cand is not None and cand.kind == "nchw" and min(cand.h, cand.w) >= min_side and id(out) not in pooled:
            best = i
    if best is None:
        return grid, None
    target = records[best][2]
    same = [(name.count("."), len(name), name) for name, _, out in records if out is target]
    return grid, min(same)[2]


def stage_layers(model: nn.Module, example: Tensor, layer: str, count: int = 3) -> list[str]:
    """``layer`` and up to ``count - 1`` earlier stages at finer grids, shallowest first.

    A stage is the deepest module (in completion order, before ``layer``) whose output is a spatial
    ``[B, K, h, w]`` map at a grid finer than every stage already chosen and is not a pooling output; among
    modules returning the same tensor the last to complete wins (``layer3`` rather than ``layer3.1.relu``,
    an in-place ReLU rather than the convolution it overwrote). A
    ResNet's ``layer4`` gives ``[layer2, layer3, layer4]``; a token model (one grid) gives ``[layer]``.

    Args:
        model: the classifier (eval mode).
        example: ``[B, C, H, W]``; only the first image is used.
        layer: the deepest layer.
        count: how many layers at most.

    Returns:
        Layer names in depth order, ending with ``layer``.
    """
    records, _ = _record_outputs(model, example[:1])
    hw = (int(example.shape[2]), int(example.shape[3]))
    index = next((i for i, (name, _, _) in enumerate(records) if name == layer), None)
    if index is None:
        return [layer]
    layout = infer_layout(records[index][2].shape, hw)
    if layout is None or layout.kind != "nchw":
        return [layer]
    pooled = {id(out) for _, module, out in records if isinstance(module, _POOL_TYPES)}
    chosen = [layer]
    area = layout.h * layout.w
    for i in range(index - 1, -1, -1):
        if len(chosen) >= count:
            break
        out = records[i][2]
        cand = infer_layout(out.shape, hw)
        if cand is None or cand.kind != "nchw" or id(out) in pooled or cand.h * cand.w <= area:
            continue
        chosen.append(next(name for name, _, o in reversed(records[:index]) if o is out))
        area = cand.h * cand.w
    return chosen[::-1]
