"""The bar value type and the canonical columnar layout every loader returns.

A ``Bar`` is one closed bar: ``time`` is its open time in UTC, prices are bid
prices, ``spread`` is in points. Loaders return a pandas DataFrame with exactly
``BAR_COLUMNS`` (time as ``datetime64[ns, UTC]``); the hot path works on
``Bar`` values and numpy arrays only.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator

    import pandas as pd

BAR_COLUMNS: tuple[str, ...] = (
    "time",
    "open",
    "high",
    "low",
    "close",
    "tick_volume",
    "spread",
    "real_volume",
)


@dataclass(frozen=True, slots=True)
class Bar:
    symbol: str
    time: datetime
    open: float
    high: float
    low: float
    close: float
    tick_volume: int = 0
    spread: int = 0
    real_volume: int = 0

    def __post_init__(self) -> None:
        if self.time.tzinfo is None or self.time.utcoffset() != UTC.utcoffset(None):
            raise ValueError(f"Bar.time must be UTC-aware (got {self.time!r})")


def iter_bars(frame: pd.DataFrame, symbol: str) -> Iterator[Bar]:
    """Yield ``Bar`` values from a canonical frame (already cleaned)."""
    times = frame["time"].dt.to_pydatetime()
    cols = [frame[c].to_numpy() for c in BAR_COLUMNS[1:]]
    for i, t in enumerate(times):
        yield Bar(
            symbol,
            t.astimezone(UTC),
            float(cols[0][i]),
            float(cols[1][i]),
            float(cols[2][i]),
            float(cols[3][i]),
            int(cols[4][i]),
            int(cols[5][i]),
            int(cols[6][i]),
        )


def utc_from_epoch(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)
