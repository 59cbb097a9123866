"""Feeds of closed bars for the event loop.

``ReplayFeed`` replays history (a CSV or the synthetic market) at a configured
speed through the ``Clock``, symbols merged in time order, and can resume after
the last bar a previous run processed. ``PollingFeed`` is the live interface for
brokers that are polled for newly closed bars (MT5): it emits each new bar once,
in order, and backfills bars that closed while it was not looking.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import numpy as np
import pandas as pd
import structlog

from market_data.bars import Bar
from utils.clock import Clock

log = structlog.get_logger(__name__)

# Returns the first ``n`` bars of a symbol's history (or all there are, if fewer).
FrameSource = Callable[[int], pd.DataFrame]


@dataclass
class _Arrays:
    time_ns: np.ndarray
    ohlc: np.ndarray  # (n, 4) float64
    ints: np.ndarray  # (n, 3) int64: tick_volume, spread, real_volume

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> _Arrays:
        times = frame["time"]
        time_ns = times.dt.tz_convert("UTC").to_numpy(dtype="datetime64[ns]").astype(np.int64)
        ohlc = frame[["open", "high", "low", "close"]].to_numpy(dtype=np.float64)
        ints = frame[["tick_volume", "spread", "real_volume"]].to_numpy(dtype=np.int64)
        return cls(time_ns, ohlc, ints)

    def __len__(self) -> int:
        return len(self.time_ns)

    def bar(self, symbol: str, i: int) -> Bar:
        o, h, lo, c = self.ohlc[i]
        tv, sp, rv = self.ints[i]
        when = datetime.fromtimestamp(int(self.time_ns[i]) / 1e9, tz=UTC)
        return Bar(symbol, when, float(o), float(h), float(lo), float(c), int(tv), int(sp), int(rv))


class ReplayFeed:
    """Replays closed bars of several symbols in time order, paced by the clock.

    ``resume_after`` maps a symbol to the open time of the last bar already
    processed (from the journal): the replay continues with the next bar, and
    ``history()`` returns the ``history_bars`` bars before that point so the
    strategy can warm its features without trading them again.
    """

    def __init__(
        self,
        sources: Mapping[str, FrameSource],
        *,
        clock: Clock,
        bars_per_s: float,
        history_bars: int,
        resume_after: Mapping[str, datetime] | None = None,
        initial_rows: int = 50_000,
    ) -> None:
        self._sources = dict(sources)
        self._clock = clock
        self._bars_per_s = bars_per_s
        self._history_bars = history_bars
        self._arrays: dict[str, _Arrays] = {}
        self._cursor: dict[str, int] = {}
        self._exhausted: dict[str, bool] = {}
        resume = dict(resume_after or {})
        for symbol, source in self._sources.items():
            self._arrays[symbol] = _Arrays.from_frame(source(initial_rows))
            self._exhausted[symbol] = False
            start = history_bars
            after = resume.get(symbol)
            if after is not None:
                after_ns = int(pd.Timestamp(after).tz_convert("UTC").value)
                while True:
                    times = self._arrays[symbol].time_ns
                    start = int(np.searchsorted(times, after_ns, side="right"))
                    if start < len(times) or not self._grow(symbol):
                        break
            self._cursor[symbol] = start
            if start >= len(self._arrays[symbol]) and not self._grow(symbol):
                raise ValueError(
                    f"replay data for {symbol} has no bars after "
                    f"{after or f'the first {history_bars} history bars'}; "
                    f"it holds {len(self._arrays[symbol])} bars"
                )
        self.emitted = 0

    def _grow(self, symbol: str) -> bool:
        """Ask the source for twice the rows (the synthetic market is unbounded)."""
        if self._exhausted[symbol]:
            return False
        old = self._arrays[symbol]
        bigger = _Arrays.from_frame(self._sources[symbol](max(2 * len(old), 1000)))
        if len(bigger) <= len(old):
            self._exhausted[symbol] = True
            return False
        self._arrays[symbol] = bigger
        return True

    def history(self) -> list[Bar]:
        """Bars before the replay start (oldest first, symbols merged by time)."""
        out: list[Bar] = []
        for symbol, arrays in self._arrays.items():
            start = self._cursor[symbol]
            for i in range(max(0, start - self._history_bars), start):
                out.append(arrays.bar(symbol, i))
        out.sort(key=lambda b: (b.time, b.symbol))
        return out

    def _next_time(self, symbol: str) -> int | None:
        arrays = self._arrays[symbol]
        i = self._cursor[symbol]
        if i >= len(arrays) and not self._grow(symbol):
            return None
        return int(self._arrays[symbol].time_ns[i])

    async def bars(self) -> AsyncGenerator[Bar, None]:
        """Closed bars in time order; bars of one timestamp come together."""
        interval = 1.0 / self._bars_per_s if self._bars_per_s > 0 else 0.0
        started = self._clock.monotonic()
        steps = 0
        while True:
            heads = {s: t for s in self._arrays if (t := self._next_time(s)) is not None}
            if not heads:
                log.info("replay_finished", bars=self.emitted)
                return
            now_ns = min(heads.values())
            if interval > 0:
                delay = started + steps * interval - self._clock.monotonic()
                if delay > 0:
                    await self._clock.sleep(delay)
            steps += 1
            for symbol in sorted(s for s, t in heads.items() if t == now_ns):
                i = self._cursor[symbol]
                self._cursor[symbol] = i + 1
                self.emitted += 1
                yield self._arrays[symbol].bar(symbol, i)


class ClosedBarSource(Protocol):
    """A broker that can be polled for closed bars (MT5's ``copy_rates_from_pos``)."""

    async def closed_bars(self, symbol: str, count: int) -> Sequence[Bar]:
        """The latest ``count`` closed bars of ``symbol``, oldest first."""
        ...


class PollingFeed:
    """Polls a broker for newly closed bars and emits each exactly once, in order.

    After a stall (terminal busy, connection lost) the next poll asks for enough
    bars to cover the gap, so bars that closed meanwhile are backfilled; bars the
    broker does not have (no ticks, or beyond ``max_backfill``) are counted in
    ``missed``.
    """

    def __init__(
        self,
        source: ClosedBarSource,
        symbols: Sequence[str],
        *,
        clock: Clock,
        timeframe_s: int,
        poll_interval_s: float = 1.0,
        max_backfill: int = 500,
        last_seen: Mapping[str, datetime] | None = None,
    ) -> None:
        self._source = source
        self._symbols = list(symbols)
        self._clock = clock
        self._timeframe_s = timeframe_s
        self._poll_interval_s = poll_interval_s
        self._max_backfill = max_backfill
        self._last: dict[str, datetime | None] = {s: None for s in symbols}
        self._last.update(last_seen or {})
        self.missed = 0
        self.last_bar_monotonic: float | None = None

    async def poll_once(self) -> list[Bar]:
        out: list[Bar] = []
        for symbol in self._symbols:
            last = self._last[symbol]
            if last is None:
                count = 1
            else:
                elapsed = (self._clock.now() - last).total_seconds()
                count = int(min(self._max_backfill, max(2, elapsed // self._timeframe_s + 2)))
            bars = [
                b
                for b in await self._source.closed_bars(symbol, count)
                if last is None or b.time > last
            ]
            if last is not None and bars:
                # A gap the broker has bars for is backfilled; bars it lacks are counted.
                previous = last
                gap = 0
                for bar in bars:
                    gap += max(
                        0, int((bar.time - previous).total_seconds() // self._timeframe_s) - 1
                    )
                    previous = bar.time
                if gap:
                    self.missed += gap
                    log.warning("bars_missed", symbol=symbol, missed=gap, after=str(last))
            if bars:
                self._last[symbol] = bars[-1].time
                self.last_bar_monotonic = self._clock.monotonic()
            out.extend(bars)
        out.sort(key=lambda b: (b.time, b.symbol))
        return out

    async def bars(self) -> AsyncGenerator[Bar, None]:
        while True:
            for bar in await self.poll_once():
                yield bar
            await self._clock.sleep(self._poll_interval_s)
