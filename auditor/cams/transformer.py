"""Methods for vision transformers that read attention: LeGrad.

A transformer block here is a module with an ``nn.MultiheadAttention`` child (torchvision's
``EncoderBlock.self_attention``). During LeGrad's own forward each such attention is asked for its per-head
probabilities, and its output is recomputed from them so that they are part of the graph (the probabilities
``nn.MultiheadAttention`` returns are a view that the output does not depend on).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from auditor.cams.context import CamContext
from auditor.cams.layers import infer_layout
from auditor.cams.registry import register_cam
from auditor.errors import MethodNotApplicableError

ScoreProjection = Callable[[Tensor], Tensor]


def attention_blocks(model: nn.Module) -> list[tuple[str, nn.Module, nn.MultiheadAttention]]:
    """``(block name, block, attention)`` for every module with a direct ``nn.MultiheadAttention`` child."""
    out = []
    for name, module in model.named_modules():
        for child in module.children():
            if isinstance(child, nn.MultiheadAttention):
                out.append((name, module, child))
                break
    return out


def torchvision_projection(model: nn.Module, token: str = "mean") -> ScoreProjection | None:
    """For torchvision's ``VisionTransformer``: tokens ``[B, N, D]`` -> logits through the model's own final
    LayerNorm and heads, read at the mean token (``token="mean"``, LeGrad's official code and torchcam) or at
    the class token (``"class"``, how the model reads its last block). None for other models."""
    encoder = getattr(model, "encoder", None)
    norm = getattr(encoder, "ln", None)
    heads = getattr(model, "heads", None)
    if not (isinstance(norm, nn.Module) and isinstance(heads, nn.Module) and hasattr(model, "class_token")):
        return None
    if token not in ("mean", "class"):
        raise ValueError(f"legrad token must be 'mean' or 'class', got {token!r}")

    def project(tokens: Tensor) -> Tensor:
        return heads(norm(tokens.mean(1) if token == "mean" else tokens[:, 0]))

    return project


def _legrad_requires(model: nn.Module, example: Tensor) -> str | None:
    if not attention_blocks(model):
        return "legrad needs nn.MultiheadAttention modules (vision transformers); this model has none"
    if torchvision_projection(model) is None:
        return (
            "legrad maps each block's tokens to class scores; only torchvision VisionTransformer is known, "
            "pass the option score_projection (Python API) for other transformers"
        )
    return None


def _check_attention(name: str, attn: nn.MultiheadAttention) -> None:
    if not attn.batch_first or attn.in_proj_weight is None or attn.bias_k is not None or attn.add_zero_attn:
        raise MethodNotApplicableError(
            f"legrad supports batch-first self-attention with one packed Q/K/V projection; block {name!r} differs"
        )


@contextmanager
def attention_probabilities(blocks: list[tuple[str, nn.Module, nn.MultiheadAttention]]) -> Iterator[dict[str, Any]]:
    """Within the block, each attention returns its outputs recomputed from per-head probabilities, which
    are recorded (``store['attn'][name]``, ``[B, heads, N, N]``) with the block outputs (``store['out']``)."""
    store: dict[str, Any] = {"attn": {}, "out": {}, "wanted": {}}
    handles = []
    for name, block, attn in blocks:
        _check_attention(name, attn)

        def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name) -> Any:
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

        def post(
            module: nn.MultiheadAttention, args: Any, kwargs: dict[str, Any], output: Any, name: str = name
        ) -> Any:
            probs = output[1]
            value = args[2] if len(args) > 2 else kwargs["value"]
            b, n, e = value.shape
            heads = module.num_heads
            bias = None if module.in_proj_bias is None else module.in_proj_bias[2 * e :]
            v = F.linear(value, module.in_proj_weight[2 * e :], bias).view(b, n, heads, e // heads).transpose(1, 2)
            mixed = (probs @ v).transpose(1, 2).reshape(b, probs.shape[2], e)
            store["attn"][name] = probs
            return module.out_proj(mixed), (probs.mean(1) if store["wanted"][name] else None)

        def block_out(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
            if isinstance(out, Tensor):
                store["out"][name] = out

        handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(attn.register_forward_hook(post, with_kwargs=True))
        handles.append(block.register_forward_hook(block_out))
    try:
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
    matters) or to the class token (``token: class``: only the class token's row gets a gradient), for
    torchvision ``VisionTransformer``; other transformers pass ``score_projection``
    (``tokens [B, N, D] -> [B, C]``, Python API). ``blocks`` names the blocks (default: all). Raises
    :class:`MethodNotApplicableError` without attention modules.
    """
    blocks = attention_blocks(ctx.model)
    if not blocks:
        raise MethodNotApplicableError("legrad needs nn.MultiheadAttention modules; this model has none")
    chosen = ctx.options["blocks"]
    if chosen is not None:
        names = [chosen] if isinstance(chosen, str) else list(chosen)
        known = {n for n, _, _ in blocks}
        bad = [n for n in names if n not in known]
        if bad:
            raise ValueError(f"legrad blocks {bad} are not attention blocks; choose among {sorted(known)}")
        blocks = [b for b in blocks if b[0] in names]
    project = ctx.options["score_projection"] or torchvision_projection(ctx.model, str(ctx.options["token"]))
    if project is None:
        raise MethodNotApplicableError(str(_legrad_requires(ctx.model, ctx.images)))
    hw = (int(ctx.images.shape[2]), int(ctx.images.shape[3]))
    maps = []
    with attention_probabilities(blocks) as store, torch.enable_grad():
        ctx.model(ctx.images.detach().requires_grad_(True))  # a graph even when every parameter is frozen
        for i, (name, _, _) in enumerate(blocks):
            tokens, probs = store["out"].get(name), store["attn"].get(name)
            if tokens is None or probs is None:
                raise ValueError(f"legrad: block {name!r} did not run during the forward pass")
            layout = infer_layout(tokens.shape, hw)
            if layout is None or layout.kind != "tokens":
                raise MethodNotApplicableError(
                    f"legrad: block {name!r} outputs {tuple(tokens.shape)}, not a token grid"
                )
            score = project(tokens).gather(1, ctx.targets[:, None]).sum()
            (grad,) = torch.autograd.grad(score, probs, retain_graph=i < len(blocks) - 1)
            relevance = grad.clamp_min(0).mean((1, 2))[:, layout.prefix :]
            maps.append(relevance.reshape(-1, layout.h, layout.w).detach().float())
    return torch.stack(maps).mean(0)
