"""Batched deletion + insertion against the naive one-image-one-forward-per-step reference, side by side.

    python benchmarks/faithfulness.py                 # resnet18, 64 px and 224 px, CPU

Both compute the same curves (the test suite checks them step by step to 1e-5); the naive version is
RISE's ``CausalMetric`` loop: for each image, for each step, copy pixels and run one forward.
The forward floor is 2 x steps plain forwards per image in the same chunks, measured in the same run
(minimum of 3): the batched metric's ratio to it is the overhead of building the perturbed inputs.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torchvision

from auditor.cams.speed import auto_chunk
from auditor.metrics import METRICS, MetricInputs
from auditor.metrics.faithfulness import gaussian_blur
from auditor.metrics.registry import tie_broken


def naive(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, sal: torch.Tensor, step: float) -> None:
    _, _, h, w = x.shape
    s = math.ceil(step * h * w)
    n = math.ceil(h * w / s)
    with torch.no_grad():
        for i in range(x.shape[0]):
            order = torch.argsort(tie_broken(sal[i : i + 1], 0)[0].flatten(), descending=True)
            for mode in ("deletion", "insertion"):
                if mode == "deletion":
                    start, finish = x[i : i + 1].clone(), torch.zeros_like(x[i : i + 1])
                else:
                    start, finish = gaussian_blur(x[i : i + 1]), x[i : i + 1].clone()
                for k in range(n + 1):
                    model(start).softmax(1)[0, t[i]]
                    if k < n:
                        idx = order[k * s : (k + 1) * s]
                        start.view(1, 3, -1)[0, :, idx] = finish.view(1, 3, -1)[0, :, idx]


def batched(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, sal: torch.Tensor, step: float, bs: int) -> None:
    inputs = MetricInputs(maps=sal, model=model, images=x, targets=t, batch_size=bs)
    METRICS["deletion_auc"](inputs, step=step)
    METRICS["insertion_auc"](inputs, step=step)


def forward_floor(model: torch.nn.Module, size: int, images: int, bs: int, forwards: int) -> float:
    """Seconds per image of ``forwards`` plain forwards per image in chunks of ``bs``, as the metric chunks them.

    Distinct random inputs per chunk (a chunk forwarded twice runs warm in cache); minimum of 3 passes.
    """
    jobs = images * forwards
    sizes = [min(bs, jobs - lo) for lo in range(0, jobs, bs)]
    batches = [torch.randn(n, 3, size, size) for n in sizes[: min(len(sizes), 64)]]
    times = []
    with torch.no_grad():
        model(batches[0])
        for _ in range(3):
            t0 = time.perf_counter()
            for i in range(len(sizes)):
                model(batches[i % len(batches)][: sizes[i]])
            times.append(time.perf_counter() - t0)
    return min(times) / images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--step", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=0, help="0 = auditor's automatic chunk size")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    print(
        "| size | images | steps | naive s/image | batched s/image | chunk | speed-up | forward floor s/image "
        "| x floor |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        x = torch.randn(args.images, 3, size, size)
        t = torch.randint(0, 10, (args.images,))
        sal = torch.rand(args.images, size, size)
        bs = args.batch_size or auto_chunk(model, x)
        batched(model, x[:1], t[:1], sal[:1], 0.25, bs)  # warm-up
        t0 = time.perf_counter()
        naive(model, x, t, sal, args.step)
        t_naive = (time.perf_counter() - t0) / args.images
        t0 = time.perf_counter()
        batched(model, x, t, sal, args.step, bs)
        t_batch = (time.perf_counter() - t0) / args.images
        steps = math.ceil(1 / args.step) + 1
        floor = 2 * forward_floor(model, size, args.images, bs, steps)
        print(
            f"| {size} | {args.images} | 2 x {steps} | {t_naive:.2f} | {t_batch:.2f} | {bs} | "
            f"{t_naive / t_batch:.2f}x | {floor:.2f} | {t_batch / floor:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
