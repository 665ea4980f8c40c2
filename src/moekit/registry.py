"""Name -> factory registries for routers, expert banks, losses, merge and compression methods (timm style).

Each entry keeps the paper it comes from, so ``list_routers()`` can say where a method is from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

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
    """A named collection of factories; ``register`` is used as a decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, RegistryEntry[T]] = {}

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
        if not isinstance(name, str) or name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[RegistryEntry[T]]:
        return [self._entries[n] for n in self.names()]

    def create(self, name: str, /, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)  # type: ignore[operator]

    def __contains__(self, name: object) -> bool:
        return name in self._entries


ROUTERS: Registry[Callable[..., Any]] = Registry("router")
EXPERTS: Registry[Callable[..., Any]] = Registry("expert bank")
LOSSES: Registry[Callable[..., Any]] = Registry("loss")
MERGE_METHODS: Registry[Callable[..., Any]] = Registry("merge method")
#: expert-reduction methods of the compression pipeline (``moekit compress --method``), one file each
EXPERT_METHODS: Registry[Callable[..., Any]] = Registry("compression method")
#: per-block statistics the layer-wise observer can collect for a method
STATISTICS: Registry[Callable[..., Any]] = Registry("statistic")
#: model builders by name; a checkpoint's JSON config names its builder and keyword arguments
MODELS: Registry[Callable[..., Any]] = Registry("model")


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
