"""The trading kernel: feed -> broker simulation -> strategy -> journal, bar by bar.

The same kernel serves the paper daemon, live trading and (later) backtests;
only the feed, the broker and the clock differ. It owns no I/O of its own:
journal writes are queued to the journal's writer thread, broker calls are the
broker's business.

Ordering matters for crash safety. For each bar: the broker learns the bar
(SL/TP fills), closed deals are journaled, the strategy decides (its trade
writes are awaited), and only then is the bar recorded as processed in
``state``. The journal commits writes in submission order, so after a crash
the last processed bar never runs ahead of the trades it produced.

A stalled feed is visible while it lasts: ``stalled_for_s()`` is the clock time
since the last bar was processed (the health check's "feed fresh" rule), and
``feed_health`` the feed's own account of backfilled and missed bars.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog

from execution.broker import BarDrivenBroker, Broker, Position
from execution.risk import RiskManager
from market_data.bars import Bar
from market_data.feeds import BarFeed, FeedHealth
from strategy.scalper import CrashPoint, ScalpingStrategy
from utils.clock import Clock, iso_utc
from utils.trade_journal import HEARTBEAT_KEY, LAST_BAR_KEY, Journal

log = structlog.get_logger(__name__)

RISK_STATE_KEY = "risk.state"


@dataclass
class EngineStats:
    bars: int = 0
    stop_reason: str = ""
    last_bar_time: datetime | None = None  # market time
    # When the last bar was processed, on the engine's clock (monotonic and wall).
    last_bar_monotonic: float | None = None
    last_bar_wall_time: datetime | None = None
    started_monotonic: float | None = None  # when run() began


class TradingEngine:
    def __init__(
        self,
        *,
        feed: BarFeed,
        strategy: ScalpingStrategy,
        broker: Broker,
        journal: Journal,
        clock: Clock,
        risk: RiskManager,
        equity_every_bars: int,
        max_bars: int | None = None,
        duration_s: float | None = None,
        heartbeat_every_s: float = 5.0,
        crash: CrashPoint | None = None,
        keep_bars: int = 0,
        every_market_s: float = 3600.0,
        periodic: Callable[[datetime], None] | None = None,
        after_bar: Callable[[Bar], object] | None = None,
    ) -> None:
        self._feed = feed
        self._strategy = strategy
        self._broker = broker
        # Checked once: isinstance against a runtime Protocol costs ~100 µs per call.
        self._simulated: BarDrivenBroker | None = (
            broker if isinstance(broker, BarDrivenBroker) else None
        )
        self._journal = journal
        self._clock = clock
        self._risk = risk
        self._last_risk_state: object = None
        self._equity_every = equity_every_bars
        self._max_bars = max_bars
        self._duration_s = duration_s
        self._heartbeat_every_s = heartbeat_every_s
        self._crash = crash or CrashPoint(None)
        self._open: dict[int, Position] = {}
        # The latest bars per symbol, for retraining on what the daemon has seen.
        self._keep_bars = keep_bars
        self.recent_bars: dict[str, deque[Bar]] = {}
        # Housekeeping ticked by market time (model staleness): a pure function of the
        # bar clock, so replays and backtests see it at the same bars as live would.
        self._periodic = periodic
        # Called after every processed bar (the auto-trainer's market-time tick).
        self._after_bar = after_bar
        self._every = timedelta(seconds=every_market_s)
        self._next_periodic: datetime | None = None
        self.stats = EngineStats()

    def stalled_for_s(self) -> float | None:
        """Clock seconds since the last processed bar (since ``run`` began if none yet).

        None before ``run``. A live M1 feed is fresh while this stays under about
        one bar plus the poll interval; a replay under a few bar intervals.
        """
        ref = self.stats.last_bar_monotonic
        if ref is None:
            ref = self.stats.started_monotonic
        return None if ref is None else max(0.0, self._clock.monotonic() - ref)

    @property
    def feed_health(self) -> FeedHealth | None:
        """The feed's own freshness record (backfilled and missed bars), if it keeps one."""
        health = getattr(self._feed, "health", None)
        return health if isinstance(health, FeedHealth) else None

    def remember_position(self, position: Position) -> None:
        self._open[position.position_id] = position

    def _keep(self, bar: Bar) -> None:
        if self._keep_bars:
            buf = self.recent_bars.get(bar.symbol)
            if buf is None:
                buf = self.recent_bars[bar.symbol] = deque(maxlen=self._keep_bars)
            buf.append(bar)

    def warm_up(self, history: list[Bar], *, feature_bars: int | None = None) -> int:
        """Prime the strategy with history; keep all of it for retraining.

        Only the last ``feature_bars`` bars of each symbol go through the features
        and models (enough for the feature window and sequence models); a long
        training history need not be replayed through them at every start.
        """
        counts: dict[str, int] = {}
        for bar in history:
            counts[bar.symbol] = counts.get(bar.symbol, 0) + 1
        seen: dict[str, int] = {}
        for bar in history:
            self._keep(bar)
            seen[bar.symbol] = seen.get(bar.symbol, 0) + 1
            if feature_bars is None or counts[bar.symbol] - seen[bar.symbol] < feature_bars:
                self._strategy.warm(bar)
        return len(history)

    async def run(self, stop: asyncio.Event) -> str:
        started = self._clock.monotonic()
        self.stats.started_monotonic = started
        last_heartbeat = -1e18
        bars = self._feed.bars()
        try:
            async for bar in bars:
                await self._process(bar)
                self.stats.bars += 1
                self.stats.last_bar_time = bar.time
                now_mono = self._clock.monotonic()
                self.stats.last_bar_monotonic = now_mono
                self.stats.last_bar_wall_time = self._clock.now()
                if now_mono - last_heartbeat >= self._heartbeat_every_s:
                    last_heartbeat = now_mono
                    self._journal.set_state(HEARTBEAT_KEY, iso_utc(self._clock.now()))
                self._crash.hit("bar")
                if stop.is_set():
                    return self._stopped("signal")
                if self._max_bars is not None and self.stats.bars >= self._max_bars:
                    return self._stopped(f"max_bars={self._max_bars}")
                if self._duration_s is not None and now_mono - started >= self._duration_s:
                    return self._stopped(f"duration={self._duration_s}s")
        finally:
            await bars.aclose()
        return self._stopped("replay finished")

    def _stopped(self, reason: str) -> str:
        self.stats.stop_reason = reason
        return reason

    async def _process(self, bar: Bar) -> None:
        self._keep(bar)
        if self._simulated is not None:
            await self._simulated.on_bar(bar)
        deals = await self._broker.drain_closed_deals()
        if deals:
            await self._strategy.record_closed_deals(deals, self._open)
            for deal in deals:
                self._open.pop(deal.position_id, None)
        entries_before = self._strategy.status.entries
        await self._strategy.on_bar(bar)
        if self._strategy.status.entries != entries_before or deals:
            await self._refresh_open()
        self._journal.set_state(LAST_BAR_KEY + bar.symbol, iso_utc(bar.time))
        risk_state = self._risk.state()
        if risk_state != self._last_risk_state:
            self._last_risk_state = risk_state
            self._journal.set_state(RISK_STATE_KEY, risk_state)
        if self.stats.bars % self._equity_every == 0:
            await self.snapshot_equity(bar.time)
        if self._periodic is not None:
            if self._next_periodic is None:
                self._next_periodic = bar.time + self._every
            elif bar.time >= self._next_periodic:
                self._next_periodic = bar.time + self._every
                self._periodic(bar.time)
        if self._after_bar is not None:
            self._after_bar(bar)

    async def _refresh_open(self) -> None:
        self._open = {pos.position_id: pos for pos in await self._broker.positions()}

    async def snapshot_equity(self, market_time: datetime) -> None:
        account = await self._broker.account()
        positions = await self._broker.positions()
        self._journal.record_equity(
            time=market_time,
            balance=account.balance,
            equity=account.equity,
            margin=account.margin,
            free_margin=account.free_margin,
            open_positions=len(positions),
        )
