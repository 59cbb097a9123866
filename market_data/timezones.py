"""Broker server clocks to UTC, once, at the edge.

A clock name is either an IANA zone (``"Europe/Athens"``, ``"UTC"``,
``"Etc/GMT+5"``) or ``"NY+N"`` / ``"NY-N"``: New York wall time plus (minus)
N whole hours. ``"NY+7"`` is the common FX broker clock: UTC+2 in winter and
UTC+3 in summer, switching on the US daylight-saving dates (not the EU ones,
which is what tells it apart from ``"Europe/Athens"`` for a few weeks a year).

Daylight-saving edges of the wall clock being converted:

- a wall time that does not exist (the hour skipped in spring) is shifted
  forward to the first instant after the gap (pandas ``nonexistent=
  "shift_forward"``), so 03:30 on the Athens spring-forward day becomes 04:00
  local time = 01:00 UTC;
- a wall time that occurs twice (the hour repeated in autumn) is read as its
  first occurrence (daylight time), unless the same wall time already
  appeared earlier in the series, in which case that repetition is read as
  the second occurrence (standard time). An export that contains the repeated
  hour twice therefore converts to two distinct hours in order, and one that
  contains it once converts to the earlier instant. Nothing raises.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pandas as pd

_NY_ZONE = "America/New_York"
_NY_PATTERN = re.compile(r"^NY([+-])(\d{1,2})$", re.IGNORECASE)


@lru_cache(maxsize=64)
def parse_timezone(tz_name: str) -> tuple[str, timedelta]:
    """``(IANA zone, shift)`` such that server wall time = zone wall time + shift.

    Raises ``ValueError`` naming the accepted forms for anything else.
    """
    name = tz_name.strip()
    match = _NY_PATTERN.match(name)
    if match:
        hours = int(match.group(2))
        if hours > 12:
            raise ValueError(
                f"time zone {tz_name!r}: the NY offset must be 0..12 hours, e.g. 'NY+7'"
            )
        sign = 1 if match.group(1) == "+" else -1
        return _NY_ZONE, timedelta(hours=sign * hours)
    if name.upper() in {"UTC", "Z", "GMT"}:
        return "UTC", timedelta(0)
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(
            f"unknown time zone {tz_name!r}; use an IANA name such as 'Europe/Athens' "
            "or 'UTC', or 'NY+7' (New York time plus 7 hours)"
        ) from exc
    return name, timedelta(0)


def to_utc(naive: pd.Series | pd.DatetimeIndex, tz_name: str) -> pd.Series:
    """Convert wall-clock times of the clock ``tz_name`` to ``datetime64[ns, UTC]``.

    ``naive`` holds the server's wall-clock times without a zone (NaT stays
    NaT). Already zone-aware input is simply converted to UTC. The result is a
    Series with the input Series' index (a fresh RangeIndex for a
    DatetimeIndex). See the module docstring for the DST rules.
    """
    zone, shift = parse_timezone(tz_name)
    if isinstance(naive, pd.DatetimeIndex):
        values = pd.Series(naive, index=pd.RangeIndex(len(naive)))
    else:
        values = naive
    if not pd.api.types.is_datetime64_any_dtype(values.dtype):
        values = pd.to_datetime(values, errors="coerce")
    if values.dt.tz is not None:
        return values.dt.tz_convert("UTC").dt.as_unit("ns")
    local = values.dt.as_unit("ns") - shift if shift else values.dt.as_unit("ns")
    if zone == "UTC":
        return local.dt.tz_localize("UTC")
    # True = daylight time (first occurrence); only consulted for ambiguous times.
    first_occurrence = ~local.duplicated(keep="first").to_numpy()
    localized = local.dt.tz_localize(zone, ambiguous=first_occurrence, nonexistent="shift_forward")
    return localized.dt.tz_convert("UTC").dt.as_unit("ns")


def server_offset(moment_utc: datetime | pd.Timestamp, tz_name: str) -> timedelta:
    """The server clock's offset from UTC at one instant (server wall = UTC + offset)."""
    if moment_utc.tzinfo is None:
        raise ValueError(f"naive datetime {moment_utc!r}: pass a UTC-aware instant")
    zone, shift = parse_timezone(tz_name)
    instant = moment_utc.astimezone(UTC)
    if zone == "UTC":
        return shift
    offset = instant.astimezone(ZoneInfo(zone)).utcoffset()
    if offset is None:  # pragma: no cover - zoneinfo always knows the offset
        raise ValueError(f"time zone {tz_name!r} has no offset at {instant.isoformat()}")
    return offset + shift
