"""Loading the audited classifier: a torchvision or timm architecture + state_dict, a Hugging Face model folder,
TorchScript, a factory function, or (Python API) a model object."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator
from torch import Tensor, nn

from auditor.errors import ModelError
from auditor.registry import did_you_mean

log = logging.getLogger(__name__)


class ModelConfig(BaseModel):
    """Where the classifier comes from (config key ``model``): exactly one of ``arch`` (torchvision), ``timm``
    (a timm model name), ``huggingface`` (a ``save_pretrained`` folder), ``torchscript``, ``factory``, or
    ``python`` (set by :func:`auditor.audit` to describe the model object it was given). It sits with the
    loading it configures, so the loaders import nothing from the config."""

    model_config = ConfigDict(extra="forbid", frozen=False)

    arch: str | None = None
    timm: str | None = None
    timm_kwargs: dict[str, Any] = Field(default_factory=dict)
    huggingface: Path | None = None
    torchscript: Path | None = None
    factory: str | None = None
    factory_kwargs: dict[str, Any] = Field(default_factory=dict)
    python: str | None = None
    num_classes: StrictInt | None = Field(default=None, ge=1)
    checkpoint: Path | None = None
    target_layer: str | list[str] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        given = [k for k in SOURCES if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(SOURCES[:-1])} (got {given or 'none'})")
        if self.torchscript is not None and self.checkpoint is not None:
            raise ValueError("a TorchScript file holds its weights; remove 'checkpoint'")
        if self.factory is not None and ":" not in self.factory:
            raise ValueError(f"factory must be 'module:function' or 'file.py:function', got {self.factory!r}")
        return self


SOURCES = ("arch", "timm", "huggingface", "torchscript", "factory", "python")
_PREFIXES = ("module.", "model.", "_orig_mod.")


@dataclass
class LoadedModel:
    """The model in eval mode on its device, and whether hooks (white-box methods) are possible."""

    module: nn.Module
    scripted: bool
    description: str


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``.safetensors`` or a torch file loaded with ``weights_only=True``.

    Accepts a ``{"state_dict": ...}`` / ``{"model": ...}`` / ``{"model_state_dict": ...}`` wrapper.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any reader failure is reported with the file name, then stops the run
        raise ModelError(
            f"cannot read checkpoint {path}: {err}. Save a state_dict with torch.save(model.state_dict(), path) "
            "(full pickled models are refused: weights_only=True)"
        ) from err
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"checkpoint {path} does not hold a state_dict (a mapping of parameter names to tensors)")
    return dict(obj)


def strip_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Remove ``module.`` (DataParallel), ``model.`` (Lightning) or ``_orig_mod.`` (torch.compile) prefixes.

    A prefix is stripped only when every key has it and the model's own keys do not.
    """
    for _ in range(3):
        changed = False
        for prefix in _PREFIXES:
            if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in expected):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
        if not changed:
            break
    return state


def load_weights(model: nn.Module, path: Path) -> None:
    """Load ``path`` into ``model`` strictly; missing / unexpected / mis-shaped keys raise a clear error."""
    expected = model.state_dict()
    state = strip_prefixes(read_state_dict(path), set(expected))
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[:2]} (is num_classes right?)")
        raise ModelError(f"checkpoint {path} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def _factory(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    module_name, _, fn_name = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            name = f"auditor_factory_{path.stem}"
            loader_spec = importlib.util.spec_from_file_location(name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise ModelError(f"cannot import factory file {path}")
            mod = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = mod
            loader_spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelError(f"cannot import the factory module {module_name!r}: {err}") from err
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        names = [n for n in dir(mod) if not n.startswith("_")]
        raise ModelError(f"{module_name!r} has no callable {fn_name!r}{did_you_mean(fn_name, names)}")
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelError(f"factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _timm_model(cfg: ModelConfig) -> nn.Module:
    try:
        import timm
    except ImportError as err:
        raise ModelError("model.timm needs the timm package: pip install 'auditor[timm]'") from err
    assert cfg.timm is not None
    if cfg.num_classes is None:
        raise ModelError("model.num_classes is required with model.timm")
    if not timm.is_model(cfg.timm):
        names = timm.list_models()
        raise ModelError(f"unknown timm model {cfg.timm!r}{did_you_mean(cfg.timm, names)}")
    try:  # weights come from model.checkpoint only: nothing is downloaded
        return timm.create_model(cfg.timm, pretrained=False, num_classes=cfg.num_classes, **cfg.timm_kwargs)
    except TypeError as err:
        raise ModelError(f"model.timm_kwargs do not fit timm model {cfg.timm!r}: {err}") from err


def _huggingface_model(cfg: ModelConfig) -> nn.Module:
    try:
        import transformers
    except ImportError as err:
        raise ModelError(
            "model.huggingface needs the transformers package: pip install 'auditor[huggingface]'"
        ) from err
    folder = cfg.huggingface
    assert folder is not None
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"model.huggingface: {folder} has no config.json; give the folder that model.save_pretrained() wrote"
        )
    try:  # local files only (no download); weights as safetensors, or torch files read with weights_only
        model = transformers.AutoModelForImageClassification.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"cannot load the Hugging Face image classifier in {folder}: {err}") from err
    labels = int(getattr(model.config, "num_labels", 0) or 0)
    if cfg.num_classes is not None and labels and labels != cfg.num_classes:
        raise ModelError(f"model.num_classes is {cfg.num_classes} but the model in {folder} has {labels} labels")
    return model


def model_fingerprint(model: nn.Module) -> str:
    """``ClassName sha256:<16 hex>`` over the parameter and buffer names, shapes and values: what identifies
    a model object passed in Python, so a resume with other weights is refused."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return f"{type(model).__name__} sha256:{h.hexdigest()[:16]}"


def build_model(cfg: ModelConfig, device: torch.device, module: nn.Module | None = None) -> LoadedModel:
    """Build and load the model described by ``cfg`` (or take ``module``, given in Python), in eval mode, on
    ``device``."""
    if cfg.python is not None:
        if module is None:
            raise ModelError(
                f"model.python ({cfg.python}) names a model object given in Python; it cannot be rebuilt from the "
                "config alone: call auditor.audit(model, ...) again, or give model.arch / timm / huggingface"
            )
        return LoadedModel(module.eval().to(device), isinstance(module, torch.jit.ScriptModule), cfg.python)
    if cfg.torchscript is not None:
        try:
            scripted = torch.jit.load(str(cfg.torchscript), map_location=device)
        except (RuntimeError, ValueError) as err:
            raise ModelError(f"cannot load TorchScript file {cfg.torchscript}: {err}") from err
        return LoadedModel(scripted.eval(), True, f"TorchScript {cfg.torchscript.name}")
    if cfg.arch is not None:
        available = torchvision.models.list_models(module=torchvision.models)
        if cfg.arch not in available:
            raise ModelError(f"unknown torchvision architecture {cfg.arch!r}{did_you_mean(cfg.arch, available)}")
        if cfg.num_classes is None:
            raise ModelError("model.num_classes is required with model.arch")
        model = torchvision.models.get_model(cfg.arch, weights=None, num_classes=cfg.num_classes)
        description = f"torchvision {cfg.arch} ({cfg.num_classes} classes)"
    elif cfg.timm is not None:
        model = _timm_model(cfg)
        description = f"timm {cfg.timm} ({cfg.num_classes} classes)"
    elif cfg.huggingface is not None:
        model = _huggingface_model(cfg)
        description = f"Hugging Face {type(model).__name__} from {cfg.huggingface.name}"
    else:
        assert cfg.factory is not None  # validated: exactly one source
        model = _factory(cfg.factory, cfg.factory_kwargs)
        description = f"factory {cfg.factory}"
    if cfg.checkpoint is not None:
        load_weights(model, cfg.checkpoint)
        description += f", weights {cfg.checkpoint.name}"
    elif cfg.huggingface is None:
        log.warning("no checkpoint given: auditing a model with its initial weights")
    return LoadedModel(model.eval().to(device), False, description)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; a named device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


def _logits_of(out: Any) -> Tensor | None:
    """The ``[B, C]`` logits inside a model's output: the tensor itself, the first 2-D tensor of a tuple or
    list, a dict's ``logits`` entry or its only 2-D tensor (Hugging Face and torchvision aux heads)."""
    if isinstance(out, Tensor):
        return out if out.ndim == 2 else None
    if isinstance(out, list | tuple):
        return next((o for o in out if isinstance(o, Tensor) and o.ndim == 2), None)
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        if isinstance(out.get("logits"), Tensor) and out["logits"].ndim == 2:
            return out["logits"]
        tensors = [v for v in out.values() if isinstance(v, Tensor) and v.ndim == 2]
        return tensors[0] if len(tensors) == 1 else None
    return None


class _Logits(nn.Module):
    """Wraps a TorchScript model whose output holds the logits (the methods that apply to it are black-box)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        logits = _logits_of(self.inner(x))
        assert logits is not None  # checked on the probe image
        return logits


def logits_only(loaded: LoadedModel, example: Tensor) -> LoadedModel:
    """A model whose forward returns ``[B, C]`` logits, adapting one that returns a tuple, list or dict.

    A Python module keeps its own class and module names (its ``forward`` is wrapped on the instance,
    so layer names and hooks are unchanged).

    Raises:
        ModelError: the output holds no ``[B, C]`` logits (naming what it returned and how to fix it).
    """
    with torch.no_grad():
        out = loaded.module(example)
    logits = _logits_of(out)
    if logits is None:
        what = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
        raise ModelError(
            f"the model returned {what}, with no [batch, classes] logits in it; make forward return the logits "
            "(or a tuple whose first 2-D tensor, or a dict whose 'logits' entry, is the logits)"
        )
    if isinstance(out, Tensor):
        return loaded
    log.info("the model returns %s: auditing its logits %s", type(out).__name__, tuple(logits.shape))
    if loaded.scripted:
        return LoadedModel(_Logits(loaded.module), True, loaded.description)
    module, inner = loaded.module, loaded.module.forward

    def forward(*args: Any, **kwargs: Any) -> Tensor:
        picked = _logits_of(inner(*args, **kwargs))
        assert picked is not None
        return picked

    module.forward = forward
    return loaded
