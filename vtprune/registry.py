"""Method registry: name -> method class, and `methods()` for listing them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import VTPruneError

_REGISTRY: dict[str, type] = {}


def register(name: str):
    """Class decorator: register a Method dataclass under `name`."""

    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_builtin() -> None:
    from . import methods  # noqa: F401  (imports every method module, which registers it)


def get(name: str) -> type:
    _load_builtin()
    key = name.strip().lower() if isinstance(name, str) else name
    aliases = {"vtc_cls": "vtc-cls", "vtccls": "vtc-cls", "pooling": "pool", "unpruned": "none", "baseline": "none"}
    key = aliases.get(key, key)
    if key not in _REGISTRY:
        raise VTPruneError(f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def build(name, **params: Any):
    """A method instance from a registered name and parameters (or a Method instance, as is)."""
    from .methods.base import Method

    if isinstance(name, Method):
        if params:
            raise VTPruneError("pass parameters to the method's constructor, not to patch(), when giving a Method instance")
        return name
    if not isinstance(name, str):
        raise VTPruneError(f"method must be a registered name or a vtprune Method instance, got {type(name).__name__}")
    cls = get(name)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise VTPruneError(f"{cls.name} has no parameter {', '.join(map(repr, unknown))}; its parameters are: {', '.join(names)}")
    return cls(**params)


@dataclass
class MethodInfo:
    name: str
    summary: str
    params: dict[str, Any]
    official: bool
    families: tuple[str, ...]

    def __str__(self) -> str:
        ps = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.name:10s} {self.summary}\n{'':10s} params: {ps}"


class MethodList(list):
    def __str__(self) -> str:
        return "\n".join(str(m) for m in self)

    def names(self) -> list[str]:
        return [m.name for m in self]


def methods() -> MethodList:
    """Every registered method: name, one line of doc, parameters with their defaults, whether
    `official=True` is available, and the model families it supports."""
    _load_builtin()
    out = MethodList()
    for name in sorted(_REGISTRY):
        cls = _REGISTRY[name]
        params = {}
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            params[f.name] = default
        out.append(MethodInfo(name, cls.summary, params, cls.has_official, cls.families))
    return out
