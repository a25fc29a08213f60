"""Speed: chunk sizes, memory format and mixed precision, each measured or bounded rather than assumed."""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

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
