"""Routed adapters for existing models: insert, freeze the backbone, save and reload adapter weights.

    model = insert_routed_adapters(model, sites=r"encoder\\.layer\\.\\d+$", method="smear", num_experts=8, bottleneck=24)
    with adapter_context(model, mask=attention_mask, meta={"tag": domains}):
        out = model(...)
    save_adapters(model, "run/adapters")          # adapter + router weights only (safetensors + JSON)
    load_adapters(fresh_backbone, "run/adapters")  # same sites, same weights

Each matched module keeps its code; a forward hook adds ``h + adapter(h)`` to its output (the first
tensor of a tuple or model output). Sequences ``[B, S, D]`` are routed per example on the masked mean
(the mask given to ``adapter_context`` is used when its shape matches the site's ``[B, S]``); feature
maps ``[B, C, H, W]`` get a 1x1 bottleneck at every position, routed on the spatial mean. The adapters
live in ``model.moekit_adapters`` (a ModuleDict), so ``.to()``, ``state_dict`` and optimisers see them.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..reporting import atomic_write_bytes, atomic_write_text
from .baselines import ROUTED_METHODS, build_routed_block
from .example_routed import ExampleRoutedMoE

__all__ = ["AdapterConfig", "insert_routed_adapters", "adapter_context", "save_adapters", "load_adapters", "adapter_sites"]

ADAPTERS_ATTR = "moekit_adapters"
WEIGHTS_FILE, CONFIG_FILE = "adapters.safetensors", "adapters.json"


@dataclass(frozen=True)
class AdapterConfig:
    """Everything needed to rebuild the inserted adapters on a fresh backbone."""

    sites: list[str]
    dims: list[int]
    method: str = "smear"
    num_experts: int = 8
    bottleneck: int = 16
    bank: str = "adapter"
    num_keys: int | None = None
    bank_kwargs: dict[str, Any] = field(default_factory=dict)
    router_kwargs: dict[str, Any] = field(default_factory=dict)


class _Context:
    """Mask and metadata for the current forward, set by ``adapter_context``."""

    def __init__(self) -> None:
        self.mask: Tensor | None = None
        self.meta: Mapping[str, Any] | None = None


class _AdapterSet(nn.ModuleDict):
    """The inserted adapters by site; holds the hook handles and the forward context."""

    def __init__(self, config: AdapterConfig, blocks: dict[str, ExampleRoutedMoE]) -> None:
        super().__init__({_key(name): block for name, block in blocks.items()})
        self.config = config
        self.context = _Context()
        self.handles: list[Any] = []


def _key(site: str) -> str:
    return site.replace(".", "__") or "root"


_WIDTH_ATTRS = ("out_features", "out_channels", "num_features", "hidden_size", "d_model", "n_embd", "embed_dim")


def _width(module: nn.Module) -> int | None:
    for attr in _WIDTH_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return None


def _infer_dim(model: nn.Module, module: nn.Module) -> int | None:
    """The site's output width: its own attributes, else the model config's hidden size, else the
    last submodule that declares a width (e.g. a Sequential ending in conv/BN/ReLU)."""
    width = _width(module)
    if width is None:
        config = getattr(model, "config", None)
        width = next((v for a in ("hidden_size", "d_model", "n_embd") if isinstance(v := getattr(config, a, None), int)), None)
    if width is None:
        width = next((w for m in reversed(list(module.modules())[1:]) if (w := _width(m)) is not None), None)
    return width


def _match_sites(model: nn.Module, sites: str | type | tuple[type, ...] | Sequence[str]) -> list[str]:
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(sites, str):
        pattern = re.compile(sites)
        found = [n for n in names if pattern.search(n)]
    elif isinstance(sites, type) or (isinstance(sites, tuple) and all(isinstance(t, type) for t in sites)):
        modules = dict(model.named_modules())
        found = [n for n in names if isinstance(modules[n], sites)]
    else:
        wanted = list(sites)
        missing = [s for s in wanted if s not in names]
        if missing:
            raise ValueError(f"sites {missing[:5]} are not modules of the model")
        found = wanted
    found = [n for n in found if not n.startswith(ADAPTERS_ATTR)]
    if not found:
        raise ValueError(f"sites={sites!r} matches no module of {type(model).__name__}")
    return found


def insert_routed_adapters(
    model: nn.Module,
    sites: str | type | tuple[type, ...] | Sequence[str],
    *,
    method: str = "smear",
    num_experts: int = 8,
    bottleneck: int = 16,
    dim: int | None = None,
    num_keys: int | None = None,
    freeze_backbone: bool = True,
    bank_kwargs: dict[str, Any] | None = None,
    router_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Insert one routed adapter after each matched module and return ``model`` (modified in place).

    Args:
        sites: a regex searched in module names, a module type (or tuple of types), or exact names.
        method: a routing method of ``moekit.layers.ROUTED_METHODS`` (smear, tag, hash, top1, ...).
        dim: the site's output width; inferred from the module or ``model.config`` when omitted.
        freeze_backbone: set ``requires_grad=False`` on every parameter that is not an adapter's.
    Nothing is changed if any step fails (unknown method, no matching site, unknown width).
    """
    if method not in ROUTED_METHODS:
        raise ValueError(f"unknown routing method {method!r}; choose from {sorted(ROUTED_METHODS)}")
    names = _match_sites(model, sites)
    modules = dict(model.named_modules())
    dims = []
    for name in names:
        d = dim if dim is not None else _infer_dim(model, modules[name])
        if d is None:
            raise ValueError(f"cannot infer the output width of site {name!r}; pass dim=")
        dims.append(d)
    config = AdapterConfig(names, dims, method, num_experts, bottleneck, "adapter", num_keys,
                           dict(bank_kwargs or {}), dict(router_kwargs or {}))
    _install(model, config, freeze_backbone)
    return model


def _install(model: nn.Module, config: AdapterConfig, freeze_backbone: bool) -> None:
    """Build every adapter first, then attach them all (so a failure leaves the model untouched)."""
    if hasattr(model, ADAPTERS_ATTR):
        raise ValueError("model already has routed adapters; insert into a fresh backbone")
    _match_sites(model, config.sites)
    ref = next(iter(model.parameters()), None)
    kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    blocks = {
        name: build_routed_block(config.method, bank=config.bank, dim=d, num_experts=config.num_experts,
                                 width=config.bottleneck, num_keys=config.num_keys, bank_kwargs=config.bank_kwargs,
                                 router_kwargs=config.router_kwargs, **kw)
        for name, d in zip(config.sites, config.dims)
    }
    adapters = _AdapterSet(config, blocks).train(model.training)
    modules = dict(model.named_modules())
    model.add_module(ADAPTERS_ATTR, adapters)
    for name in config.sites:
        adapters.handles.append(modules[name].register_forward_hook(_hook(adapters, adapters[_key(name)])))
    if freeze_backbone:
        _freeze_backbone(model)


def _freeze_backbone(model: nn.Module) -> None:
    adapter_params = {id(p) for p in _adapters(model).parameters()}
    for p in model.parameters():
        if id(p) not in adapter_params:
            p.requires_grad_(False)


def _hook(adapters: _AdapterSet, block: ExampleRoutedMoE):
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        h = _first_tensor(output)
        return _replace_first_tensor(output, h + _apply(block, h, adapters.context))

    return hook


def _apply(block: ExampleRoutedMoE, h: Tensor, ctx: _Context) -> Tensor:
    if h.dim() == 4:  # feature map: adapter at every position, routed on the spatial mean
        B, C, H, W = h.shape
        y = block(h.flatten(2).transpose(1, 2), meta=ctx.meta).y
        return y.transpose(1, 2).reshape(B, C, H, W)
    mask = ctx.mask if ctx.mask is not None and h.dim() == 3 and ctx.mask.shape == h.shape[:2] else None
    return block(h, mask=mask, meta=ctx.meta).y


def _first_tensor(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    if hasattr(output, "to_tuple"):
        return output.to_tuple()[0]
    raise TypeError(f"adapter site returned {type(output).__name__}; expected a tensor, a tuple or a model output")


def _replace_first_tensor(output: Any, new: Tensor) -> Any:
    if isinstance(output, Tensor):
        return new
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    first = next(iter(output.keys()))
    output[first] = new
    return output


@contextlib.contextmanager
def adapter_context(model: nn.Module, *, mask: Tensor | None = None, meta: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Give the adapters the padding mask ``[B, S]`` and per-example metadata for the next forward(s)."""
    ctx = _adapters(model).context
    previous = (ctx.mask, ctx.meta)
    ctx.mask, ctx.meta = mask, meta
    try:
        yield
    finally:
        ctx.mask, ctx.meta = previous


def adapter_sites(model: nn.Module) -> dict[str, ExampleRoutedMoE]:
    """The inserted adapters by site name."""
    adapters = _adapters(model)
    return {name: adapters[_key(name)] for name in adapters.config.sites}


def _adapters(model: nn.Module) -> _AdapterSet:
    adapters = getattr(model, ADAPTERS_ATTR, None)
    if not isinstance(adapters, _AdapterSet):
        raise ValueError(f"{type(model).__name__} has no routed adapters; call insert_routed_adapters first")
    return adapters


def save_adapters(model: nn.Module, path: str | Path) -> Path:
    """Write only the adapters' and routers' weights (``adapters.safetensors``) and their config
    (``adapters.json``) into directory ``path``."""
    from safetensors.torch import save

    adapters = _adapters(model)
    out = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in adapters.state_dict().items()}
    atomic_write_bytes(out / WEIGHTS_FILE, save(state))
    atomic_write_text(out / CONFIG_FILE, json.dumps(asdict(adapters.config), indent=2) + "\n")
    return out


def load_adapters(model: nn.Module, path: str | Path, *, freeze_backbone: bool = True) -> nn.Module:
    """Insert adapters as recorded in ``path`` into a fresh backbone and load their weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    src = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (src / name).is_file():
            raise FileNotFoundError(f"{src / name} not found: not a moekit adapter directory")
    try:
        config = AdapterConfig(**json.loads((src / CONFIG_FILE).read_text()))
        state = load((src / WEIGHTS_FILE).read_bytes())
    except (json.JSONDecodeError, TypeError, SafetensorError) as err:
        raise ValueError(f"corrupt adapter files in {src}: {err}") from err
    _install(model, config, freeze_backbone=False)
    try:
        _adapters(model).load_state_dict(state)
    except RuntimeError as err:
        _remove(model)
        raise ValueError(f"adapter weights in {src} do not fit this backbone: {err}") from err
    if freeze_backbone:
        _freeze_backbone(model)
    return model


def _remove(model: nn.Module) -> None:
    adapters = _adapters(model)
    for handle in adapters.handles:
        handle.remove()
    delattr(model, ADAPTERS_ATTR)
