"""Reconciliation, history, the live feed and the duplicate-order invariant under faults."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from execution.broker import OrderRequest, Side
from execution.mt5_client import MT5Broker, reconcile_with_journal
from market_data.mt5_feed import LiveFeed, fetch_history
from strategy.scalper import client_order_id
from tests.mt5_fixtures import MAGIC, _core, assert_journal_matches_fake, make_broker, mt5
from utils.clock import FakeClock
from utils.trade_journal import Journal, TradeClose, TradeOpen

START = datetime(2024, 3, 4, 10, 0, tzinfo=UTC)


def journal_at(path: Path, clock: FakeClock) -> Journal:
    journal = Journal(path, clock=clock)
    journal.open()
    return journal


async def open_and_journal(
    broker: MT5Broker, journal: Journal, coid: str, side: Side, sl: float, tp: float
) -> None:
    result = await broker.market_order(OrderRequest(coid, "EURUSD", side, 0.1, sl, tp))
    if not result.ok:
        return
    await journal.open_trade(
        TradeOpen(
            client_order_id=coid,
            symbol="EURUSD",
            side=side.value,
            volume=result.volume,
            open_time=result.time or START,
            open_price=float(result.price or 0.0),
            sl=sl,
            tp=tp,
            broker_position_id=result.position_id,
            commission=result.commission,
            confidence=None,
            model_set="test",
            mode="live",
        )
    )


async def journal_closes(broker: MT5Broker, journal: Journal) -> None:
    for deal in await broker.drain_closed_deals():
        await journal.close_trade(
            TradeClose(
                client_order_id=deal.client_order_id,
                close_time=deal.time,
                close_price=deal.price,
                close_reason=deal.reason.value,
                profit=deal.profit,
                commission=deal.commission,
                swap=deal.swap,
                bars_held=None,
            )
        )


def test_positions_closed_while_disconnected_are_closed_from_history(tmp_path: Path) -> None:
    async def go() -> None:
        clock = FakeClock(START)
        broker = make_broker(clock, {"account": {"commission_per_lot": 3.5}})
        journal = journal_at(tmp_path / "j.sqlite3", clock)
        broker.on_connected = lambda: reconcile_with_journal(broker, journal)  # type: ignore[assignment,return-value]
        await broker.connect()
        bid, ask = _core.terminal.quote("EURUSD")
        await open_and_journal(broker, journal, "A" * 16, Side.BUY, bid - 0.0008, bid + 0.0008)
        await open_and_journal(broker, journal, "B" * 16, Side.SELL, ask + 0.0008, ask - 0.0008)
        await open_and_journal(broker, journal, "C" * 16, Side.BUY, bid - 0.05, bid + 0.05)
        # The link drops; while we are away the market hits both tight SL/TPs.
        _core.terminal.faults["disconnect_after"] = 0
        _core.terminal.advance(4 * 3600)
        await broker.positions()  # notices the drop, reconnects, reconciles
        assert broker.reconnects == 1
        rows = dict(
            journal.call(
                lambda c: c.execute("SELECT client_order_id, status FROM trades").fetchall()
            )
        )
        assert rows == {"A" * 16: "closed", "B" * 16: "closed", "C" * 16: "open"}
        assert await broker.drain_closed_deals() == []  # not reported a second time
        await journal.flush()
        assert_journal_matches_fake(tmp_path / "j.sqlite3", _core.terminal.deals, MAGIC)
        journal.close()

    asyncio.run(go())


def test_a_position_the_journal_lacks_is_adopted(tmp_path: Path) -> None:
    async def go() -> None:
        clock = FakeClock(START)
        broker = make_broker(clock)
        journal = journal_at(tmp_path / "j.sqlite3", clock)
        await broker.connect()
        # Filled, then the process died before the journal write.
        await broker.market_order(OrderRequest("D" * 16, "EURUSD", Side.BUY, 0.2))
        report = await reconcile_with_journal(broker, journal)
        assert report.adopted == ["D" * 16]
        await journal.flush()
        assert_journal_matches_fake(tmp_path / "j.sqlite3", _core.terminal.deals, MAGIC)
        again = await reconcile_with_journal(broker, journal)
        assert again.adopted == [] and again.kept == ["D" * 16]
        journal.close()

    asyncio.run(go())


def test_history_is_fetched_in_chunks_below_maxbars_and_cached(tmp_path: Path) -> None:
    async def go() -> None:
        clock = FakeClock(START)
        fake = {"maxbars": 2000, "server_timezone": "Europe/Athens"}
        broker = make_broker(clock, fake, server_timezone="Europe/Athens")
        await broker.connect()
        calls_before = _core.terminal.calls.get("copy_rates_from", 0)
        frame = await fetch_history(broker, "EURUSD", 5000, cache_dir=tmp_path)
        calls = _core.terminal.calls["copy_rates_from"] - calls_before
        assert calls == 3  # 1999 + 1999 + 1003 bars, never a request above maxbars
        assert len(frame) == 5000
        times = frame["time"]
        assert times.iloc[-1] == START - timedelta(minutes=1)  # the last closed bar, in UTC
        assert (times.diff().dropna() == timedelta(minutes=1)).all()
        # The same bars as the terminal's, converted from server time (UTC+2 in March).
        mt5.symbol_select("EURUSD", True)
        server_start = int(START.timestamp()) + 7200
        raw = mt5.copy_rates_from("EURUSD", mt5.TIMEFRAME_M1, server_start - 60, 10)
        assert np.allclose(frame["close"].to_numpy()[-10:], raw["close"])
        # A restart ten minutes later asks only for what is new.
        _core.terminal.advance(600)
        before = _core.terminal.calls["copy_rates_from"]
        again = await fetch_history(broker, "EURUSD", 5000, cache_dir=tmp_path)
        assert _core.terminal.calls["copy_rates_from"] - before == 1
        assert again["time"].iloc[-1] == START + timedelta(minutes=9)
        assert len(again) == 5000

    asyncio.run(go())


def test_live_feed_emits_closed_bars_once_and_backfills_after_a_stall() -> None:
    async def go() -> None:
        clock = FakeClock(START)
        broker = make_broker(clock)
        await broker.connect()
        history = await broker.closed_bars("EURUSD", 5)
        feed = LiveFeed(broker, ["EURUSD"], clock=clock, timeframe_s=60, history=history)
        assert await feed.poll_once() == []  # the forming bar is not emitted
        _core.terminal.advance(60)
        clock.advance(60)
        (bar,) = await feed.poll_once()
        assert bar.time == START
        # A stall: ten minutes pass with the link down.
        _core.terminal.faults["disconnect_after"] = 0
        _core.terminal.advance(600)
        clock.advance(600)
        bars = await feed.poll_once()
        assert [b.time for b in bars] == [START + timedelta(minutes=m) for m in range(1, 11)]
        assert feed.missed == 0 and broker.reconnects == 1

    asyncio.run(go())


@pytest.mark.parametrize("margin_mode", ["hedging", "netting"])
def test_no_order_is_sent_twice_under_random_faults(tmp_path: Path, margin_mode: str) -> None:
    """A long run with requotes, rejects, lost requests and results, timeouts, disconnects."""
    faults = {
        "random": {
            "seed": 11,
            "requote": 0.1,
            "reject": 0.05,
            "too_many": 0.05,
            "lost_request": 0.05,
            "lost_result": 0.08,
            "timeout_executed": 0.05,
            "disconnect_per_call": 0.01,
        }
    }
    fake: dict[str, Any] = {
        "faults": faults,
        "account": {"commission_per_lot": 3.5, "margin_mode": margin_mode},
    }

    async def go() -> None:
        clock = FakeClock(START)
        broker = make_broker(clock, fake)
        journal = journal_at(tmp_path / "j.sqlite3", clock)

        async def reconcile() -> None:
            await reconcile_with_journal(broker, journal)

        broker.on_connected = reconcile
        await broker.connect()
        rng = random.Random(5)
        for step in range(300):
            _core.terminal.advance(60)
            clock.advance(60)
            await journal_closes(broker, journal)
            when = START + timedelta(minutes=step)
            positions = await broker.positions()
            if positions and rng.random() < 0.3:
                pos = positions[0]
                coid = client_order_id("live", "EURUSD", f"close{pos.position_id}", when)
                result = await broker.close_position(pos, coid)
                if result.ok:
                    await journal.close_trade(
                        TradeClose(
                            pos.client_order_id,
                            result.time or when,
                            float(result.price or 0),
                            "client",
                            result.profit,
                            result.commission,
                            result.swap,
                            None,
                        )
                    )
            elif not positions and rng.random() < 0.5:
                bid, ask = _core.terminal.quote("EURUSD")
                side = Side.BUY if rng.random() < 0.5 else Side.SELL
                ref = bid if side is Side.BUY else ask
                sl, tp = ref - side.sign * 0.0010, ref + side.sign * 0.0010
                coid = client_order_id("live", "EURUSD", "open", when)
                for _ in range(2):  # the same decision twice: the second must not send
                    await open_and_journal(broker, journal, coid, side, round(sl, 5), round(tp, 5))
        await journal_closes(broker, journal)
        await journal.flush()
        assert broker.reconnects > 0
        compared = assert_journal_matches_fake(tmp_path / "j.sqlite3", _core.terminal.deals, MAGIC)
        assert compared >= 20
        assert _core.terminal.concurrent_calls == 0
        journal.close()

    asyncio.run(go())
    conn = sqlite3.connect(tmp_path / "j.sqlite3")
    try:
        closed = conn.execute("SELECT count(*) FROM trades WHERE status='closed'").fetchone()[0]
    finally:
        conn.close()
    assert closed >= 10
