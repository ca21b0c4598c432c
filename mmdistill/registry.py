"""Registries by name: objectives, adapters, tasks.

The name used in YAML (`type: opd`) is the registry name.  Registration is a
decorator; `mmdistill list` prints every registry.

    mmdistill list
"""
from __future__ import annotations

from typing import Any, Callable


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

_loaded = False


def _load_builtins() -> None:
    """Import the modules whose decorators fill the registries (once)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib

    for mod in (
        "mmdistill.objectives.registered",
        "mmdistill.objectives.registered_text",
        "mmdistill.objectives.registered_guided",
        "mmdistill.modalities.text.adapter",
        "mmdistill.modalities.text.registered_tasks",
        "mmdistill.modalities.text.lightning",  # Lightning OPD: teacher shards task and objective
        "mmdistill.objectives.xtoken",  # cross-tokenizer distillation
        "mmdistill.objectives.registered_flow",  # needs only torch
        "mmdistill.modalities.robot.adapter",
        "mmdistill.modalities.robot.task",
    ):
        importlib.import_module(mod)
    for mod in ("mmdistill.modalities.flow.adapter", "mmdistill.modalities.flow.task"):
        try:  # the flow extra (diffusers) may not be installed
            importlib.import_module(mod)
        except ImportError as e:
            if "diffusers" not in str(e):
                raise
