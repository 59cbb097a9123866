"""The only way the daemon reads time or sleeps, so tests can replace it.

``SystemClock`` reads the wall clock; ``FakeClock`` moves only when told to (or
when something sleeps on it), so a test can drive a day of trading in a second.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """Current time, UTC-aware."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards (for durations)."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """Deterministic clock: ``sleep`` advances time at once and yields to the loop."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2024, 1, 1, tzinfo=UTC)
        if self._now.tzinfo is None:
            raise ValueError("FakeClock start must be UTC-aware")
        self._mono = 0.0

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)
        self._mono += seconds

    def advance_to(self, moment: datetime) -> None:
        """Move forward to ``moment`` (a market clock following bars); never backwards."""
        ahead = (moment - self._now).total_seconds()
        if ahead > 0:
            self.advance(ahead)

    async def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)


def iso_utc(moment: datetime) -> str:
    """ISO-8601 UTC with a trailing Z, the journal's time format."""
    if moment.tzinfo is None:
        raise ValueError(f"naive datetime {moment!r}: times must be UTC-aware")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ").replace(".000000Z", "Z")


def parse_iso_utc(text: str) -> datetime:
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError(f"time {text!r} has no zone; journal times end in Z")
    return parsed.astimezone(UTC)
