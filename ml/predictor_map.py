"""The live map from (symbol, kind) to a loaded, warmed predictor.

The only state the event loop and the training scheduler both touch. ``swap``
replaces one reference under a ``threading.Lock``; ``snapshot`` returns an
immutable mapping for one symbol, so a bar is decided by one consistent set of
models even while another thread swaps.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from types import MappingProxyType

from strategy.baseline import Predictor


class PredictorMap:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_symbol: dict[str, Mapping[str, Predictor]] = {}

    def snapshot(self, symbol: str) -> Mapping[str, Predictor]:
        with self._lock:
            return self._by_symbol.get(symbol, MappingProxyType({}))

    def swap(self, symbol: str, kind: str, predictor: Predictor | None) -> Predictor | None:
        """Install ``predictor`` for (symbol, kind) (None removes it); return the old one."""
        with self._lock:
            current = dict(self._by_symbol.get(symbol, {}))
            old = current.pop(kind, None)
            if predictor is not None:
                current[kind] = predictor
            # A new frozen mapping each time: snapshots already handed out never change.
            self._by_symbol[symbol] = MappingProxyType(current)
            return old

    def versions(self) -> dict[str, dict[str, str]]:
        with self._lock:
            return {
                symbol: {kind: p.version for kind, p in models.items()}
                for symbol, models in self._by_symbol.items()
            }
