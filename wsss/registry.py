"""Small name -> constructor registries that fail loudly.

Each kind of pluggable component (backbones, methods, refiners, datasets) gets one
:class:`Registry`. Registering a name twice raises; asking for an unknown name raises a
``KeyError`` that lists every valid name.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List


class Registry:
    """A mapping from names to constructors for one kind of component."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering ``fn`` under ``name`` (default: its ``__name__``)."""

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            key = name or fn.__name__
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._items[key] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(sorted(self._items)) or "(none registered)"
            raise KeyError(f"unknown {self.kind} {name!r}; valid names: {valid}") from None

    def build(self, name: str, **kwargs: Any) -> Any:
        """Construct ``name``; ``None``-valued kwargs are dropped so unset config keeps defaults."""
        return self.get(name)(**{k: v for k, v in kwargs.items() if v is not None})

    def names(self) -> List[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
