"""A tiny name -> factory registry, shared by losses, backbones and datasets.

Factories are registered with a decorator; ``build(name, **kwargs)`` drops keyword arguments
that are ``None`` so that unset CLI/config options never override a factory's own defaults
(the pattern timm uses for ``create_model``).
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Iterable, Mapping
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

    def check(self, name: Any, options: Mapping[str, Any] | None = None, *, key: str,
              options_key: str | None = None, fixed: Iterable[str] = ()) -> None:
        """Before any work: a one-line ConfigError unless ``name`` is registered (naming the
        config ``key`` and the allowed values) and the factory's signature takes every key of
        ``options`` (naming ``options_key`` and the keys it takes; ``fixed``: arguments the
        builder passes itself, which options may not set). A factory with ``**kwargs`` takes
        any option; its own checks see them when it is built."""
        if not isinstance(name, str) or name.lower() not in self._factories:
            raise ConfigError(f"invalid value for {key}: {name!r}; allowed values: "
                              f"{', '.join(map(repr, self.names()))}")
        if not options:
            return
        params = inspect.signature(self._factories[name.lower()]).parameters
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return
        fixed = set(fixed)
        takes = [n for n, p in params.items()
                 if n not in fixed and p.kind not in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY)]
        unknown = sorted(str(k) for k in options if k not in takes)
        if unknown:
            raise ConfigError(f"invalid key {options_key or key}.{unknown[0]} for {key}="
                              f"{name!r}; allowed keys there: {', '.join(takes) or 'none'}")

    def build(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**{k: v for k, v in kwargs.items() if v is not None})

    def __contains__(self, name: str) -> bool:
        return name.lower() in self._factories
