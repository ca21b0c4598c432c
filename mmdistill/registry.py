"""Registries by name: objectives, adapters, tasks, stage kinds.

The name used in YAML (`type: opd`) is the registry name.  Registration is a
decorator; `mmdistill list` prints every registry.

    mmdistill list
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def deco(obj: Any) -> Any:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = obj
            obj.registry_name = name
            return obj

        return deco

    def get(self, name: str) -> Any:
        _load_builtins()
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "(none)"
            raise KeyError(f"unknown {self.kind} '{name}'; known {self.kind}s: {known}")
        return self._entries[name]

    def names(self) -> list[str]:
        _load_builtins()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, Any]]:
        _load_builtins()
        return sorted(self._entries.items())

    def __contains__(self, name: str) -> bool:
        _load_builtins()
        return name in self._entries


OBJECTIVES = Registry("objective")
ADAPTERS = Registry("adapter")
TASKS = Registry("task")
STAGE_KINDS = Registry("stage kind")  # `stages[].kind`: run(ctx, stage) -> result dict
HARNESSES = Registry("harness")  # `mmdistill eval --harness NAME`: fn(model_dir=, tasks=, ...) -> {"table": str, ...}

_loaded = False


def _load_builtins() -> None:
    """Import the two packages whose modules register themselves (once).

    `mmdistill.objectives` and `mmdistill.modalities` each import their own modules in their
    `__init__`; the core names no module of either."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib

    importlib.import_module("mmdistill.train")  # the core stage kinds: train, eval
    importlib.import_module("mmdistill.objectives")
    importlib.import_module("mmdistill.modalities")
