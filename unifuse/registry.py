"""Registries of methods by name (distillation, fine-tuning): a name maps to (module, class) in a package, imported
when first asked for, so that `unifuse --help` does not import every method."""
from __future__ import annotations

import importlib

from .errors import UnifuseError, choose


def lazy_class(package: str, methods: dict, kind: str, name: str):
    """The class registered as `name` in `methods` (name -> (module, class) inside `package`); an unknown name stops
    with one message listing the names (kind: e.g. "distillation method")."""
    choose(kind, name, methods)
    module, cls = methods[name]
    return getattr(importlib.import_module(f".{module}", package), cls)


def construct(cls, kind: str, name: str, options: dict):
    """cls(**options), a bad keyword reported as one message naming the method."""
    try:
        return cls(**options)
    except TypeError as err:
        raise UnifuseError(f"bad option for {kind} {name!r}: {err}") from None


__all__ = ["construct", "lazy_class"]
