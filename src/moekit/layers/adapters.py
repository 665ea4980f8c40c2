"""Routed adapters for existing models: insert, freeze the backbone, save and reload adapter weights.

    model = insert_routed_adapters(model, sites=r"encoder\\.layer\\.\\d+$", method="smear", num_experts=8, bottleneck=24)
    out = model(input_ids, attention_mask=mask)           # padding masks are picked up from the call
    with adapter_context(model, meta={"tag": domains}) as outputs:
        out = model(...)                                  # outputs[site] -> that site's MoEOutput
    save_adapters(model, "run/adapters")                  # adapters, routers and every other trainable tensor
    load_adapters(fresh_backbone, "run/adapters")         # same sites, same weights, same trainable tensors

Each matched module keeps its code; a forward hook adds ``h + block(h)`` to its output (the first
tensor of a tensor, tuple or model output), where ``block`` is any method of ``ROUTED_METHODS`` built by
``build_routed_block``. Sequences ``[B, S, D]`` are routed per example on the masked mean; feature maps
``[B, C, H, W]`` get a bottleneck at every position, routed on the spatial mean (the ResNet adapters of
SMEAR). Sites inside a causal decoder (GPT-2, the T5 decoder, moekit's ``MoELM``) are routed per causal
segment (``moekit.layers.segments``) so that no token sees its future. The adapters live in
``model.moekit_adapters`` (a ModuleDict), so ``.to()``, ``state_dict`` and optimisers see them.

Masks: the root module's ``attention_mask`` / ``decoder_attention_mask`` keyword arguments are used
automatically (the decoder mask for sites under a ``decoder`` module of an encoder-decoder model);
``adapter_context(model, mask=..., decoder_mask=...)`` overrides them. A mask applies where its shape
is the site's ``[B, S]``.

Freezing: every backbone parameter gets ``requires_grad=False`` except the modules named in ``train=``
(by default the task head of a Hugging Face model -- its modules outside ``model.base_model``, such as
BERT's ``classifier``, unless they share weights with it as a tied LM head does). ``save_adapters``
saves every tensor that is trainable when it is called (so a head unfrozen by hand is kept too), and
``load_adapters`` restores them and their ``requires_grad``. Freezing sets ``requires_grad=False``
only: BatchNorm statistics of a frozen backbone still update in ``train()`` mode, so keep the backbone
in ``eval()`` while training adapters.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .._checks import check_choice, check_int
from ..reporting import atomic_write_bytes, atomic_write_text
from ..types import MoEOutput
from .baselines import ROUTED_METHODS, build_routed_block
from .segments import FIRST_SEGMENT
from .sites import ADAPTERS_ATTR, Sites, infer_dim, is_causal_site, match_sites

__all__ = ["AdapterConfig", "insert_routed_adapters", "adapter_context", "adapter_sites", "remove_adapters",
           "save_adapters", "load_adapters", "task_head"]  # fmt: skip

WEIGHTS_FILE, CONFIG_FILE = "adapters.safetensors", "adapters.json"
#: key prefix of the backbone's trainable tensors in ``adapters.safetensors`` (never part of a module name)
BACKBONE_PREFIX = "backbone:"
CONFIG_KEY = "moekit_adapters"  # the config, also kept in the weights file's metadata


@dataclass(frozen=True)
class AdapterConfig:
    """Everything needed to rebuild the inserted adapters on a fresh backbone (saved as JSON)."""

    sites: list[str]
    dims: list[int]
    causal: list[bool]
    method: str = "smear"
    num_experts: int = 8
    bottleneck: int = 16
    bank: str = "adapter"
    num_keys: int | None = None
    segment_len: int = 64
    first_segment: str = "default"
    bank_kwargs: dict[str, Any] = field(default_factory=dict)
    router_kwargs: dict[str, Any] = field(default_factory=dict)
    train: list[str] = field(default_factory=list)
    trainable_tensors: list[str] = field(default_factory=list)


class _Context:
    """Masks and metadata for the current forward; ``record`` collects each site's output."""

    def __init__(self) -> None:
        self.mask: Tensor | None = None
        self.decoder_mask: Tensor | None = None
        self.auto: tuple[Any, Any] = (None, None)
        self.meta: Mapping[str, Any] | None = None
        self.record: dict[str, MoEOutput] | None = None


class _AdapterSet(nn.ModuleDict):
    """The inserted blocks by site; holds the hook handles and the forward context."""

    def __init__(self, config: AdapterConfig, blocks: dict[str, nn.Module]) -> None:
        super().__init__({_key(name): block for name, block in blocks.items()})
        self.config = config
        self.context = _Context()
        self.handles: list[Any] = []
        self.host_class: type | None = None  # the model's class before insertion (restored on removal)


def _sequential_view(cls: type[nn.Sequential]) -> type[nn.Sequential]:
    """A subclass of ``cls`` whose iteration (and so its forward) skips the attached adapter set.

    ``nn.Sequential`` runs every child in order, so the adapters (which only hold parameters and
    run from hooks) must not count as one of its layers.
    """
    if cls not in _SEQUENTIAL_VIEWS:

        def __iter__(self: nn.Sequential) -> Iterator[nn.Module]:
            return (m for name, m in self._modules.items() if name != ADAPTERS_ATTR)

        def __len__(self: nn.Sequential) -> int:
            return len(self._modules) - (ADAPTERS_ATTR in self._modules)

        attrs = {"__iter__": __iter__, "__len__": __len__, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
        _SEQUENTIAL_VIEWS[cls] = type(cls.__name__, (cls,), attrs)
    return _SEQUENTIAL_VIEWS[cls]


_SEQUENTIAL_VIEWS: dict[type, type] = {}


def _key(site: str) -> str:
    return site.replace(".", "__")


def insert_routed_adapters(
    model: nn.Module,
    sites: Sites,
    *,
    method: str = "smear",
    num_experts: int = 8,
    bottleneck: int = 16,
    dim: int | None = None,
    num_keys: int | None = None,
    causal: bool | None = None,
    segment_len: int = 64,
    first_segment: str = "default",
    freeze_backbone: bool = True,
    train: Sequence[str] | None = None,
    bank: str = "adapter",
    bank_kwargs: Mapping[str, Any] | None = None,
    router_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Insert one routed block after each matched module and return ``model`` (modified in place).

    Args:
        sites: a regex searched in module names, a module type (or tuple of types), or exact names.
        method: a routing method of ``moekit.layers.ROUTED_METHODS`` (smear, tag, hash, top1, ...).
        num_experts, bottleneck: E and the width of one expert (``bank="mlp"``/``"glu"``: hidden size).
        dim: the sites' output width; inferred per site from the module or ``model.config`` when omitted.
        num_keys: number of distinct example ids (``method="hash"``, key ``meta["example_ids"]``).
        causal: route per causal segment of ``segment_len`` positions (``first_segment`` as in
            ``moekit.layers.segments``); ``None`` decides per site from the model's attention modules.
        freeze_backbone: set ``requires_grad=False`` on every parameter that is neither an adapter's nor in ``train``.
        train: names of backbone modules that stay trainable (e.g. ``["classifier"]``, ``["head"]``); default:
            ``task_head(model)`` (a Hugging Face model's untied task head; nothing for other models).
        bank, bank_kwargs, router_kwargs: the expert bank by name and extra arguments of bank and router
            (adapter banks default to ``up_init_scale=0.01``: the model starts close to the backbone).
    Nothing is changed if any step fails (unknown method, no matching site, unknown width, ...).
    """
    check_choice("method", method, ROUTED_METHODS)
    check_int("segment_len", segment_len, low=1)
    check_choice("first_segment", first_segment, FIRST_SEGMENT)
    if causal is not None and not isinstance(causal, bool):
        raise TypeError(f"causal must be True, False or None, got {causal!r}")
    names = match_sites(model, sites)
    modules = dict(model.named_modules())
    trained = _check_train(model, task_head(model) if train is None else train)
    dims = []
    for name in names:
        d = dim if dim is not None else infer_dim(model, modules[name])
        if d is None:
            raise ValueError(f"cannot infer the output width of site {name!r}; pass dim=")
        dims.append(check_int("dim", d, low=1))
    flags = [causal if causal is not None else is_causal_site(model, n) for n in names]
    bank_kw = dict(bank_kwargs or {})
    if bank == "adapter":  # start close to the backbone's function (the official code: N(0, 0.01^2) weights)
        bank_kw.setdefault("up_init_scale", 1e-2)
    config = AdapterConfig(names, dims, flags, method, num_experts, bottleneck, bank, num_keys, segment_len,
                           first_segment, bank_kw, dict(router_kwargs or {}), trained)  # fmt: skip
    _install(model, config)
    if freeze_backbone:
        _freeze_backbone(model, trained)
    return model


def task_head(model: nn.Module) -> list[str]:
    """The task head of a Hugging Face model: its top-level modules outside ``model.base_model`` that
    have parameters and share none with it (BERT's ``classifier``; not a tied LM head). ``[]`` for
    models without a separate base model."""
    prefix = getattr(model, "base_model_prefix", None)
    base = getattr(model, prefix, None) if isinstance(prefix, str) and prefix else None
    if not isinstance(base, nn.Module) or base is model:
        return []
    shared = {id(p) for p in base.parameters()}
    heads = []
    for name, child in model.named_children():
        params = list(child.parameters())
        if child is base or name == ADAPTERS_ATTR or not params:
            continue
        if not any(id(p) in shared for p in params):
            heads.append(name)
    return heads


def _check_train(model: nn.Module, train: Sequence[str]) -> list[str]:
    if isinstance(train, str):
        raise TypeError(f"train must be a list of module names, got the string {train!r}; use [{train!r}]")
    names = {n for n, _ in model.named_modules() if n and not n.startswith(ADAPTERS_ATTR)}
    missing = [t for t in train if t not in names]
    if missing:
        tops = ", ".join(n for n, _ in model.named_children() if n != ADAPTERS_ATTR)
        raise ValueError(f"train names {missing}, which are not modules of {type(model).__name__} "
                         f"(its top-level modules: {tops})")  # fmt: skip
    return list(train)


def _build(config: AdapterConfig, index: int, kw: dict[str, Any]) -> nn.Module:
    router_kwargs = dict(config.router_kwargs)
    if config.method == "hash":  # a different random table at every site, as in the official code
        router_kwargs["seed"] = int(router_kwargs.get("seed", 0)) + index
    seg = config.segment_len if config.causal[index] else None
    return build_routed_block(config.method, dim=config.dims[index], num_experts=config.num_experts,
                              width=config.bottleneck, bank=config.bank, num_keys=config.num_keys, segment_len=seg,
                              first_segment=config.first_segment, bank_kwargs=config.bank_kwargs,
                              router_kwargs=router_kwargs, **kw)  # fmt: skip


def _install(model: nn.Module, config: AdapterConfig) -> None:
    """Build every block first, then attach them all (so a failure leaves the model untouched)."""
    if hasattr(model, ADAPTERS_ATTR):
        raise ValueError(f"{type(model).__name__} already has routed adapters; insert into a fresh backbone")
    if not (len(config.sites) == len(config.dims) == len(config.causal)):
        counts = (len(config.sites), len(config.dims), len(config.causal))
        raise ValueError(f"adapter config lists {counts[0]} sites, {counts[1]} dims and {counts[2]} causal flags")
    match_sites(model, config.sites)
    ref = next(iter(model.parameters()), None)
    kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    blocks = {name: _build(config, i, kw) for i, name in enumerate(config.sites)}
    adapters = _AdapterSet(config, blocks).train(model.training)
    modules = dict(model.named_modules())
    model.add_module(ADAPTERS_ATTR, adapters)
    adapters.host_class = type(model)
    if isinstance(model, nn.Sequential):
        model.__class__ = _sequential_view(type(model))
    try:
        ctx = adapters.context
        adapters.handles.append(model.register_forward_pre_hook(_capture_masks(ctx), with_kwargs=True))
        adapters.handles.append(model.register_forward_hook(_clear_masks(ctx), always_call=True))
        decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        for name in config.sites:
            in_decoder = decoder and "decoder" in name.split(".")
            hook = _hook(adapters, name, in_decoder)
            adapters.handles.append(modules[name].register_forward_hook(hook))
    except BaseException:
        remove_adapters(model)
        raise


def _capture_masks(ctx: _Context):
    def pre_hook(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        ctx.auto = (kwargs.get("attention_mask"), kwargs.get("decoder_attention_mask"))

    return pre_hook


def _clear_masks(ctx: _Context):
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        ctx.auto = (None, None)

    return hook


def _freeze_backbone(model: nn.Module, train: Sequence[str] = (), tensors: Sequence[str] = ()) -> None:
    """Freeze every parameter but the adapters', those of the modules ``train`` and the parameters ``tensors``."""
    keep = {id(p) for p in _adapters(model).parameters()}
    for name in train:
        keep |= {id(p) for p in model.get_submodule(name).parameters()}
    params = dict(model.named_parameters())
    keep |= {id(params[name]) for name in tensors if name in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def _hook(adapters: _AdapterSet, site: str, in_decoder: bool):
    block = adapters[_key(site)]

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        ctx = adapters.context
        h = _first_tensor(output, site)
        mask = (ctx.decoder_mask if ctx.decoder_mask is not None else ctx.auto[1]) if in_decoder else \
            (ctx.mask if ctx.mask is not None else ctx.auto[0])  # fmt: skip
        out = _apply(block, h, mask, ctx.meta, site)
        if ctx.record is not None:
            ctx.record[site] = out
        return _replace_first_tensor(output, h + out.y)

    return hook


def _apply(block: nn.Module, h: Tensor, mask: Any, meta: Mapping[str, Any] | None, site: str) -> MoEOutput:
    if h.dim() == 4:  # feature map: a bottleneck at every position, routed on the spatial mean
        B, C, H, W = h.shape
        out = block(h.flatten(2).transpose(1, 2), meta=meta)
        return MoEOutput(out.y.transpose(1, 2).reshape(B, C, H, W), out.aux, out.decision)
    if h.dim() not in (2, 3):
        shape = tuple(h.shape)
        raise ValueError(f"adapter site {site!r} produced shape {shape}; expected [B, D], [B, S, D] or [B, C, H, W]")
    use_mask = isinstance(mask, Tensor) and h.dim() == 3 and tuple(mask.shape) == tuple(h.shape[:2])
    return block(h, mask=mask if use_mask else None, meta=meta)


def _first_tensor(output: Any, site: str) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    if hasattr(output, "to_tuple") and output.to_tuple() and isinstance(output.to_tuple()[0], Tensor):
        return output.to_tuple()[0]
    kind = type(output).__name__
    raise TypeError(f"adapter site {site!r} returned {kind}; expected a tensor, a tuple or a model output")


def _replace_first_tensor(output: Any, new: Tensor) -> Any:
    if isinstance(output, Tensor):
        return new
    if isinstance(output, tuple):
        return (new, *output[1:])
    if isinstance(output, list):
        return [new, *output[1:]]
    output[next(iter(output.keys()))] = new  # a ModelOutput: its first field is to_tuple()[0]
    return output


@contextlib.contextmanager
def adapter_context(
    model: nn.Module,
    *,
    mask: Tensor | None = None,
    decoder_mask: Tensor | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Iterator[dict[str, MoEOutput]]:
    """Give the adapters padding masks ``[B, S]`` (true = real token) and per-example metadata (e.g.
    ``{"tag": domains}``, ``{"example_ids": ids}``) for the forwards inside the block. Yields a dict
    that receives each site's ``MoEOutput`` (routing decision, aux terms) of the latest forward."""
    ctx = _adapters(model).context
    previous = (ctx.mask, ctx.decoder_mask, ctx.meta, ctx.record)
    ctx.mask, ctx.decoder_mask, ctx.meta, ctx.record = mask, decoder_mask, meta, {}
    try:
        yield ctx.record
    finally:
        ctx.mask, ctx.decoder_mask, ctx.meta, ctx.record = previous


def adapter_sites(model: nn.Module) -> dict[str, nn.Module]:
    """The inserted blocks by site name."""
    adapters = _adapters(model)
    return {name: adapters[_key(name)] for name in adapters.config.sites}


def _adapters(model: nn.Module) -> _AdapterSet:
    adapters = getattr(model, ADAPTERS_ATTR, None)
    if not isinstance(adapters, _AdapterSet):
        raise ValueError(f"{type(model).__name__} has no routed adapters; call insert_routed_adapters first")
    return adapters


def remove_adapters(model: nn.Module) -> nn.Module:
    """Detach and delete the inserted adapters (the backbone's ``requires_grad`` flags are left as they are)."""
    adapters = _adapters(model)
    for handle in adapters.handles:
        handle.remove()
    delattr(model, ADAPTERS_ATTR)
    if adapters.host_class is not None:
        model.__class__ = adapters.host_class
    return model


def _backbone_tensors(model: nn.Module, train: Sequence[str]) -> dict[str, Tensor]:
    """Every trainable backbone parameter, and the buffers of the modules in ``train``, by model key."""
    adapter_params = {id(p) for p in _adapters(model).parameters()}
    out = {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapter_params}
    for name in train:
        prefix = f"{name}." if name else ""
        out.update({prefix + n: b for n, b in model.get_submodule(name).named_buffers()})
    return out


def save_adapters(model: nn.Module, path: str | Path) -> Path:
    """Write the adapters' and routers' weights and every other tensor that is trainable now (a task
    head, parameters unfrozen by hand) into ``adapters.safetensors``, and their config into
    ``adapters.json``, in directory ``path`` (which may hold other files; earlier adapter files there
    are replaced). The weights file also carries the config in its metadata and is written atomically,
    so it alone is what ``load_adapters`` reads: an interrupted save leaves the old adapters or the new
    ones, never a mix (``adapters.json`` is the readable copy)."""
    from safetensors.torch import save

    adapters = _adapters(model)
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    extra = _backbone_tensors(model, adapters.config.train)
    state = {k: v.detach().contiguous().cpu() for k, v in adapters.state_dict().items()}
    state.update({BACKBONE_PREFIX + k: v.detach().contiguous().cpu() for k, v in extra.items()})
    config = json.dumps(asdict(replace(adapters.config, trainable_tensors=sorted(extra))), indent=2)
    atomic_write_bytes(out / WEIGHTS_FILE, save(state, metadata={CONFIG_KEY: config}))
    atomic_write_text(out / CONFIG_FILE, config + "\n")
    return out


def _load_backbone_tensors(model: nn.Module, tensors: Mapping[str, Tensor], src: Path) -> None:
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    missing = [k for k in tensors if k not in own]
    bad = [k for k in tensors if k in own and own[k].shape != tensors[k].shape]
    if missing or bad:
        raise ValueError(f"trainable tensors in {src} do not fit this backbone: not in the model {missing[:5]}, "
                         f"other shapes {bad[:5]}")  # fmt: skip
    with torch.no_grad():
        for key, value in tensors.items():
            own[key].copy_(value)


def load_adapters(model: nn.Module, path: str | Path, *, freeze_backbone: bool = True) -> nn.Module:
    """Insert the adapters recorded in ``path`` into a fresh backbone, load their weights and the saved
    trainable backbone tensors; with ``freeze_backbone`` only those stay trainable."""
    from safetensors import SafetensorError, safe_open

    src = Path(path)
    weights = src / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: not a moekit adapter directory ({WEIGHTS_FILE}, {CONFIG_FILE})")
    try:
        with safe_open(str(weights), framework="pt") as f:
            text = (f.metadata() or {}).get(CONFIG_KEY)
            state = {k: f.get_tensor(k) for k in f.keys()}
        if text is None:  # saved before the config was embedded in the weights file
            text = (src / CONFIG_FILE).read_text(encoding="utf-8")
        config = AdapterConfig(**json.loads(text))
    except (json.JSONDecodeError, TypeError, SafetensorError, OSError) as err:
        raise ValueError(f"corrupt adapter files in {src}: {err}") from err
    extra = {k[len(BACKBONE_PREFIX) :]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
    state = {k: v for k, v in state.items() if not k.startswith(BACKBONE_PREFIX)}
    _check_train(model, config.train)
    _install(model, config)
    try:
        _adapters(model).load_state_dict(state)
        _load_backbone_tensors(model, extra, src)
    except (RuntimeError, ValueError) as err:
        remove_adapters(model)
        raise ValueError(f"adapter weights in {src} do not fit this backbone: {err}") from err
    if freeze_backbone:
        _freeze_backbone(model, config.train, config.trainable_tensors)
    return model
