"""Name -> factory registries: routers, expert banks, losses, merge and compression methods, statistics, models.

Each entry keeps the paper it comes from, so ``list_routers()`` can say where a method is from. A
registry knows which moekit modules define its built-in entries and imports them on the first
look-up, so ``import moekit`` stays light and every name is still there when asked for.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Generic, Sequence, TypeVar, overload

__all__ = [
    "Registry",
    "RegistryEntry",
    "ROUTERS",
    "EXPERTS",
    "LOSSES",
    "MERGE_METHODS",
    "EXPERT_METHODS",
    "STATISTICS",
    "MODELS",
    "register_model",
    "create_router",
    "list_routers",
    "create_experts",
    "list_experts",
    "get_loss",
    "list_losses",
]

T = TypeVar("T")


@dataclass(frozen=True)
class RegistryEntry(Generic[T]):
    name: str
    factory: T
    paper: str
    summary: str


class Registry(Generic[T]):
    """A named collection of factories; ``register`` is used as a decorator.

    ``builtins`` names the modules whose import registers the built-in entries; they are imported
    on the first look-up (``get``, ``entry``, ``names``, ``entries``, ``in``).
    """

    def __init__(self, kind: str, builtins: Sequence[str] = ()) -> None:
        self.kind = kind
        self._entries: dict[str, RegistryEntry[T]] = {}
        self._builtins = tuple(builtins)

    def _load_builtins(self) -> None:
        modules, self._builtins = self._builtins, ()  # cleared first: a builtin module may look names up
        for module in modules:
            importlib.import_module(module)

    def register(self, name: str, *, paper: str = "", summary: str = "") -> Callable[[T], T]:
        def decorator(factory: T) -> T:
            if name in self._entries and self._entries[name].factory is not factory:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            doc = (getattr(factory, "__doc__", None) or "").strip().splitlines()
            self._entries[name] = RegistryEntry(name, factory, paper, summary or (doc[0] if doc else ""))
            return factory

        return decorator

    def get(self, name: str) -> T:
        return self.entry(name).factory

    def entry(self, name: str) -> RegistryEntry[T]:
        self._load_builtins()
        if not isinstance(name, str) or name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._entries)

    def entries(self) -> list[RegistryEntry[T]]:
        return [self._entries[n] for n in self.names()]

    def create(self, name: str, /, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)  # type: ignore[operator]

    def __contains__(self, name: object) -> bool:
        self._load_builtins()
        return name in self._entries


ROUTERS: Registry[Callable[..., Any]] = Registry("router", ["moekit.routers"])
EXPERTS: Registry[Callable[..., Any]] = Registry("expert bank", ["moekit.experts"])
LOSSES: Registry[Callable[..., Any]] = Registry("loss", ["moekit.losses"])
MERGE_METHODS: Registry[Callable[..., Any]] = Registry("merge method", ["moekit.merging.layer"])
#: expert-reduction methods of the compression pipeline (``moekit compress --method``), one file each
EXPERT_METHODS: Registry[Callable[..., Any]] = Registry("compression method", ["moekit.merging.methods"])
#: per-block statistics the layer-wise observer can collect for a method
STATISTICS: Registry[Callable[..., Any]] = Registry("statistic", ["moekit.merging.statistics"])
#: how an MoE layer runs its bank on a routing decision (``MoE(combine=name)``), one class each
DISPATCHERS: Registry[Callable[..., Any]] = Registry(
    "dispatcher", ["moekit.layers.dispatchers", "moekit.layers.smear", "moekit.distributed.layer"]
)
#: model kinds outside moekit that the compression pipeline can stack in memory or stream from disk
#: (``moekit.merging.streaming.ModelKind``); the Hugging Face kind is registered by ``integrations/hf``,
#: so ``merging/`` never imports ``integrations/``
MODEL_KINDS: Registry[Any] = Registry("model kind", ["moekit.integrations.hf.kind"])
#: model builders by name; a checkpoint's JSON config names its builder and keyword arguments
MODELS: Registry[Callable[..., Any]] = Registry(
    "model",
    ["moekit.models.classifier", "moekit.models.lm", "moekit.models.multitask", "moekit.models.resnet_moe",
     "moekit.distributed.model"],
)  # fmt: skip

M = TypeVar("M", bound=Callable[..., Any])


@overload
def register_model(name: M, /) -> M: ...
@overload
def register_model(name: str | None = None, /, *, summary: str = "", paper: str = "") -> Callable[[M], M]: ...
def register_model(name: Any = None, /, *, summary: str = "", paper: str = "") -> Any:
    """Register a model class (or builder function) so that ``save_checkpoint`` / ``load_checkpoint``
    can rebuild it by name. Bare ``@register_model`` uses the class name.

        @moekit.register_model("my_net")
        class MyNet(nn.Module):
            def __init__(self, width: int = 32): ...
            def config(self) -> dict:            # the keyword arguments that rebuild it
                return {"width": self.width}

    ``load_checkpoint`` finds the name only once the module defining it has been imported.
    """
    if callable(name):
        return MODELS.register(name.__name__)(name)

    def decorator(factory: M) -> M:
        return MODELS.register(name or factory.__name__, summary=summary, paper=paper)(factory)

    return decorator


def create_router(name: str, /, **kwargs: Any) -> Any:
    """Build a registered router, e.g. ``create_router("topk", dim=64, num_experts=8, k=2)``."""
    return ROUTERS.create(name, **kwargs)


def list_routers() -> list[str]:
    return ROUTERS.names()


def create_experts(name: str, /, **kwargs: Any) -> Any:
    """Build a registered expert bank, e.g. ``create_experts("glu", num_experts=8, dim=64, hidden=128)``."""
    return EXPERTS.create(name, **kwargs)


def list_experts() -> list[str]:
    return EXPERTS.names()


def get_loss(name: str) -> Callable[..., Any]:
    """A registered balancing loss: a pure function of a RoutingDecision."""
    return LOSSES.get(name)


def list_losses() -> list[str]:
    return LOSSES.names()
