"""A stand-in for `streamer.engine.Engine` with exactly the surface observability reads."""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from streamer.engine import EngineStats
from streamer.errors import StateError


class FakeRegistry:
    def __init__(self, entities: int = 5, capacity: int = 64, max_entities: int = 1000) -> None:
        self.entities, self.capacity, self.max_entities = entities, capacity, max_entities

    def __len__(self) -> int:
        return self.entities


class FakeStore:
    def __init__(self, latest: dict[str, bytes] | None = None, *, broken: bool = False) -> None:
        self.latest = latest or {}
        self.broken = broken

    def get_latest(self, entity: str) -> bytes | None:
        if self.broken:
            raise StateError("redis at redis://127.0.0.1:1/0 is unreachable")
        return self.latest.get(entity)


class FakeIO:
    def __init__(self, lag: int | None = 7) -> None:
        self._lag = lag
        self.calls = 0

    def lag(self) -> int | None:
        self.calls += 1
        return self._lag


class FakeEngine:
    def __init__(self, *, partitions: tuple[int, ...] = (0, 1), store: Any = None) -> None:
        self.stats = EngineStats()
        self.core = SimpleNamespace(registry=FakeRegistry())
        self.weights_version = 3
        self.io = FakeIO()
        self.store = store if store is not None else FakeStore()
        self._tokens = {p: 1 for p in partitions}
        self._stop = threading.Event()
        self.on_step: Callable[[Any], None] | None = None
