"""Methods for vision transformers that read attention: LeGrad.

LeGrad needs each block's attention probabilities ``[B, heads, N, N]`` as part of the graph. Three kinds of
attention module are read:

- torchvision's ``nn.MultiheadAttention`` (``EncoderBlock.self_attention``): it is asked for its per-head
  probabilities and its output is recomputed from them (the probabilities it returns are a view that the
  output does not depend on);
- timm's ``Attention`` (``blocks.i.attn``): its fused scaled-dot-product path is switched off for the pass
  and the probabilities are read at its ``attn_drop`` (an identity in eval mode);
- Hugging Face attention modules returning ``(output, weights)`` (``ViTAttention``, ``DeiTAttention``): the
  model's ``config._attn_implementation`` is set to ``eager`` for the pass and the weights are read there.

Windowed attention (Swin) is not global self-attention over the token grid; LeGrad says so and stops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from auditor.cams.context import CamContext
from auditor.cams.layers import infer_layout
from auditor.cams.registry import register_cam
from auditor.errors import MethodNotApplicableError

ScoreProjection = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class AttentionSite:
    """One transformer block: its name and module (whose output tokens are read) and its attention module.

    ``kind``: ``torch`` (``nn.MultiheadAttention``), ``timm`` or ``hf`` (see the module docstring).
    """

    name: str
    block: nn.Module
    attention: nn.Module
    kind: str


def _is_timm_attention(module: nn.Module) -> bool:
    return hasattr(module, "fused_attn") and isinstance(getattr(module, "attn_drop", None), nn.Module)


def _is_hf_attention(module: nn.Module) -> bool:
    config = getattr(module, "config", None)
    return type(module).__name__.endswith("Attention") and hasattr(config, "_attn_implementation")


def attention_blocks(model: nn.Module) -> list[AttentionSite]:
    """Every block with a direct attention child, in module order (torchvision, timm or Hugging Face)."""
    out = []
    for name, module in model.named_modules():
        for child in module.children():
            kind = (
                "torch"
                if isinstance(child, nn.MultiheadAttention)
                else "timm"
                if _is_timm_attention(child)
                else "hf"
                if _is_hf_attention(child)
                else None
            )
            if kind is not None:
                out.append(AttentionSite(name, module, child, kind))
                break
    return out


def _mean_or_class(token: str) -> None:
    if token not in ("mean", "class"):
        raise ValueError(f"legrad token must be 'mean' or 'class', got {token!r}")


def torchvision_projection(model: nn.Module, token: str = "mean") -> ScoreProjection | None:
    """For torchvision's ``VisionTransformer``: tokens ``[B, N, D]`` -> logits through the model's own final
    LayerNorm and heads, read at the mean token (``token="mean"``, LeGrad's official code and torchcam) or at
    the class token (``"class"``, how the model reads its last block). None for other models."""
    encoder = getattr(model, "encoder", None)
    norm = getattr(encoder, "ln", None)
    heads = getattr(model, "heads", None)
    if not (isinstance(norm, nn.Module) and isinstance(heads, nn.Module) and hasattr(model, "class_token")):
        return None
    _mean_or_class(token)

    def project(tokens: Tensor) -> Tensor:
        return heads(norm(tokens.mean(1) if token == "mean" else tokens[:, 0]))

    return project


def timm_projection(model: nn.Module, token: str = "mean") -> ScoreProjection | None:
    """For timm vision transformers (``norm`` + ``forward_head``): the model's own final norm and head, its
    pooling (class token, average, attention pool; DeiT's distillation head) applied to every token replaced
    by the mean token (``token="mean"``: any pooling of identical tokens reads the mean token) or to the
    tokens as they are (``"class"``: how the model reads its last block). None for other models."""
    norm = getattr(model, "norm", None)
    forward_head = getattr(model, "forward_head", None)
    if not (isinstance(norm, nn.Module) and callable(forward_head)):
        return None
    _mean_or_class(token)

    def project(tokens: Tensor) -> Tensor:
        if token == "mean":
            tokens = tokens.mean(1, keepdim=True).expand_as(tokens)
        return forward_head(norm(tokens))

    return project


def hf_projection(model: nn.Module, token: str = "mean") -> ScoreProjection | None:
    """For Hugging Face ``ViTForImageClassification`` / ``DeiTForImageClassification``: the base model's final
    ``layernorm`` and the ``classifier``, read at the mean token or at the class token. None for others."""
    base = getattr(model, "base_model", None)
    norm = getattr(base, "layernorm", None)
    classifier = getattr(model, "classifier", None)
    if base is model or not (isinstance(norm, nn.Module) and isinstance(classifier, nn.Linear)):
        return None
    _mean_or_class(token)

    def project(tokens: Tensor) -> Tensor:
        return classifier(norm(tokens.mean(1)) if token == "mean" else norm(tokens)[:, 0])

    return project


def default_projection(model: nn.Module, token: str = "mean") -> ScoreProjection | None:
    """The block-tokens-to-logits map of a torchvision, timm or Hugging Face vision transformer, or None."""
    for known in (torchvision_projection, timm_projection, hf_projection):
        project = known(model, token)
        if project is not None:
            return project
    return None


def _legrad_requires(model: nn.Module, example: Tensor) -> str | None:
    if not attention_blocks(model):
        return (
            "legrad needs attention modules (nn.MultiheadAttention, timm Attention or a Hugging Face attention); "
            "this model has none"
        )
    if default_projection(model) is None:
        return (
            "legrad maps each block's tokens to class scores; torchvision, timm and Hugging Face ViT/DeiT "
            "classifiers are known, pass the option score_projection (Python API) for other transformers"
        )
    return None


def _check_attention(name: str, attn: nn.MultiheadAttention) -> None:
    if not attn.batch_first or attn.in_proj_weight is None or attn.bias_k is not None or attn.add_zero_attn:
        raise MethodNotApplicableError(
            f"legrad supports batch-first self-attention with one packed Q/K/V projection; block {name!r} differs"
        )


def _torch_hooks(site: AttentionSite, store: dict[str, Any]) -> list[Any]:
    """``nn.MultiheadAttention``: ask for per-head weights and recompute the output from them."""
    attn, name = site.attention, site.name
    assert isinstance(attn, nn.MultiheadAttention)
    _check_attention(name, attn)

    def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        given = list(args)
        store["wanted"][name] = given[4] if len(given) > 4 else kwargs.get("need_weights", True)
        if len(given) > 4:
            given[4] = True
        else:
            kwargs["need_weights"] = True
        if len(given) > 6:
            given[6] = False
        else:
            kwargs["average_attn_weights"] = False
        return tuple(given), kwargs

    def post(module: nn.MultiheadAttention, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
        probs = output[1]
        value = args[2] if len(args) > 2 else kwargs["value"]
        b, n, e = value.shape
        heads = module.num_heads
        bias = None if module.in_proj_bias is None else module.in_proj_bias[2 * e :]
        v = F.linear(value, module.in_proj_weight[2 * e :], bias).view(b, n, heads, e // heads).transpose(1, 2)
        mixed = (probs @ v).transpose(1, 2).reshape(b, probs.shape[2], e)
        store["attn"][name] = probs
        return module.out_proj(mixed), (probs.mean(1) if store["wanted"][name] else None)

    return [attn.register_forward_pre_hook(pre, with_kwargs=True), attn.register_forward_hook(post, with_kwargs=True)]


def _timm_hooks(site: AttentionSite, store: dict[str, Any]) -> list[Any]:
    """timm ``Attention`` (fused path switched off by the caller): the probabilities leave ``attn_drop``."""

    def read(_m: nn.Module, _i: Any, out: Any) -> None:
        store["attn"][site.name] = out

    attn_drop: Any = site.attention.attn_drop
    return [attn_drop.register_forward_hook(read)]


def _hf_hooks(site: AttentionSite, store: dict[str, Any]) -> list[Any]:
    """Hugging Face attention (eager, set by the caller): ``(output, weights)``; the weights are read."""

    def read(_m: nn.Module, _i: Any, out: Any) -> None:
        if isinstance(out, tuple) and len(out) > 1 and isinstance(out[1], Tensor):
            store["attn"][site.name] = out[1]

    return [site.attention.register_forward_hook(read)]


@contextmanager
def _eager(sites: list[AttentionSite]) -> Iterator[None]:
    """Switch timm's fused attention and Hugging Face's sdpa / flash attention to the explicit softmax path,
    so that the probabilities exist, and restore the settings afterwards."""
    saved: list[tuple[Any, str, Any]] = []
    for site in sites:
        attention: Any = site.attention
        if site.kind == "timm":
            saved.append((attention, "fused_attn", attention.fused_attn))
            attention.fused_attn = False
        elif site.kind == "hf":
            config = attention.config
            if all(c is not config for c, _, _ in saved):
                saved.append((config, "_attn_implementation", config._attn_implementation))
                config._attn_implementation = "eager"
    try:
        yield
    finally:
        for owner, attr, value in reversed(saved):
            setattr(owner, attr, value)


@contextmanager
def attention_probabilities(sites: list[AttentionSite]) -> Iterator[dict[str, Any]]:
    """Within the block, each attention's per-head probabilities are part of the graph and recorded
    (``store['attn'][name]``, ``[B, heads, N, N]``) with the block outputs (``store['out']``)."""
    store: dict[str, Any] = {"attn": {}, "out": {}, "wanted": {}}
    hooks = {"torch": _torch_hooks, "timm": _timm_hooks, "hf": _hf_hooks}
    handles = []
    with _eager(sites):
        try:
            for site in sites:
                handles += hooks[site.kind](site, store)

                def block_out(_m: nn.Module, _i: Any, out: Any, name: str = site.name) -> None:
                    first = out[0] if isinstance(out, tuple) and out else out
                    if isinstance(first, Tensor):
                        store["out"][name] = first

                handles.append(site.block.register_forward_hook(block_out))
            yield store
        finally:
            for handle in handles:
                handle.remove()


@register_cam(
    "legrad",
    family="gradient",
    needs="nothing",
    forwards="1",
    backwards="L (one per block, to its attention)",
    reference="Bousselham et al., LeGrad: An Explainability Method for Vision Transformers via Feature "
    "Formation Sensitivity, arXiv:2404.03214",
    options={"blocks": None, "token": "mean", "score_projection": None},
    requires=_legrad_requires,
)
def legrad(ctx: CamContext) -> Tensor:
    """LeGrad: per block ``l``, the gradient of the block's class score ``s^l_c`` with respect to its
    attention probabilities ``A^l`` ``[B, heads, N, N]``; ``ReLU``, mean over heads and queries, prefix
    (class / register) keys dropped, mean over blocks.

    ``s^l`` maps block ``l``'s output tokens to logits with the model's own final norm and head applied to the
    mean token (``token: mean``, as the authors' code and torchcam 0.5.0; every query row of ``A^l`` then
    matters) or to the class token (``token: class``: only the class token's row gets a gradient; timm models
    read their own pooling), for torchvision ``VisionTransformer``, timm ViT / DeiT and Hugging Face
    ``ViTForImageClassification`` / ``DeiTForImageClassification``; other transformers pass ``score_projection``
    (``tokens [B, N, D] -> [B, C]``, Python API). ``blocks`` names the blocks (default: all). Raises
    :class:`MethodNotApplicableError` without attention modules.
    """
    blocks = attention_blocks(ctx.model)
    if not blocks:
        raise MethodNotApplicableError(str(_legrad_requires(ctx.model, ctx.images)))
    chosen = ctx.options["blocks"]
    if chosen is not None:
        names = [chosen] if isinstance(chosen, str) else list(chosen)
        known = {b.name for b in blocks}
        bad = [n for n in names if n not in known]
        if bad:
            raise ValueError(f"legrad blocks {bad} are not attention blocks; choose among {sorted(known)}")
        blocks = [b for b in blocks if b.name in names]
    project = ctx.options["score_projection"] or default_projection(ctx.model, str(ctx.options["token"]))
    if project is None:
        raise MethodNotApplicableError(str(_legrad_requires(ctx.model, ctx.images)))
    hw = (int(ctx.images.shape[2]), int(ctx.images.shape[3]))
    batch = int(ctx.images.shape[0])
    maps = []
    with attention_probabilities(blocks) as store, torch.enable_grad():
        ctx.model(ctx.images.detach().requires_grad_(True))  # a graph even when every parameter is frozen
        for i, site in enumerate(blocks):
            tokens, probs = store["out"].get(site.name), store["attn"].get(site.name)
            if tokens is None or probs is None:
                raise ValueError(f"legrad: block {site.name!r} did not run, or gave no attention, during the forward")
            layout = infer_layout(tokens.shape, hw)
            if layout is None or layout.kind != "tokens":
                raise MethodNotApplicableError(
                    f"legrad: block {site.name!r} outputs {tuple(tokens.shape)}, not a token grid"
                )
            n = int(tokens.shape[1])
            if probs.ndim != 4 or int(probs.shape[0]) != batch or tuple(probs.shape[2:]) != (n, n):
                raise MethodNotApplicableError(
                    f"legrad: block {site.name!r} attends within windows ({tuple(probs.shape)} probabilities for "
                    f"{n} tokens); LeGrad needs global self-attention over the token grid (ViT, DeiT)"
                )
            score = project(tokens).gather(1, ctx.targets[:, None]).sum()
            (grad,) = torch.autograd.grad(score, probs, retain_graph=i < len(blocks) - 1)
            relevance = grad.clamp_min(0).mean((1, 2))[:, layout.prefix :]
            maps.append(relevance.reshape(-1, layout.h, layout.w).detach().float())
    return torch.stack(maps).mean(0)
