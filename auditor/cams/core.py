"""Shared machinery of the CAM engine: inputs, layer resolution, scoped capture, combine, upsample.

Every CAM method is a small pure function of a :class:`CamContext` (what was captured at the target
layer(s), plus callables that run the model) returning a *signed* map at the layer's resolution
``[B, h, w]``. This module does everything else once: validation of images and targets, automatic target
layer resolution, hooks that are removed in ``finally``, gradients through ``torch.autograd.grad`` (so no
parameter ``.grad`` is ever written), restoring the model's train/eval mode, ReLU, validity flags and
upsampling.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    nn.modules.dropout._DropoutNd,
    nn.Identity,
    nn.Linear,
)
_MAX_PREFIX_TOKENS = 8


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


_CHUNK_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], int]] = weakref.WeakKeyDictionary()
MAX_CHUNK_CPU = 256
# On a CPU, per-image forward cost rises once a batch's activations outgrow the caches: resnet18 at 224 px
# (33 MiB of activations per image) costs 31 ms/image at batch 16 and 44 ms at batch 64 on a 2-core CI
# machine, while at 64 px (2.7 MiB) any batch >= 16 is equally fast. So the CPU chunk targets a fixed
# activation working set instead of filling free RAM.
CPU_WORKING_SET = 512 * 2**20
MAX_CHUNK_GPU = 1024


def auto_chunk(model: nn.Module, example: Tensor) -> int:
    """A chunk size for extra forwards (perturbed inputs) that fits in free memory (cached per model/shape).

    CUDA: a 2-image probe measures the peak memory of one forward; the chunk uses at most 60% of the free
    device memory. CPU: one forward's activations are summed with hooks; the chunk keeps a batch's
    activations within 512 MiB (and 25% of the available RAM), capped at 256: larger CPU batches are slower
    per image once they outgrow the caches.

    Args:
        model: the classifier (eval mode).
        example: ``[B, C, H, W]`` images on the model's device (the first two are used).
    """
    device = example.device
    key = (tuple(example.shape[1:]), str(device))
    cache = _CHUNK_CACHE.setdefault(model, {})
    if key in cache:
        return cache[key]
    probe = example[:2]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        free, _ = torch.cuda.mem_get_info(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with torch.no_grad():
            model(probe)
        torch.cuda.synchronize(device)
        per_image = max(1, (torch.cuda.max_memory_allocated(device) - base) // probe.shape[0])
        chunk = int(min(MAX_CHUNK_GPU, max(1, 0.6 * free // per_image)))
    elif isinstance(model, torch.jit.ScriptModule):
        chunk = 32  # no module hooks on TorchScript: a conservative CPU default
    else:
        import psutil

        sizes: list[int] = []
        handles = [
            m.register_forward_hook(
                lambda _m, _i, o: sizes.append(o.numel() * o.element_size()) if isinstance(o, Tensor) else None
            )
            for m in model.modules()
        ]
        try:
            with torch.no_grad():
                model(probe[:1])
        finally:
            for h in handles:
                h.remove()
        per_image = max(1, sum(sizes) + probe[:1].numel() * probe.element_size())
        budget = min(CPU_WORKING_SET, 0.25 * psutil.virtual_memory().available)
        chunk = int(min(MAX_CHUNK_CPU, max(1, budget // per_image)))
    cache[key] = chunk
    return chunk


def chunks(total: int, size: int) -> Iterator[slice]:
    """Yield consecutive slices of at most ``size`` items covering ``range(total)``."""
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


def balanced_chunks(total: int, size: int) -> Iterator[slice]:
    """Like :func:`chunks`, with the fewest chunks of at most ``size`` and sizes that differ by at most one.

    32 jobs at size 15 run as 11 + 11 + 10, not 15 + 15 + 2: a 2-image forward costs ~1.4x per image what
    a 10-image one does (resnet18 @ 224 on a CPU). For loops without random draws per chunk.
    """
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    if total <= 0:
        return
    n = -(-total // size)
    base, extra = divmod(total, n)
    start = 0
    for i in range(n):
        stop = start + base + (i < extra)
        yield slice(start, stop)
        start = stop


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

    ``kind`` is ``"nchw"`` for convolutional feature maps or ``"tokens"`` for ``[B, N, D]`` token sequences
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
        b, _, d = raw.shape
        return raw[:, self.prefix :, :].float().reshape(b, self.h, self.w, d).permute(0, 3, 1, 2)

    def ablate(self, raw: Tensor, channel: Tensor, value: float = 0.0) -> Tensor:
        """Copy of ``raw`` (``n`` rows) with channel ``channel[i]`` of row ``i`` set to ``value`` on the grid."""
        out = raw.clone()
        rows = torch.arange(raw.shape[0], device=raw.device)
        if self.kind == "nchw":
            out[rows, channel] = value
        else:  # prefix (class/register) tokens are not part of the grid and stay untouched
            tokens = torch.arange(self.prefix, raw.shape[1], device=raw.device)
            out[rows[:, None], tokens[None], channel[:, None]] = value
        return out


def infer_layout(shape: Sequence[int], image_hw: tuple[int, int]) -> Layout | None:
    """Infer a grid layout from a layer output shape, or None when it has no spatial grid.

    4-D outputs are taken as NCHW. 3-D outputs ``[B, N, D]`` are token sequences: the smallest number of
    prefix tokens ``p <= 8`` such that ``N - p`` factors into ``h x w`` with ``h / w`` close to the image's
    aspect ratio (``h, w >= 2``) is used.
    """
    if len(shape) == 4:
        h, w = int(shape[2]), int(shape[3])
        return Layout("nchw", h, w) if h * w > 1 else None
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
    image_hw = (int(example.shape[2]), int(example.shape[3]))
    records: list[tuple[str, nn.Module, Tensor]] = []
    handles = []

    def make_hook(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, _inp: Any, out: Any) -> None:
            if isinstance(out, Tensor):
                records.append((name, module, out))

        return hook

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(make_hook(name)))
    try:
        with torch.no_grad():
            logits = model(example[:1])
    finally:
        for handle in handles:
            handle.remove()
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"the model must return logits of shape [B, num_classes]; it returned {shape}")

    pooled = {id(out) for _, module, out in records if isinstance(module, _POOL_TYPES)}
    layouts: dict[str, Layout] = {}
    last_spatial = -1
    for i, (name, _, out) in enumerate(records):
        layout = infer_layout(out.shape, image_hw)
        if layout is None or id(out) in pooled:
            continue
        layouts[name] = layout
        if layout.kind == "nchw":
            last_spatial = i

    default: str | None = None
    token_after = [
        i for i, (name, _, out) in enumerate(records) if i > last_spatial and out.ndim == 3 and name in layouts
    ]
    if token_after:
        default = _last_block_input(records, token_after)
    elif last_spatial >= 0:
        target = records[last_spatial][2]
        same = [(name.count("."), -i, name) for i, (name, _, out) in enumerate(records) if out is target]
        default = min(same)[2]

    head = None
    for name, module, out in reversed(records):
        if isinstance(module, nn.Linear) and tuple(out.shape) == tuple(logits.shape):
            head = name
            break
    info = ModelInfo(default, head, int(logits.shape[1]))
    per_model[key] = info
    return info


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
) -> tuple[Tensor, dict[str, LayerData]]:
    """One forward (and, with ``grad``, one backward of the target logits) capturing ``layers``.

    Args:
        model: classifier in eval mode.
        images: ``[B, C, H, W]`` on the model's device.
        targets: ``[B]`` class indices whose logits are differentiated.
        layers: module names to capture.
        grad: whether gradients ``d y^c / d A`` are needed.

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
            score = logits.gather(1, targets[:, None]).sum()
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


# --------------------------------------------------------------------------------------------------
# combine, finalize, upsample
# --------------------------------------------------------------------------------------------------


def _forward_seconds(model: nn.Module, x: Tensor, repeat: int) -> float:
    """Minimum wall time of ``repeat`` no-grad forwards of ``x`` (after one warm-up), synchronized on CUDA."""
    times = []
    with torch.no_grad():
        for i in range(repeat + 1):
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            start = time.perf_counter()
            model(x)
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            if i:
                times.append(time.perf_counter() - start)
    return min(times)


def set_memory_format(model: nn.Module, fmt: str) -> None:
    """Store the model's 4-D weights as ``channels_last`` (NHWC) or ``contiguous`` (NCHW), in place."""
    model.to(memory_format=torch.channels_last if fmt == "channels_last" else torch.contiguous_format)


def choose_memory_format(model: nn.Module, example: Tensor, repeat: int = 2, margin: float = 0.05) -> str:
    """``channels_last`` where it makes the model's forward at least ``margin`` faster, else ``contiguous``.

    oneDNN (CPU) and cuDNN run most convolutions and poolings faster in NHWC (resnet18 @ 224 on the
    2-core development CPU: 37 vs 44 ms/image; torchvision's max-pool alone 8 vs 81 ms per batch), but
    not all models gain (convnext_tiny was 10% slower). So both are timed on ``example`` and the model
    is left in the faster one. Models without a ``Conv2d`` stay contiguous untimed. Maps agree across
    the two formats to ~1e-5 (relative).

    Args:
        model: the classifier (eval mode), not a TorchScript module.
        example: ``[B, C, H, W]`` images on the model's device (a chunk-sized batch times best).
    """
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return "contiguous"
    seconds = {}
    for fmt in ("contiguous", "channels_last"):
        set_memory_format(model, fmt)
        seconds[fmt] = _forward_seconds(model, example, repeat)
    fmt = "channels_last" if seconds["channels_last"] < (1 - margin) * seconds["contiguous"] else "contiguous"
    set_memory_format(model, fmt)
    return fmt


def low_precision_pays(device: torch.device) -> bool:
    """Whether autocast can make forwards faster on ``device``.

    True on CUDA. On a CPU only with bfloat16 instructions (oneDNN's check: AVX512-BF16 / AMX); without
    them bfloat16 is emulated (resnet18 @ 224 forwards ran 27x slower than float32 on the 2-core
    development machine).
    """
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(check()) if check is not None else False
    return False


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """Autocast for extra forwards: bfloat16 on CPU, float16 on CUDA (disabled: a no-op context)."""
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


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


def finalize(signed: Tensor) -> tuple[Tensor, Tensor]:
    """ReLU a signed map and flag the maps that carry no information.

    Args:
        signed: ``[B, h, w]`` raw signed map.

    Returns:
        ``(map [B, h, w] float32 >= 0 without NaN/inf, valid [B] bool)``; ``valid`` is False where the
        map had a non-finite value or is constant after the ReLU (e.g. all zero).
    """
    signed = signed.float()
    finite = torch.isfinite(signed).flatten(1).all(1)
    relu = torch.nan_to_num(signed, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0)
    flat = relu.flatten(1)
    constant = flat.amax(1) <= flat.amin(1)
    return relu, finite & ~constant


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

    @property
    def data(self) -> LayerData:
        """The captured data of the method's (first) target layer."""
        return self.layers[self.layer]

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

    def rng(self) -> torch.Generator:
        """A generator seeded from the method's ``seed`` option, on the images' device."""
        if self.generator is None:
            self.generator = torch.Generator(device=self.images.device)
            self.generator.manual_seed(int(self.options.get("seed", 0)))
        return self.generator
