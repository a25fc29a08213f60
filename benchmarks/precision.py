"""Forward time in float32 and under autocast (bfloat16 on CPU, float16 on CUDA), side by side.

    python benchmarks/precision.py                     # resnet18 @ 224, batch 16, CPU

Whether ``mixed_precision`` can pay on this machine: without bfloat16 instructions a CPU emulates it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torchvision

from auditor.cams.speed import autocast, low_precision_pays

sys.path.insert(0, str(Path(__file__).parent))
from run import sync  # benchmarks/ is a folder of scripts, not a package


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    model = getattr(torchvision.models, args.arch)().eval().to(device)
    x = torch.randn(args.batch_size, 3, args.size, args.size, device=device)
    print(
        f"# {args.arch} @ {args.size}², batch {args.batch_size}, {device}, low precision pays: "
        f"{low_precision_pays(device)}"
    )
    print("| precision | ms/image (min) |\n|---|---|")
    for name, enabled in (("float32", False), ("autocast", True)):
        times = []
        with torch.no_grad(), autocast(device, enabled):
            model(x)
            for _ in range(args.repeat):
                sync(device)
                t0 = time.perf_counter()
                model(x)
                sync(device)
                times.append(time.perf_counter() - t0)
        print(f"| {name} | {min(times) / args.batch_size * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    main()
