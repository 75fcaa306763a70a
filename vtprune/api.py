"""The public entry points: `patch`, `pruned`, `unpatch`."""

from __future__ import annotations

import contextlib

import torch

from . import registry
from .errors import UnsupportedModelError
from .pruner import _ATTR, Pruner


def _adapter(model):
    from .patches.llava import LlavaAdapter, check_supported
    from .patches.llava_next import LlavaNextAdapter
    from .patches.tower import tower_adapter

    if isinstance(model, torch.nn.Module) and type(model).__name__ != "OptimizedModule":
        tower = tower_adapter(model)
        if tower is not None:
            return tower
    family = check_supported(model)
    return LlavaNextAdapter(model) if family == "llava_next" else LlavaAdapter(model)


def _pruner_class(adapter):
    from .patches.tower import BareTowerAdapter, _tower_pruner_class

    return _tower_pruner_class() if isinstance(adapter, BareTowerAdapter) else Pruner


def patch(model, method: str = "none", **params) -> Pruner:
    """Prune the visual tokens of `model` (an HF LLaVA-1.5 or LLaVA-NeXT instance) with `method`.

        pruner = vtprune.patch(model, "vtc-cls", keep=64)
        out = model.generate(**inputs)      # as usual; pruner.last describes what reached the LLM
        pruner.unpatch()                    # the model is exactly as before

    Only this instance changes (hooks on its modules, instance attributes); patching a patched
    model replaces the previous method. Parameters: `keep` or `keep_ratio`, `official`,
    `position_mode`, plus the method's own (see `vtprune.methods()`).
    """
    m = registry.build(method, **params)  # validates before anything is touched
    adapter = _adapter(model)
    m.check_model(adapter.family, 1)
    m.cls_layers(adapter.tower.num_layers, adapter.feature_layer())  # validates layer indices for this tower
    previous = model.__dict__.get(_ATTR)
    if previous is not None:
        previous.unpatch()
    pruner = _pruner_class(adapter)(model, m, adapter)
    pruner._install()
    return pruner


@contextlib.contextmanager
def pruned(model, method: str = "none", **params):
    """Scoped form of `patch`: the model is restored when the block exits (also on error)."""
    pruner = patch(model, method, **params)
    try:
        yield pruner
    finally:
        pruner.unpatch()


def unpatch(model) -> bool:
    """Remove vtprune from `model` if it is patched; returns whether it was."""
    pruner = model.__dict__.get(_ATTR) if hasattr(model, "__dict__") else None
    if pruner is None:
        return False
    pruner.unpatch()
    return True


def get_pruner(model) -> Pruner | None:
    """The active Pruner of a model, or None."""
    return model.__dict__.get(_ATTR)


__all__ = ["patch", "pruned", "unpatch", "get_pruner", "UnsupportedModelError"]
