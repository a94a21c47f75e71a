"""Name -> class registries for everything a config chooses (schedules, processes, samplers, backends...).

    SCHEDULES = Registry("diffusion.schedule")

    @SCHEDULES.register("cosine")
    class CosineSchedule: ...

    SCHEDULES.get("cosine")  # -> CosineSchedule; an unknown name raises ConfigError listing the valid ones
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class ConfigError(ValueError):
    """A user error in a config or a command line: the message says what was wrong and what to do."""


class Registry:
    def __init__(self, what: str):
        self.what = what  # the config key this registry serves, for error messages
        self._items: dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def deco(obj: Any) -> Any:
            if name in self._items:
                raise KeyError(f"{self.what}: '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> Any:
        if name not in self._items:
            raise ConfigError(f"{self.what}: unknown name '{name}'; valid choices: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
