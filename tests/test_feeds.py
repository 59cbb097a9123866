"""Replay and polling feeds: order, pacing through the clock, resume, backfill."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from market_data.bars import Bar
from market_data.feeds import PollingFeed, ReplayFeed
from utils.clock import FakeClock

T0 = datetime(2024, 1, 2, 9, 0, tzinfo=UTC)


def frame(n: int, start: datetime = T0, step_s: int = 60, price: float = 1.1) -> pd.DataFrame:
    times = pd.date_range(start, periods=n, freq=f"{step_s}s", tz="UTC")
    closes = [price + i * 1e-5 for i in range(n)]
    return pd.DataFrame(
        {
            "time": times,
            "open": closes,
            "high": [c + 2e-5 for c in closes],
            "low": [c - 2e-5 for c in closes],
            "close": closes,
            "tick_volume": [10] * n,
            "spread": [5] * n,
            "real_volume": [0] * n,
        }
    )


async def collect(feed: ReplayFeed, limit: int | None = None) -> list[Bar]:
    out: list[Bar] = []
    async for bar in feed.bars():
        out.append(bar)
        if limit is not None and len(out) >= limit:
            break
    return out


def test_replay_merges_symbols_in_time_order_after_history() -> None:
    clock = FakeClock(T0)
    a = frame(10)
    b = frame(10, start=T0 + timedelta(seconds=30))
    feed = ReplayFeed(
        {"AAA": lambda: iter([a]), "BBB": lambda: iter([b])},
        clock=clock,
        bars_per_s=0,
        history_bars=3,
    )
    history = feed.history()
    assert [(h.symbol, h.time) for h in history][:2] == [
        ("AAA", T0),
        ("BBB", T0 + timedelta(seconds=30)),
    ]
    assert len(history) == 6
    bars = asyncio.run(collect(feed))
    assert len(bars) == 14
    times = [b.time for b in bars]
    assert times == sorted(times)
    assert bars[0].symbol == "AAA" and bars[0].time == T0 + timedelta(minutes=3)


def test_replay_paces_bars_through_the_clock() -> None:
    clock = FakeClock(T0)
    feed = ReplayFeed({"AAA": lambda: iter([frame(12)])}, clock=clock, bars_per_s=4, history_bars=2)
    bars = asyncio.run(collect(feed))
    assert len(bars) == 10
    # 10 bars at 4 bars/s: the last one is due 9 intervals after the first.
    assert clock.monotonic() == pytest.approx(9 / 4)


def test_replay_resumes_after_the_last_processed_bar() -> None:
    clock = FakeClock(T0)
    data = frame(20)
    resume = {"AAA": T0 + timedelta(minutes=11)}
    feed = ReplayFeed(
        {"AAA": lambda: iter([data])},
        clock=clock,
        bars_per_s=0,
        history_bars=5,
        resume_after=resume,
    )
    history = feed.history()
    assert history[-1].time == T0 + timedelta(minutes=11)
    assert len(history) == 5
    bars = asyncio.run(collect(feed))
    assert bars[0].time == T0 + timedelta(minutes=12)
    assert len(bars) == 8


def test_replay_streams_chunks_and_resumes_across_chunk_boundaries() -> None:
    chunks = [frame(40, start=T0 + timedelta(minutes=40 * k)) for k in range(10)]
    pulled: list[int] = []

    def source() -> Iterator[pd.DataFrame]:
        for k, chunk in enumerate(chunks):
            pulled.append(k)
            yield chunk

    feed = ReplayFeed({"AAA": source}, clock=FakeClock(T0), bars_per_s=0, history_bars=50)
    history = feed.history()
    assert [b.time for b in history] == [T0 + timedelta(minutes=i) for i in range(50)]
    assert pulled == [0, 1]  # only what the history needed
    bars = asyncio.run(collect(feed, limit=100))
    assert [b.time for b in bars] == [T0 + timedelta(minutes=50 + i) for i in range(100)]
    assert pulled == [0, 1, 2, 3]
    # Resume inside the 5th chunk: history spans the chunk boundary.
    resume = {"AAA": T0 + timedelta(minutes=165)}
    again = ReplayFeed(
        {"AAA": source}, clock=FakeClock(T0), bars_per_s=0, history_bars=10, resume_after=resume
    )
    assert [b.time.minute for b in again.history()] == [
        (T0 + timedelta(minutes=156 + i)).minute for i in range(10)
    ]
    first = asyncio.run(collect(again, limit=1))[0]
    assert first.time == T0 + timedelta(minutes=166)


def test_replay_yields_to_the_loop_between_bars_even_at_full_speed() -> None:
    data = frame(300)

    async def scenario() -> tuple[int, int]:
        feed = ReplayFeed(
            {"AAA": lambda: iter([data])}, clock=FakeClock(T0), bars_per_s=0, history_bars=5
        )
        ticks = 0
        stop = asyncio.Event()

        async def other() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(other())
        n = 0
        async for _ in feed.bars():  # the consumer itself never awaits anything
            n += 1
        stop.set()
        await task
        return n, ticks

    n, ticks = asyncio.run(scenario())
    assert n == 295
    assert ticks >= 290


def test_replay_refuses_resume_point_past_the_data() -> None:
    data = frame(10)
    with pytest.raises(ValueError, match="no bars after"):
        ReplayFeed(
            {"AAA": lambda: iter([data])},
            clock=FakeClock(T0),
            bars_per_s=0,
            history_bars=2,
            resume_after={"AAA": T0 + timedelta(days=1)},
        )


class FakeBroker:
    def __init__(self, bars: list[Bar]) -> None:
        self.bars = bars
        self.visible = 0
        self.requests: list[int] = []

    async def closed_bars(self, symbol: str, count: int) -> Sequence[Bar]:
        self.requests.append(count)
        upto = self.bars[: self.visible]
        return upto[-count:]


def make_bars(n: int, skip: set[int] | None = None) -> list[Bar]:
    return [
        Bar("AAA", T0 + timedelta(minutes=i), 1.0, 1.0, 1.0, 1.0, 1, 1, 0)
        for i in range(n)
        if i not in (skip or set())
    ]


def test_polling_feed_emits_each_bar_once_and_backfills_after_a_stall() -> None:
    clock = FakeClock(T0)
    broker = FakeBroker(make_bars(30))
    feed = PollingFeed(broker, ["AAA"], clock=clock, timeframe_s=60)
    broker.visible = 3
    first = asyncio.run(feed.poll_once())
    assert [b.time for b in first] == [T0 + timedelta(minutes=2)]
    # Nothing new: nothing emitted.
    assert asyncio.run(feed.poll_once()) == []
    # A 10-minute stall: every bar that closed meanwhile comes, in order, once.
    clock.advance(600)
    broker.visible = 13
    burst = asyncio.run(feed.poll_once())
    assert [b.time for b in burst] == [T0 + timedelta(minutes=i) for i in range(3, 13)]
    assert feed.missed == 0
    assert broker.requests[-1] >= 10


def test_polling_feed_counts_bars_the_broker_lacks() -> None:
    clock = FakeClock(T0)
    broker = FakeBroker(make_bars(10, skip={4, 5}))
    feed = PollingFeed(broker, ["AAA"], clock=clock, timeframe_s=60)
    broker.visible = 3  # minutes 0, 1, 2
    asyncio.run(feed.poll_once())
    clock.advance(420)
    broker.visible = 8  # up to minute 9 with 4 and 5 missing
    bars = asyncio.run(feed.poll_once())
    assert [b.time.minute for b in bars] == [3, 6, 7, 8, 9]
    assert feed.missed == 2
