"""Risk manager: stop distance, SL/TP, position size and the entry filters.

Pure, synchronous and deterministic: the only I/O is checking whether the
kill-switch file exists. Decisions:

- The stop distance is rounded UP to a whole number of points, so the SL sits
  exactly on the price grid when the entry does, and the size computed from
  the distance is the size at the SL that is sent (no rounding between them).
- The SL is rounded away from the entry (never closer than the stop
  distance, so ``min_stop_points`` and the broker's stops level always
  hold); the TP is rounded to the nearest tick. With an entry on the grid both
  roundings only remove float noise.
- Volume is floored to ``volume_step`` in integer step counts (0.07 lots is 7
  steps, never 0.06999...), then clamped to ``volume_max``. When the risk
  budget buys less than ``volume_min`` the trade is REFUSED: rounding up would
  put more money at risk than ``risk_per_trade_pct`` allows.
- ``SizeDecision.risk_amount`` is the money actually at risk at the stop with
  the chosen volume (at most the budget; 0 when refused).
- The daily loss limit compares the equity with the equity at the first check
  of each UTC day (of the bar's time). Once hit, new entries stay blocked for
  the rest of that UTC day even if the equity recovers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal
from pathlib import Path

from config.settings import RiskSettings
from execution.broker import Side, SymbolSpec

# Ratios are rounded to this many decimals before flooring or ceiling, so float
# noise (6.9999999999999991 steps, 150.00000000000003 points) does not cost a step.
_NOISE_DECIMALS = 6


@dataclass(frozen=True, slots=True)
class SizeDecision:
    volume: float  # lots; 0 when refused
    risk_amount: float  # money lost at the stop with ``volume``, account currency
    reason: str | None = None  # why refused (or clamped); None when sized as configured


@dataclass(frozen=True, slots=True)
class EntryDecision:
    allowed: bool
    reason: str | None = None
    # Which filter refused: kill_switch, daily_loss, session, spread, max_symbol, max_total.
    # kill_switch and daily_loss hold for hours: the daemon journals them as warnings.
    code: str | None = None


def _floor_count(ratio: float) -> int:
    return math.floor(round(ratio, _NOISE_DECIMALS))


def _ceil_count(ratio: float) -> int:
    return math.ceil(round(ratio, _NOISE_DECIMALS))


def _quantize(price: float, digits: int, rounding: str) -> float:
    """``price`` on the ``digits`` grid, float noise removed before ``rounding``."""
    clean = Decimal(repr(round(price, digits + 4)))
    return float(clean.quantize(Decimal(1).scaleb(-digits), rounding=rounding))


def _lots(steps: int, step: float) -> float:
    return float(Decimal(steps) * Decimal(repr(step)))


class RiskManager:
    """Sizing and entry filters for one account; ``state()``/``restore()`` survive restarts."""

    def __init__(self, settings: RiskSettings, *, account_currency: str) -> None:
        self._s = settings
        self._currency = account_currency
        self._day: date | None = None
        self._day_start_equity: float | None = None
        self._blocked_reason: str | None = None  # the daily limit, latched for self._day

    @property
    def settings(self) -> RiskSettings:
        return self._s

    # -- stops and size ----------------------------------------------------------------

    def stop_distance(self, atr: float, spec: SymbolSpec) -> float:
        """Price distance from entry to SL: ATR-based, never below the floors.

        ``max(atr * stop_atr_mult, min_stop_points * point, stops_level_points * point)``
        rounded up to whole points. A missing (NaN) or negative ATR counts as 0,
        leaving the floors: the size still follows the distance, so the money at
        risk stays as configured.
        """
        atr_points = 0.0
        if math.isfinite(atr) and atr > 0:
            atr_points = atr * self._s.stop_atr_mult / spec.point
        points = max(
            _ceil_count(atr_points),
            self._s.min_stop_points,
            spec.stops_level_points,
        )
        return round(points * spec.point, 12)

    def sl_tp(
        self, side: Side, entry_price: float, stop_distance: float, spec: SymbolSpec
    ) -> tuple[float, float]:
        """SL ``stop_distance`` against the entry, TP ``take_profit_r`` times it in favour."""
        sign = side.sign
        sl_raw = entry_price - sign * stop_distance
        tp_raw = entry_price + sign * self._s.take_profit_r * stop_distance
        away = ROUND_FLOOR if side is Side.BUY else ROUND_CEILING
        return (
            _quantize(sl_raw, spec.digits, away),
            _quantize(tp_raw, spec.digits, ROUND_HALF_EVEN),
        )

    def loss_per_lot(self, spec: SymbolSpec, entry_price: float, stop_distance: float) -> float:
        """Money lost by one lot at the stop, in the account currency.

        Raises ``ValueError`` when the symbol's P&L cannot be converted (the
        account currency is neither its profit nor its base currency).
        """
        amount = stop_distance * spec.contract_size
        if spec.profit_currency == self._currency:
            return amount
        if spec.base_currency == self._currency:
            return amount / entry_price
        raise ValueError(
            f"{spec.symbol}: cannot convert {spec.profit_currency} P&L into the account "
            f"currency {self._currency} (the account currency is neither its base nor "
            "its profit currency)"
        )

    def size(
        self,
        equity: float,
        spec: SymbolSpec,
        entry_price: float,
        stop_distance: float,
        *,
        fraction: float = 1.0,
    ) -> SizeDecision:
        """Lots that lose ``risk_per_trade_pct`` of ``equity`` at the stop, floored to a step.

        ``fraction`` (0..1] takes that share of the budget (a canary's part of a position).
        """
        pct = self._s.risk_per_trade_pct * fraction
        if not (math.isfinite(equity) and equity > 0):
            return SizeDecision(0.0, 0.0, f"equity {equity} is not positive; no trade")
        if not (math.isfinite(stop_distance) and stop_distance > 0):
            return SizeDecision(0.0, 0.0, f"stop distance {stop_distance} is not positive")
        if not (math.isfinite(entry_price) and entry_price > 0):
            return SizeDecision(0.0, 0.0, f"entry price {entry_price} is not positive")
        try:
            per_lot = self.loss_per_lot(spec, entry_price, stop_distance)
        except ValueError as exc:
            return SizeDecision(0.0, 0.0, str(exc))
        budget = equity * pct / 100.0
        steps = _floor_count(budget / per_lot / spec.volume_step)
        max_steps = _floor_count(spec.volume_max / spec.volume_step)
        reason = None
        if steps > max_steps:
            steps = max_steps
            reason = (
                f"clamped to volume_max {spec.volume_max} lots "
                f"(the risk budget {budget:.2f} {self._currency} would buy more)"
            )
        volume = _lots(steps, spec.volume_step)
        if volume < spec.volume_min - 1e-9:
            at_min = spec.volume_min * per_lot
            return SizeDecision(
                0.0,
                0.0,
                f"{spec.symbol}: the risk budget {budget:.2f} {self._currency} "
                f"({pct:g}% of equity {equity:.2f}) buys {budget / per_lot:.4f} lots at a "
                f"{stop_distance / spec.point:.0f}-point stop, below volume_min "
                f"{spec.volume_min}; rounding up would risk {at_min:.2f} {self._currency} "
                f"({at_min / equity * 100:.2f}% of equity), more than configured",
            )
        return SizeDecision(volume, round(volume * per_lot, 2), reason)

    # -- entry filters -----------------------------------------------------------------

    def check_entry(
        self,
        *,
        symbol: str,
        bar_time: datetime,
        spread_points: int,
        open_positions_symbol: int,
        open_positions_total: int,
        equity: float,
    ) -> EntryDecision:
        """May a new position open on ``symbol`` now? The first failing filter is the reason.

        Order: kill-switch file, daily loss limit, session hours, spread,
        positions per symbol, positions in total. The day's starting equity is
        tracked on every call, whatever the outcome.
        """
        when = bar_time.astimezone(UTC)
        self._roll_day(when.date(), equity)
        kill = Path(self._s.kill_switch_path)
        if kill.exists():
            return EntryDecision(False, f"kill switch file {kill} present", "kill_switch")
        limit = self._daily_limit(equity)
        if limit is not None:
            return EntryDecision(False, limit, "daily_loss")
        start, end = self._s.session_start_hour_utc, self._s.session_end_hour_utc
        if not start <= when.hour < end:
            return EntryDecision(
                False,
                f"outside session hours {start:02d}:00-{end:02d}:00 UTC (bar at {when:%H:%M} UTC)",
                "session",
            )
        if spread_points > self._s.max_spread_points:
            return EntryDecision(
                False,
                f"{symbol} spread {spread_points} points exceeds max_spread_points "
                f"{self._s.max_spread_points}",
                "spread",
            )
        if open_positions_symbol >= self._s.max_positions_per_symbol:
            return EntryDecision(
                False,
                f"{symbol} has {open_positions_symbol} open positions "
                f"(max_positions_per_symbol {self._s.max_positions_per_symbol})",
                "max_symbol",
            )
        if open_positions_total >= self._s.max_positions_total:
            return EntryDecision(
                False,
                f"{open_positions_total} positions open in total "
                f"(max_positions_total {self._s.max_positions_total})",
                "max_total",
            )
        return EntryDecision(True, None)

    def _roll_day(self, day: date, equity: float) -> None:
        if day != self._day or self._day_start_equity is None:
            self._day = day
            self._day_start_equity = equity
            self._blocked_reason = None

    def _daily_limit(self, equity: float) -> str | None:
        if self._blocked_reason is not None:
            return self._blocked_reason
        start = self._day_start_equity
        if start is None or start <= 0:
            return None
        loss = start - equity
        limit = start * self._s.daily_loss_limit_pct / 100.0
        if loss >= limit:
            self._blocked_reason = (
                f"daily loss limit hit: down {loss:.2f} {self._currency} "
                f"({loss / start * 100:.2f}%) since the UTC day {self._day} began at "
                f"{start:.2f}; limit {self._s.daily_loss_limit_pct:g}% ({limit:.2f}); "
                "no new entries until the next UTC day"
            )
            return self._blocked_reason
        return None

    @property
    def day_start_equity(self) -> float | None:
        return self._day_start_equity

    # -- persistence -------------------------------------------------------------------

    def state(self) -> dict[str, float | str]:
        """What a restart mid-day needs to keep the daily limit (JSON-ready)."""
        if self._day is None or self._day_start_equity is None:
            return {}
        return {
            "day": self._day.isoformat(),
            "day_start_equity": self._day_start_equity,
            "blocked_reason": self._blocked_reason or "",
        }

    def restore(self, state: Mapping[str, object]) -> None:
        """Take back what ``state()`` returned; an empty or malformed state starts fresh.

        Starting fresh means the next check takes the equity of that moment as
        the day's start: a later (more lenient) limit for the rest of that day.
        """
        day_text, start = state.get("day"), state.get("day_start_equity")
        self._day = None
        self._day_start_equity = None
        self._blocked_reason = None
        if not isinstance(day_text, str) or not isinstance(start, int | float):
            return
        try:
            self._day = date.fromisoformat(day_text)
        except ValueError:
            return
        self._day_start_equity = float(start)
        blocked = state.get("blocked_reason")
        self._blocked_reason = blocked if isinstance(blocked, str) and blocked else None
