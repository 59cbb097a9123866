"""Live bars from MetaTrader 5: history for warm-up and training, then polled closed bars.

``fetch_history`` walks back from now with ``copy_rates_from`` in chunks below
the terminal's ``maxbars`` (larger requests fail with -2), converts server
times to UTC once, cleans the bars like any other source and caches them on
disk, so a restart asks the terminal only for what is new. ``LiveFeed`` hands
the history to the daemon and then emits each newly closed bar once through
``PollingFeed`` (which backfills bars missed during a stall or reconnect).
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import structlog

from execution.mt5_client import server_epoch_to_utc, server_epochs_to_utc_ns
from market_data.bars import BAR_COLUMNS, Bar, iter_bars
from market_data.cleaning import clean_bars
from market_data.feeds import ClosedBarSource, PollingFeed
from utils.clock import Clock

log = structlog.get_logger(__name__)

DEFAULT_CHUNK = 10_000


class HistorySource(Protocol):
    """What ``fetch_history`` needs from the broker (``MT5Broker`` has it)."""

    @property
    def timeframe_s(self) -> int: ...

    @property
    def server_timezone(self) -> str: ...

    async def rates_from(self, symbol: str, server_epoch: int, count: int) -> np.ndarray: ...

    async def maxbars(self) -> int: ...

    async def server_now(self, symbol: str) -> int: ...

    def utc_now(self) -> datetime: ...


def _cache_file(cache_dir: Path, symbol: str, timeframe_s: int) -> Path:
    return cache_dir / f"{symbol}_{timeframe_s}s.npz"


def load_cache(path: Path) -> pd.DataFrame | None:
    """A cached canonical frame, or None (missing or unreadable: it is only a cache)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            frame = pd.DataFrame({c: data[c] for c in BAR_COLUMNS})
    except (OSError, ValueError, KeyError) as exc:
        log.warning("bar_cache_unreadable", path=str(path), error=str(exc))
        return None
    frame["time"] = pd.to_datetime(frame["time"], unit="ns", utc=True)
    return frame


def save_cache(path: Path, frame: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {c: frame[c].to_numpy() for c in BAR_COLUMNS[1:]}
    arrays["time"] = frame["time"].dt.tz_convert("UTC").to_numpy("datetime64[ns]").astype(np.int64)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def rates_frame(
    rates: np.ndarray, server_timezone: str, not_after: datetime | None = None
) -> pd.DataFrame:
    """MT5 rates (server wall-clock epoch seconds) as a raw frame with UTC times.

    ``not_after`` (the latest tick in UTC) places the repeated fall-back hour:
    see ``server_epochs_to_utc_ns``.
    """
    utc_ns = server_epochs_to_utc_ns(rates["time"], server_timezone, not_after)
    frame = pd.DataFrame({"time": pd.to_datetime(utc_ns, unit="ns", utc=True)})
    for name in BAR_COLUMNS[1:]:
        frame[name] = rates[name]
    return frame


async def fetch_history(
    source: HistorySource,
    symbol: str,
    bars: int,
    *,
    cache_dir: Path | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> pd.DataFrame:
    """The latest ``bars`` closed bars of ``symbol`` (canonical, cleaned, UTC)."""
    tf_s = source.timeframe_s
    now = await source.server_now(symbol)
    now_utc = server_epoch_to_utc(now, source.server_timezone, source.utc_now())
    per_call = max(1, min(chunk, await source.maxbars() - 1))
    path = _cache_file(cache_dir, symbol, tf_s) if cache_dir is not None else None
    cached = load_cache(path) if path is not None else None
    cached_last = cached["time"].iloc[-1] if cached is not None and len(cached) else None
    pieces: list[np.ndarray] = []
    remaining = bars + 1  # the forming bar comes too
    date_from = now
    calls = 0
    while remaining > 0:
        ask = min(per_call, remaining)
        rates = await source.rates_from(symbol, date_from, ask)
        calls += 1
        if len(rates) == 0:
            break
        pieces.insert(0, rates)
        remaining -= len(rates)
        oldest = int(rates["time"][0])
        if cached_last is not None:
            oldest_utc = rates_frame(rates[:1], source.server_timezone, now_utc)["time"].iloc[0]
            if oldest_utc <= cached_last:
                break
        if len(rates) < ask:
            break  # the terminal has no more history
        date_from = oldest - 1
    raw = np.concatenate(pieces) if pieces else None
    fresh = None
    if raw is not None and len(raw):
        fresh = rates_frame(raw, source.server_timezone, now_utc)
        # Drop the forming bar (compared in UTC: the wall clock repeats an hour in autumn).
        fresh = fresh[fresh["time"] + pd.Timedelta(seconds=tf_s) <= pd.Timestamp(now_utc)]
    frames = [f for f in (fresh, cached) if f is not None and len(f)]
    if not frames:
        return pd.DataFrame({c: [] for c in BAR_COLUMNS})
    # Fresh rows first: cleaning keeps the first of duplicate times.
    frame, report = clean_bars(
        pd.concat(frames, ignore_index=True), source=f"mt5:{symbol}", timeframe_s=tf_s
    )
    frame = frame.iloc[-bars:].reset_index(drop=True)
    if path is not None:
        save_cache(path, frame)
    log.info(
        "history_fetched",
        symbol=symbol,
        bars=len(frame),
        calls=calls,
        chunk=per_call,
        from_cache=0 if cached is None else len(cached),
        rejected=report.rejected_total,
    )
    return frame


async def fetch_history_bars(
    source: HistorySource,
    symbols: Sequence[str],
    bars: int,
    *,
    cache_dir: Path | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> list[Bar]:
    """History of several symbols as ``Bar`` values, merged in time order."""
    out: list[Bar] = []
    for symbol in symbols:
        frame = await fetch_history(source, symbol, bars, cache_dir=cache_dir, chunk=chunk)
        out.extend(iter_bars(frame, symbol))
    out.sort(key=lambda b: (b.time, b.symbol))
    return out


class LiveFeed:
    """The live daemon's feed: the fetched history, then newly closed bars as they close."""

    def __init__(
        self,
        source: ClosedBarSource,
        symbols: Sequence[str],
        *,
        clock: Clock,
        timeframe_s: int,
        history: Sequence[Bar],
        poll_interval_s: float = 1.0,
        max_backfill: int = 500,
    ) -> None:
        self._history = list(history)
        last_seen = {b.symbol: b.time for b in self._history}
        self._polling = PollingFeed(
            source,
            symbols,
            clock=clock,
            timeframe_s=timeframe_s,
            poll_interval_s=poll_interval_s,
            max_backfill=max_backfill,
            last_seen=last_seen,
        )

    def history(self) -> list[Bar]:
        return list(self._history)

    @property
    def missed(self) -> int:
        return self._polling.missed

    async def poll_once(self) -> list[Bar]:
        return await self._polling.poll_once()

    def bars(self) -> AsyncGenerator[Bar, None]:
        return self._polling.bars()
