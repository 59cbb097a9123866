"""Feeds of closed bars for the event loop.

``ReplayFeed`` replays history (a CSV or the synthetic market) at a configured
speed through the ``Clock``, symbols merged in time order, and can resume after
the last bar a previous run processed. ``PollingFeed`` is the live interface for
brokers that are polled for newly closed bars (MT5): it emits each new bar once,
in order, and backfills bars that closed while it was not looking.

Both keep a :class:`FeedHealth`: when the newest bar came (clock time), how long
the feed has been silent, the longest silence, and the bars backfilled after a
stall or missed for good; the health check's "feed fresh" rule reads it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import numpy as np
import pandas as pd
import structlog

from market_data.bars import Bar
from utils.clock import Clock

log = structlog.get_logger(__name__)


@dataclass
class FeedHealth:
    """How fresh a feed is: what a health check and ``status`` need to see a stall.

    Times are the feed clock's: ``last_bar_monotonic`` (``clock.monotonic()``) and
    ``last_bar_wall_time`` (``clock.now()``) when the newest bar was emitted,
    ``last_bar_time`` that bar's market (open) time.
    """

    started_monotonic: float | None = None
    last_bar_monotonic: float | None = None
    last_bar_wall_time: datetime | None = None
    last_bar_time: datetime | None = None
    bars: int = 0
    missed: int = 0  # bars the source never delivered: counted, never invented
    backfilled: int = 0  # bars delivered late, in a burst after a stall
    longest_gap_s: float = 0.0  # longest silence between two deliveries (clock seconds)

    def stalled_for_s(self, now_monotonic: float) -> float | None:
        """Seconds since the newest bar (since the start when none came); None before start."""
        ref = self.last_bar_monotonic
        if ref is None:
            ref = self.started_monotonic
        return None if ref is None else max(0.0, now_monotonic - ref)

    def started(self, clock: Clock) -> None:
        if self.started_monotonic is None:
            self.started_monotonic = clock.monotonic()

    def delivered(self, bars: Sequence[Bar], clock: Clock) -> None:
        """Record one delivery (a bar, or a burst of bars that came together)."""
        if not bars:
            return
        now = clock.monotonic()
        silent = self.stalled_for_s(now)
        if silent is not None:
            self.longest_gap_s = max(self.longest_gap_s, silent)
        self.last_bar_monotonic = now
        self.last_bar_wall_time = clock.now()
        newest = max(b.time for b in bars)
        if self.last_bar_time is None or newest > self.last_bar_time:
            self.last_bar_time = newest
        self.bars += len(bars)


# Yields a symbol's history as successive frames (canonical columns, time ordered):
# one frame for a file, endless chunks for the synthetic market.
FrameSource = Callable[[], Iterator[pd.DataFrame]]


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

    @classmethod
    def empty(cls) -> _Arrays:
        return cls(np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros((0, 3), np.int64))

    def __add__(self, other: _Arrays) -> _Arrays:
        return _Arrays(
            np.concatenate([self.time_ns, other.time_ns]),
            np.concatenate([self.ohlc, other.ohlc]),
            np.concatenate([self.ints, other.ints]),
        )

    def __len__(self) -> int:
        return len(self.time_ns)

    def bar(self, symbol: str, i: int) -> Bar:
        o, h, lo, c = self.ohlc[i]
        tv, sp, rv = self.ints[i]
        when = datetime.fromtimestamp(int(self.time_ns[i]) / 1e9, tz=UTC)
        return Bar(symbol, when, float(o), float(h), float(lo), float(c), int(tv), int(sp), int(rv))


class _Stream:
    """One symbol's bars, holding at most two frames (history + current) in memory."""

    def __init__(self, symbol: str, frames: Iterator[pd.DataFrame]) -> None:
        self.symbol = symbol
        self._frames = frames
        self.arrays = _Arrays.empty()
        self.cursor = 0

    def _next_frame(self) -> _Arrays | None:
        for frame in self._frames:
            if len(frame):
                return _Arrays.from_frame(frame)
        return None

    def seek(self, *, after_ns: int | None, skip_rows: int, history_bars: int) -> list[Bar]:
        """Position at the first bar after ``after_ns`` (or after ``skip_rows`` rows).

        Returns up to ``history_bars`` bars before that point (warm-up history).
        """
        previous = _Arrays.empty()
        current = self._next_frame() or _Arrays.empty()
        seen = 0  # rows in frames before ``current``
        while True:
            if after_ns is None:
                idx = skip_rows - seen
            else:
                idx = int(np.searchsorted(current.time_ns, after_ns, side="right"))
            if 0 <= idx < len(current):
                break
            following = self._next_frame()
            if following is None:
                where = "the resume point" if after_ns is not None else f"{skip_rows} history bars"
                raise ValueError(
                    f"replay data for {self.symbol} has no bars after {where}; "
                    f"it holds {seen + len(current)} bars"
                )
            seen += len(current)
            previous, current = current, following
        self.arrays = previous + current
        self.cursor = len(previous) + idx
        first = max(0, self.cursor - history_bars)
        history = [self.arrays.bar(self.symbol, i) for i in range(first, self.cursor)]
        # Drop what was only kept for the history.
        self.arrays, self.cursor = current, idx
        return history

    def head_ns(self) -> int | None:
        if self.cursor >= len(self.arrays):
            following = self._next_frame()
            if following is None:
                return None
            self.arrays, self.cursor = following, 0
        return int(self.arrays.time_ns[self.cursor])

    def pop(self) -> Bar:
        bar = self.arrays.bar(self.symbol, self.cursor)
        self.cursor += 1
        return bar


class ReplayFeed:
    """Replays closed bars of several symbols in time order, paced by the clock.

    ``resume_after`` maps a symbol to the open time of the last bar already
    processed (from the journal): the replay continues with the next bar, and
    ``history()`` returns up to ``history_bars`` bars before that point so the
    strategy can warm its features without trading them again. Without a resume
    point the first ``history_bars`` bars are the history. Memory stays bounded
    by two frames per symbol, however long the replay runs.
    """

    def __init__(
        self,
        sources: Mapping[str, FrameSource],
        *,
        clock: Clock,
        bars_per_s: float,
        history_bars: int,
        resume_after: Mapping[str, datetime] | None = None,
    ) -> None:
        self._clock = clock
        self._bars_per_s = bars_per_s
        self._streams: dict[str, _Stream] = {}
        self._history: list[Bar] = []
        resume = dict(resume_after or {})
        for symbol, source in sources.items():
            stream = _Stream(symbol, source())
            after = resume.get(symbol)
            after_ns = None if after is None else int(pd.Timestamp(after).tz_convert("UTC").value)
            self._history += stream.seek(
                after_ns=after_ns, skip_rows=history_bars, history_bars=history_bars
            )
            self._streams[symbol] = stream
        self._history.sort(key=lambda b: (b.time, b.symbol))
        self.emitted = 0
        self.health = FeedHealth()

    def history(self) -> list[Bar]:
        """Bars before the replay start (oldest first, symbols merged by time)."""
        return list(self._history)

    async def bars(self) -> AsyncGenerator[Bar, None]:
        """Closed bars in time order; bars of one timestamp come together."""
        interval = 1.0 / self._bars_per_s if self._bars_per_s > 0 else 0.0
        started = self._clock.monotonic()
        self.health.started(self._clock)
        steps = 0
        while True:
            heads = {s: t for s, st in self._streams.items() if (t := st.head_ns()) is not None}
            if not heads:
                log.info("replay_finished", bars=self.emitted)
                return
            now_ns = min(heads.values())
            delay = started + steps * interval - self._clock.monotonic() if interval else 0.0
            # Always yield to the loop, even as fast as possible: signals and other
            # tasks must get their turn between bars.
            await self._clock.sleep(max(0.0, delay))
            steps += 1
            for symbol in sorted(s for s, t in heads.items() if t == now_ns):
                self.emitted += 1
                bar = self._streams[symbol].pop()
                self.health.delivered((bar,), self._clock)
                yield bar


class BarFeed(Protocol):
    """What the trading engine consumes: closed bars in time order (replay or live)."""

    def bars(self) -> AsyncGenerator[Bar, None]: ...


class ClosedBarSource(Protocol):
    """A broker that can be polled for closed bars (MT5's ``copy_rates_from_pos``)."""

    async def closed_bars(self, symbol: str, count: int) -> Sequence[Bar]:
        """The latest ``count`` closed bars of ``symbol``, oldest first."""
        ...


class PollingFeed:
    """Polls a broker for newly closed bars and emits each exactly once, in order.

    After a stall (terminal busy, connection lost) the next poll asks for enough
    bars to cover the gap, so bars that closed meanwhile are backfilled (counted in
    ``health.backfilled``); bars the broker does not have (no ticks, or beyond
    ``max_backfill``) are counted in ``missed``. ``health.stalled_for_s`` shows a
    stall while it lasts.
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
        self.health = FeedHealth()

    @property
    def missed(self) -> int:
        return self.health.missed

    @property
    def last_bar_monotonic(self) -> float | None:
        return self.health.last_bar_monotonic

    async def poll_once(self) -> list[Bar]:
        self.health.started(self._clock)
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
                    self.health.missed += gap
                    log.warning("bars_missed", symbol=symbol, missed=gap, after=str(last))
            if bars:
                self._last[symbol] = bars[-1].time
                if last is not None and len(bars) > 1:
                    # All but the newest closed while nobody looked: a stall, now backfilled.
                    self.health.backfilled += len(bars) - 1
                    log.info("bars_backfilled", symbol=symbol, bars=len(bars) - 1, after=str(last))
            out.extend(bars)
        out.sort(key=lambda b: (b.time, b.symbol))
        self.health.delivered(out, self._clock)
        return out

    async def bars(self) -> AsyncGenerator[Bar, None]:
        while True:
            for bar in await self.poll_once():
                yield bar
            await self._clock.sleep(self._poll_interval_s)
