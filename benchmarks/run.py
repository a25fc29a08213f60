"""Speed of every CAM method against the model's own floor, measured in one run.

    python benchmarks/run.py --quick            # ~3 min on 2 CPU cores
    python benchmarks/run.py --device cuda --arch resnet50

Floors (ms per image, same model, batch and device): a plain forward; a forward plus the gradient of the
target logits with respect to the target layer's output (``torch.autograd.grad``); a forward plus a full
backward into every parameter (what ``loss.backward()`` costs). Each method's ms/image is divided by the
forward+layer-gradient floor. Perturbation methods are also divided by their own forward floor: the number
of images the model actually forwarded (counted by a hook) times the plain-forward cost per image.

When the peer libraries are installed (``pip install -e ".[bench]"``: pytorch-grad-cam, torchcam), the same
gradient methods are timed with them, one after another, as a user of those libraries would run them.
No timing here is asserted anywhere; the numbers are recorded in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import nn

from auditor import compute_cams

GRADIENT_SET = [
    "grad_cam",
    "grad_cam_pp",
    "xgrad_cam",
    "hires_cam",
    "grad_cam_elementwise",
    "layer_cam",
    "eigen_grad_cam",
    "cam",
    "eigen_cam",
]
# Expensive methods: images timed and options (quick / full). Cost per forward is what matters here.
EXPENSIVE: dict[str, tuple[int, dict[str, Any], dict[str, Any]]] = {
    "smooth_grad_cam_pp": (16, {}, {}),
    "score_cam": (1, {}, {}),
    "ss_cam": (1, {"num_samples": 1}, {"num_samples": 2}),
    "is_cam": (1, {"num_samples": 1}, {"num_samples": 2}),
    "ablation_cam": (16, {}, {}),
    "occlusion": (1, {"window": 32, "stride": 16}, {}),
    "rise": (1, {"num_masks": 256}, {"num_masks": 1000}),
    "guided_backprop": (16, {}, {}),
    "guided_grad_cam": (16, {}, {}),
}
# Methods with their own passes or post-processing (images timed, options).
OWN_PASS: dict[str, tuple[int, dict[str, Any]]] = {
    "shapley_cam": (16, {}),
    "finer_cam": (16, {}),
    "refine_cam": (16, {}),
    "kpca_cam": (16, {}),
    "fem": (16, {}),
    "random_cam": (16, {}),
    "dff": (4, {}),
    "fullgrad": (16, {}),
    "deconvnet": (16, {}),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Minimum seconds over ``repeat`` calls after one warm-up call.

    The minimum, not the median: on a shared CPU the noise only ever adds time (timeit's advice).
    """
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


class ForwardCounter:
    """Counts images forwarded through the whole model (a forward hook on the root module)."""

    def __init__(self, model: nn.Module) -> None:
        self.images = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, _m: nn.Module, inp: tuple[torch.Tensor, ...], _out: object) -> None:
        self.images += int(inp[0].shape[0])


def floors(model: nn.Module, x: torch.Tensor, t: torch.Tensor, layer: str, repeat: int) -> dict[str, float]:
    """ms/image of forward, forward + gradient to ``layer``, forward + full backward."""
    device = x.device
    module = dict(model.named_modules())[layer]
    store: dict[str, torch.Tensor] = {}

    def keep(_m: nn.Module, _i: object, out: torch.Tensor) -> None:
        store["a"] = out

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def layer_grad() -> None:
        handle = module.register_forward_hook(keep)
        try:
            logits = model(x)
            torch.autograd.grad(logits.gather(1, t[:, None]).sum(), store["a"])
        finally:
            handle.remove()

    def full_backward() -> None:
        model.zero_grad(set_to_none=True)
        model(x).gather(1, t[:, None]).sum().backward()

    n = x.shape[0]
    out = {
        "forward": timed(forward, device, repeat) / n * 1e3,
        "forward+layer_grad": timed(layer_grad, device, repeat) / n * 1e3,
        "forward+full_backward": timed(full_backward, device, repeat) / n * 1e3,
    }
    model.zero_grad(set_to_none=True)
    return out


def ours(
    model: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    layer: str,
    methods: list[str],
    options: dict[str, Any],
    repeat: int,
    batch_size: int,
) -> tuple[float, float]:
    """(ms/image, images forwarded per image) of compute_cams for ``methods``."""
    counter = ForwardCounter(model)
    try:
        sec = timed(
            lambda: compute_cams(model, x, t, methods=methods, layer=layer, options=options, batch_size=batch_size),
            x.device,
            repeat,
        )
        calls = counter.images / (repeat + 1) / x.shape[0]
    finally:
        counter.handle.remove()
    return sec / x.shape[0] * 1e3, calls


def peers(model: nn.Module, x: torch.Tensor, t: torch.Tensor, layer: str, repeat: int) -> dict[str, float]:
    """ms/image of the peer libraries' gradient methods (each one after another), when installed."""
    out: dict[str, float] = {}
    module = dict(model.named_modules())[layer]
    try:
        import pytorch_grad_cam as pgc
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        pgc = None
    if pgc is not None:
        targets = [ClassifierOutputTarget(int(c)) for c in t]
        classes = {
            "grad_cam": pgc.GradCAM,
            "grad_cam_pp": pgc.GradCAMPlusPlus,
            "xgrad_cam": pgc.XGradCAM,
            "hires_cam": pgc.HiResCAM,
            "grad_cam_elementwise": pgc.GradCAMElementWise,
            "layer_cam": pgc.LayerCAM,
            "eigen_grad_cam": pgc.EigenGradCAM,
            "eigen_cam": pgc.EigenCAM,
        }
        total = 0.0
        for name, cls in classes.items():
            cam = cls(model=model, target_layers=[module])
            ms = timed(lambda cam=cam: cam(input_tensor=x, targets=targets), x.device, repeat) / x.shape[0] * 1e3
            cam.activations_and_grads.release()
            out[f"pytorch-grad-cam {name}"] = ms
            total += ms
        out["pytorch-grad-cam: the 8 methods one after another"] = total
        model.zero_grad(set_to_none=True)
    try:
        from torchcam.methods import GradCAM as TcGradCAM
    except ImportError:
        TcGradCAM = None
    if TcGradCAM is not None:
        extractor = TcGradCAM(model, layer, input_shape=tuple(x.shape[1:]))

        def run() -> None:
            scores = model(x)
            extractor(t.tolist(), scores)

        out["torchcam grad_cam"] = timed(run, x.device, repeat) / x.shape[0] * 1e3
        extractor.remove_hooks()
    return out


def new_peers(model: nn.Module, x: torch.Tensor, t: torch.Tensor, layer: str, repeat: int) -> dict[str, float]:
    """ms/image of the peers' versions of the methods in :data:`OWN_PASS`, when installed."""
    out: dict[str, float] = {}
    mods = dict(model.named_modules())
    try:
        import pytorch_grad_cam as pgc
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        pgc = None
    if pgc is not None:
        targets = [ClassifierOutputTarget(int(c)) for c in t]
        makers: dict[str, Callable[[], Any]] = {
            "shapley_cam": lambda: pgc.ShapleyCAM(model=model, target_layers=[mods[layer]]),
            "kpca_cam": lambda: pgc.KPCA_CAM(model=model, target_layers=[mods[layer]]),
            "fem": lambda: pgc.FEM(model=model, target_layers=[mods[layer]]),
            "random_cam": lambda: pgc.RandomCAM(model=model, target_layers=[mods[layer]]),
            "fullgrad": lambda: pgc.FullGrad(model=model, target_layers=[]),
        }
        for name, make in makers.items():
            cam = make()
            ms = timed(lambda cam=cam: cam(input_tensor=x, targets=targets), x.device, repeat) / x.shape[0] * 1e3
            cam.activations_and_grads.release()
            out[f"pytorch-grad-cam {name}"] = ms
        model.zero_grad(set_to_none=True)
    try:
        from torchcam import methods as tc
    except ImportError:
        tc = None
    if tc is not None and layer == "layer4":
        for name, make in {
            "finer_cam": lambda: tc.FinerCAM(model, layer, input_shape=tuple(x.shape[1:])),
            "refine_cam": lambda: tc.RefineCAM(model, ["layer2", "layer3", "layer4"], input_shape=tuple(x.shape[1:])),
        }.items():
            extractor = make()

            def run(extractor: Any = extractor) -> None:
                extractor(t.tolist(), model(x))

            out[f"torchcam {name}"] = timed(run, x.device, repeat) / x.shape[0] * 1e3
            extractor.remove_hooks()
    return out


def vit_rows(device: torch.device, repeat: int, peers_too: bool) -> list[tuple[str, float]]:
    """ms/image of LeGrad and Grad-CAM on a random-weight ViT-B/16 at 224 px (4 images), and torchcam's LeGrad."""
    torch.manual_seed(0)
    vit = torchvision.models.vit_b_16(num_classes=1000).eval().to(device)
    nn.init.normal_(vit.heads.head.weight, std=0.02)  # torchvision zero-initializes the head
    x = torch.randn(4, 3, 224, 224, device=device)
    t = torch.randint(0, 1000, (4,), device=device)
    rows = [("vit_b_16 forward", timed(lambda: vit(x).sum().item(), device, repeat) / 4 * 1e3)]
    for name in ("grad_cam", "legrad"):
        rows.append(
            (f"vit_b_16 {name}", timed(lambda n=name: compute_cams(vit, x, t, methods=[n]), device, repeat) / 4 * 1e3)
        )
    if peers_too:
        try:
            from torchcam.methods import LeGrad
        except ImportError:
            return rows
        with LeGrad(vit, list(vit.encoder.layers)) as extractor:
            rows.append(
                ("vit_b_16 torchcam legrad", timed(lambda: extractor(t.tolist(), vit(x)), device, repeat) / 4 * 1e3)
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller expensive-method options")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--layer", default="layer4")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-peers", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.arch)(num_classes=1000).eval().to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    repeat = 3 if args.quick else 7

    first = floors(model, x, t, args.layer, repeat)
    rows: list[tuple[str, int, float, float]] = []  # (label, images, ms/image, forwards/image)
    for name in GRADIENT_SET:
        ms, fw = ours(model, x, t, args.layer, [name], {}, repeat, args.batch)
        rows.append((name, args.batch, ms, fw))
    ms_all, fw_all = ours(model, x, t, args.layer, GRADIENT_SET, {}, repeat, args.batch)
    rows.append(("**all 9 above, one compute_cams call**", args.batch, ms_all, fw_all))
    for name, (n_img, quick_opts, full_opts) in EXPENSIVE.items():
        opts = quick_opts if args.quick else full_opts
        n = min(n_img, args.batch)
        ms, fw = ours(model, x[:n], t[:n], args.layer, [name], {name: opts} if opts else {}, 1, args.batch)
        shown = ", ".join(f"{k}={v}" for k, v in opts.items())
        rows.append((f"{name}{f' ({shown})' if shown else ''}", n, ms, fw))
    for name, (n_img, opts) in OWN_PASS.items():
        n = min(n_img, args.batch)
        ms, fw = ours(model, x[:n], t[:n], args.layer, [name], {name: opts} if opts else {}, 1, args.batch)
        rows.append((name, n, ms, fw))
    peer_rows = {} if args.no_peers else peers(model, x, t, args.layer, repeat)
    new_rows = {} if args.no_peers else new_peers(model, x, t, args.layer, 1)
    vit = vit_rows(device, 1, not args.no_peers)
    # Floors again after the long runs; keep the smaller of the two (noise on a shared CPU only adds time).
    second = floors(model, x, t, args.layer, repeat)
    fl = {k: min(v, second[k]) for k, v in first.items()}
    base, fwd = fl["forward+layer_grad"], fl["forward"]

    print(
        f"# {args.arch} @ {args.size}x{args.size}, batch {args.batch}, device {device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
        f"min of {repeat} repeats\n"
    )
    print("| floor | first | second | used (min) |\n|---|---|---|---|")
    for k in fl:
        print(f"| {k} | {first[k]:.1f} | {second[k]:.1f} | {fl[k]:.1f} |")
    print("\n| method | images | ms/image | x fwd+layer-grad floor | forwards/image | x own forward floor |")
    print("|---|---|---|---|---|---|")
    for label, n, ms, fw in rows:
        print(f"| {label} | {n} | {ms:.1f} | {ms / base:.2f} | {fw:.0f} | {ms / (fw * fwd):.2f} |")
    if peer_rows:
        print("\n| peer library | ms/image | x fwd+layer-grad floor | auditor speed-up |\n|---|---|---|---|")
        for k, v in peer_rows.items():
            speed = f"{v / ms_all:.1f}x (vs all 9 in one call)" if "one after another" in k else ""
            print(f"| {k} | {v:.1f} | {v / base:.2f} | {speed} |")
    elif not args.no_peers:
        print("\n(peer libraries not installed: pip install -e '.[bench]')")
    if new_rows:
        own = {label: ms for label, _, ms, _ in rows}
        print("\n| peer library, newer methods | ms/image | auditor ms/image | auditor speed-up |\n|---|---|---|---|")
        for k, v in new_rows.items():
            mine = own.get(k.split(" ")[-1])
            print(f"| {k} | {v:.1f} | {mine:.1f} | {v / mine:.1f}x |" if mine else f"| {k} | {v:.1f} | | |")
    print("\n| vision transformer (4 images, 224 px) | ms/image |\n|---|---|")
    for label, ms in vit:
        print(f"| {label} | {ms:.1f} |")


if __name__ == "__main__":
    main()
