"""The live map from (symbol, kind) to a loaded, warmed predictor.

The only state the event loop and the training scheduler both touch. ``swap``
replaces one reference under a ``threading.Lock``; ``snapshot`` returns an
immutable mapping for one symbol, so a bar is decided by one consistent set of
models even while another thread swaps.

Beside the serving set, each symbol has a shadow set: a candidate on trial
(stage ``shadow``) or, after a promotion, the model it replaced (stage
``previous``) kept predicting for the rollback watch. Shadow predictors answer
after the bar's decision is sent and are journaled, never traded.
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
        self._shadow: dict[str, Mapping[str, Predictor]] = {}
        self.swaps = 0

    def snapshot(self, symbol: str) -> Mapping[str, Predictor]:
        with self._lock:
            return self._by_symbol.get(symbol, MappingProxyType({}))

    def swap(self, symbol: str, kind: str, predictor: Predictor | None) -> Predictor | None:
        """Install ``predictor`` for (symbol, kind) (None removes it); return the old one."""
        return self._swap(self._by_symbol, symbol, kind, predictor)

    def shadow_snapshot(self, symbol: str) -> Mapping[str, Predictor]:
        with self._lock:
            return self._shadow.get(symbol, MappingProxyType({}))

    def swap_shadow(self, symbol: str, kind: str, predictor: Predictor | None) -> Predictor | None:
        """Put ``predictor`` in (symbol, kind)'s shadow slot (None empties it)."""
        return self._swap(self._shadow, symbol, kind, predictor)

    def _swap(
        self,
        table: dict[str, Mapping[str, Predictor]],
        symbol: str,
        kind: str,
        predictor: Predictor | None,
    ) -> Predictor | None:
        with self._lock:
            current = dict(table.get(symbol, {}))
            old = current.pop(kind, None)
            if predictor is not None:
                current[kind] = predictor
            # A new frozen mapping each time: snapshots already handed out never change.
            table[symbol] = MappingProxyType(current)
            self.swaps += 1
            return old

    def versions(self) -> dict[str, dict[str, str]]:
        with self._lock:
            return {
                symbol: {kind: p.version for kind, p in models.items()}
                for symbol, models in self._by_symbol.items()
            }

    def shadow_versions(self) -> dict[str, dict[str, str]]:
        with self._lock:
            return {
                symbol: {kind: f"{p.version} ({p.stage})" for kind, p in models.items()}
                for symbol, models in self._shadow.items()
                if models
            }
