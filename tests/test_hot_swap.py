"""Hot swap: predictions hammered from the loop while another thread swaps models.

Every bar takes one ``snapshot()`` and must be decided by exactly that set: no
model of another generation answers inside a bar, however the swaps interleave,
and every snapshot is a state the map really had (the swapper replaces kinds in
a fixed order, so a real state is "the first j kinds at generation g+1, the
rest at g").
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from ml.predictor_map import PredictorMap
from strategy.ensemble import predict_all

KINDS = ("rf", "xgb", "lstm", "mlp")
GENERATIONS = 400


@dataclass
class Gen:
    kind: str
    gen: int
    stage: str = "production"
    feature_hash: str = "h"

    @property
    def version(self) -> str:
        return f"1.0.{self.gen}"

    def predict_proba(self, row: np.ndarray) -> np.ndarray:
        time.sleep(0)  # let the swapper run in the middle of a bar
        return np.array([0.2, 0.3, 0.5])

    def observe(self, row: np.ndarray) -> None:
        """Stateless."""


def test_every_bar_is_decided_by_one_consistent_set_while_swaps_race() -> None:
    pmap = PredictorMap()
    for kind in KINDS:
        pmap.swap("EURUSD", kind, Gen(kind, 0))
    done = threading.Event()

    def swapper() -> None:
        for gen in range(1, GENERATIONS + 1):
            for kind in KINDS:
                pmap.swap("EURUSD", kind, Gen(kind, gen))
                time.sleep(0)
        done.set()

    thread = threading.Thread(target=swapper)
    thread.start()
    row = np.zeros(3, dtype=np.float32)
    bars = 0
    mid_bar_swaps = 0
    seen_generations: set[int] = set()
    try:
        while not done.is_set() or bars < 50:
            swaps_before = pmap.swaps
            snap = pmap.snapshot("EURUSD")
            taken = {k: p.version for k, p in snap.items()}
            result = predict_all(snap, row, {}, time.perf_counter_ns, "h")
            answered = {o.kind: o.version for o in result.outputs}
            # The bar was decided by exactly the snapshot it took...
            assert answered == taken
            # ...which never changes once handed out...
            assert {k: p.version for k, p in snap.items()} == taken
            # ...and is a state the map really had.
            gens = [int(taken[k].rsplit(".", 1)[1]) for k in KINDS]
            low = min(gens)
            j = sum(1 for g in gens if g == low + 1)
            assert gens == [low + 1] * j + [low] * (len(KINDS) - j), gens
            seen_generations.add(low)
            mid_bar_swaps += pmap.swaps != swaps_before
            bars += 1
    finally:
        thread.join(30)
    assert not thread.is_alive()
    # The race really happened: swaps landed while bars were being decided.
    assert mid_bar_swaps > 10 and len(seen_generations) > 10
    assert pmap.versions()["EURUSD"] == dict.fromkeys(KINDS, f"1.0.{GENERATIONS}")
