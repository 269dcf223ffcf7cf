"""A tiny name -> factory registry, shared by losses, backbones and datasets.

Factories are registered with a decorator; ``build(name, **kwargs)`` drops keyword arguments
that are ``None`` so that unset CLI/config options never override a factory's own defaults
(the pattern timm uses for ``create_model``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any

from nirdml.errors import ConfigError


class Registry:
    """Maps names to factories for one kind of component (e.g. ``"loss"``)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Callable[..., Any]] = {}

    def register(
        self, name: str | None = None
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
            key = (name or factory.__name__).lower()
            if key in self._factories:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._factories[key] = factory
            return factory

        return decorator

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._factories if fnmatch.fnmatch(n, pattern.lower()))

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._factories[name.lower()]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def build(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**{k: v for k, v in kwargs.items() if v is not None})

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._factories
