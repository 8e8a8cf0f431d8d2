"""Method registry: a config's ``method:`` field names a class, never imports it (timm style).

A method registers itself with ``@register_method("name")``. Modules under ``tbps.methods`` are
imported lazily the first time the registry is queried, so adding a method means adding one file
to that package and one config; nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from tbps.models.base import PersonSearchMethod

_METHODS: dict[str, type["PersonSearchMethod"]] = {}
_DISCOVERED = False


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator registering a :class:`PersonSearchMethod` under ``name``."""

    def decorator(cls: type) -> type:
        existing = _METHODS.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"method {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        cls.method_name = name
        _METHODS[name] = cls
        return cls

    return decorator


def _discover() -> None:
    """Import every module of ``tbps.methods`` once so their decorators run."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    import tbps.methods as package

    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{module.name}")
    _DISCOVERED = True


def get_method_class(name: str) -> type["PersonSearchMethod"]:
    _discover()
    try:
        return _METHODS[name]
    except KeyError:
        known = ", ".join(sorted(_METHODS)) or "none"
        raise ValueError(f"unknown method {name!r}; registered methods: {known}") from None


def list_methods() -> dict[str, str]:
    """Registered method names with their one-line descriptions."""
    _discover()
    return {name: cls.description for name, cls in sorted(_METHODS.items())}


def create_method(name: str, model_config: Any, num_classes: int, **kwargs: Any) -> "PersonSearchMethod":
    """Build the registered method ``name`` from the ``model`` section of a config."""
    return get_method_class(name)(model_config, num_classes=num_classes, **kwargs)
