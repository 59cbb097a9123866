"""Shared set-up of the MT5 adapter tests: the fake module on sys.path, a broker on it."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

FAKES = Path(__file__).resolve().parent / "fakes"
if str(FAKES) not in sys.path:
    sys.path.insert(0, str(FAKES))

import MetaTrader5 as mt5  # noqa: E402
from MetaTrader5 import _core  # noqa: E402

from execution.mt5_client import MT5Broker, MT5Config  # noqa: E402
from utils.clock import FakeClock  # noqa: E402

MAGIC = 234000


class Events:
    """Collects the adapter's events (what the daemon writes to the journal)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, str]] = []

    def __call__(
        self, level: str, kind: str, message: str, details: Mapping[str, object] | None
    ) -> None:
        self.items.append((level, kind, message))

    def kinds(self) -> list[str]:
        return [k for _, k, _ in self.items]


def make_broker(
    clock: FakeClock,
    fake: dict[str, Any] | None = None,
    *,
    symbols: tuple[str, ...] = ("EURUSD",),
    events: Events | None = None,
    module: Any = None,
    module_factory: Any = None,
    **config: Any,
) -> MT5Broker:
    _core.terminal.reset(fake or {})
    cfg = MT5Config(magic=MAGIC, **config)
    return MT5Broker(
        cfg,
        symbols,
        clock=clock,
        timeframe_s=60,
        module=module if module is not None or module_factory is not None else mt5,
        on_event=events,
        module_factory=module_factory,
    )


class Wrapped:
    """The fake module with some of its functions replaced: a test's lever on one call."""

    def __init__(self, **overrides: Any) -> None:
        self.overrides = overrides

    def __getattr__(self, name: str) -> Any:
        override = self.overrides.get(name)
        return override if override is not None else getattr(mt5, name)


__all__ = [
    "MAGIC",
    "Events",
    "Wrapped",
    "_core",
    "assert_journal_matches_fake",
    "make_broker",
    "mt5",
]


def assert_journal_matches_fake(journal: Path, deals: list[dict[str, Any]], magic: int) -> int:
    """The journal's trades equal the fake's deal history; no client id was filled twice.

    Returns the number of trades compared.
    """
    import sqlite3

    conn = sqlite3.connect(journal)
    try:
        rows = conn.execute(
            "SELECT client_order_id, broker_position_id, volume, open_price, status, "
            "close_price, profit, commission FROM trades"
        ).fetchall()
    finally:
        conn.close()
    ins = [d for d in deals if d["entry"] == 0 and d["magic"] == magic]
    comments = [d["comment"] for d in ins]
    assert len(comments) == len(set(comments)), "a client order id was filled twice"
    by_position = {d["position_id"]: d for d in ins}
    assert sorted(r[1] for r in rows) == sorted(by_position), "journal trades != broker fills"
    for coid, pid, volume, open_price, status, close_price, profit, commission in rows:
        opening = by_position[pid]
        assert opening["comment"] == coid
        assert volume == opening["volume"] and open_price == opening["price"]
        outs = [d for d in deals if d["position_id"] == pid and d["entry"] != 0]
        if status == "open":
            assert outs == [], f"{coid} closed at the broker but open in the journal"
            continue
        assert outs, f"{coid} closed in the journal but open at the broker"
        out_volume = sum(d["volume"] for d in outs)
        assert abs(out_volume - volume) < 1e-9
        vwap = sum(d["price"] * d["volume"] for d in outs) / out_volume
        assert abs(close_price - vwap) < 1e-9
        assert abs(profit - sum(d["profit"] for d in outs)) < 1e-6
        expected_commission = opening["commission"] + sum(d["commission"] for d in outs)
        assert abs(commission - expected_commission) < 1e-6
    return len(rows)
