"""Performance metrics shared by validation gates, backtests and reports.

Two entry points, both numpy only and free of side effects:

* :func:`equity_metrics` for an equity curve sampled at regular periods (e.g. daily
  closes of the account equity): total and annualised return, Sharpe, Sortino,
  maximum drawdown and its duration, Calmar.
* :func:`trade_metrics` for per-trade **net** P&L, i.e. after spread and
  commission: trade count, win rate, profit factor, expectancy, average win and
  loss, exposure.

The definitions follow the common ones (empyrical / quantstats) and are stated in
the docstrings of the result classes. Every function returns a frozen dataclass
whose ``as_dict()`` is ready for JSON reports (note that ``nan`` and ``inf`` are
possible values, each documented).

Degenerate inputs (no points, a single point, a flat curve, no trades) give the
documented values below and never raise. Bad inputs raise :class:`ValueError`:
non-finite values, equity that is not positive where a period starts, arrays that
are not one-dimensional, or inconsistent exposure arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

__all__ = ["EquityMetrics", "TradeMetrics", "equity_metrics", "trade_metrics"]


@dataclass(frozen=True)
class EquityMetrics:
    """Metrics of an equity curve ``e[0..n]`` with ``n = n_periods`` periods.

    Period returns are simple returns ``r[i] = e[i+1] / e[i] - 1`` and
    ``x[i] = r[i] - risk_free`` are the excess returns (``risk_free`` is a rate *per
    period*, as in empyrical). ``P`` is ``periods_per_year``.

    * ``n_periods``: ``len(equity) - 1`` (0 for an empty or one-point curve).
    * ``total_return``: ``e[n] / e[0] - 1``; 0.0 when ``n_periods == 0``.
    * ``annualised_return`` (CAGR): ``(e[n] / e[0]) ** (P / n) - 1``; 0.0 when
      ``n_periods == 0``; -1.0 when ``e[n] <= 0`` (everything lost); ``inf`` if the
      power overflows.
    * ``sharpe``: ``mean(x) / std(x, ddof=1) * sqrt(P)``. **0.0** when there are
      fewer than two returns or ``std(x) == 0`` (e.g. a flat curve): no measurable
      variability means no risk-adjusted return to report, and a gate must not pass
      a strategy on it.
    * ``sortino``: ``mean(x) / dd * sqrt(P)`` with the downside deviation
      ``dd = sqrt(mean(min(x, 0) ** 2))`` over *all* periods (as empyrical). When
      ``dd == 0`` (no period below ``risk_free``): ``inf`` if ``mean(x) > 0``, else
      0.0 (also 0.0 when ``n_periods == 0``).
    * ``max_drawdown``: ``min(e[i] / max(e[0..i]) - 1)``, a fraction <= 0 (-0.25 is a
      25 % drawdown); 0.0 when the curve never falls below its running peak.
    * ``max_drawdown_duration``: periods of the maximum-drawdown episode, from the
      last peak before its trough (the last index at or above that peak's value) to
      the first later index at or above the peak again, or to the last index if the
      peak is never recovered. The first trough wins ties. 0 without a drawdown.
    * ``calmar``: ``annualised_return / abs(max_drawdown)``; ``nan`` when
      ``max_drawdown == 0``.
    """

    n_periods: int
    total_return: float
    annualised_return: float
    sharpe: float
    sortino: float
    max_drawdown: float
    max_drawdown_duration: int
    calmar: float

    def as_dict(self) -> dict[str, float | int]:
        """The fields as a plain ``{name: value}`` dict, in declaration order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class TradeMetrics:
    """Metrics of per-trade net P&L ``p`` (after spread and commission).

    A trade is a win when ``p > 0`` and a loss when ``p < 0``; a trade with
    ``p == 0`` is neither but counts in ``trade_count`` and ``expectancy``.

    * ``trade_count``: number of trades.
    * ``net_profit``: ``sum(p)`` (0.0 without trades).
    * ``gross_profit``: sum of wins (>= 0); ``gross_loss``: sum of losses (<= 0).
    * ``win_rate``: wins / ``trade_count``; ``nan`` without trades.
    * ``profit_factor``: ``gross_profit / abs(gross_loss)``; ``inf`` when there are
      no losses but some profit; 0.0 when there are losses but no profit; ``nan``
      without trades or when every trade is exactly 0.
    * ``expectancy``: ``mean(p)``, the average net P&L per trade; ``nan`` without
      trades.
    * ``avg_win``: mean of the wins (> 0); ``nan`` without wins.
    * ``avg_loss``: mean of the losses, a **negative** number; ``nan`` without losses.
    * ``exposure``: ``sum(bars_held) / total_bars``, the fraction of bars spent in
      the market (above 1 when trades overlap); ``nan`` when ``bars_held`` and
      ``total_bars`` are not given.
    """

    trade_count: int
    net_profit: float
    gross_profit: float
    gross_loss: float
    win_rate: float
    profit_factor: float
    expectancy: float
    avg_win: float
    avg_loss: float
    exposure: float

    def as_dict(self) -> dict[str, float | int]:
        """The fields as a plain ``{name: value}`` dict, in declaration order."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _as_1d_finite(values: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        idx = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} must be finite, got {arr[idx]!r} at index {idx}")
    return arr


def _sharpe(excess: np.ndarray, periods_per_year: float) -> float:
    if excess.size < 2:
        return 0.0
    std = float(np.std(excess, ddof=1))
    if std == 0.0:
        return 0.0
    return float(np.mean(excess)) / std * math.sqrt(periods_per_year)


def _sortino(excess: np.ndarray, periods_per_year: float) -> float:
    if excess.size == 0:
        return 0.0
    mean = float(np.mean(excess))
    downside = math.sqrt(float(np.mean(np.minimum(excess, 0.0) ** 2)))
    if downside == 0.0:
        return math.inf if mean > 0.0 else 0.0
    return mean / downside * math.sqrt(periods_per_year)


def _max_drawdown(equity: np.ndarray) -> tuple[float, int]:
    if equity.size == 0:
        return 0.0, 0
    peaks = np.maximum.accumulate(equity)
    drawdowns = equity / peaks - 1.0
    trough = int(np.argmin(drawdowns))
    max_dd = float(drawdowns[trough])
    if max_dd >= 0.0:
        return 0.0, 0
    peak_value = peaks[trough]
    start = int(np.flatnonzero(equity[: trough + 1] >= peak_value)[-1])
    recovered = np.flatnonzero(equity[trough + 1 :] >= peak_value)
    end = trough + 1 + int(recovered[0]) if recovered.size else equity.size - 1
    return max_dd, end - start


def equity_metrics(
    equity: np.ndarray, *, periods_per_year: float, risk_free: float = 0.0
) -> EquityMetrics:
    """Compute :class:`EquityMetrics` of ``equity`` sampled once per period.

    ``periods_per_year`` annualises (252 for trading days, 365 for calendar days);
    ``risk_free`` is a per-period rate subtracted from each return for Sharpe and
    Sortino. Every point but the last must be positive (each starts a period whose
    return divides by it); the last may be <= 0 (the account was wiped out).

    Raises:
        ValueError: on non-finite or non-1-D equity, a non-positive point before the
            last, or non-finite/non-positive ``periods_per_year``/non-finite
            ``risk_free``.
    """
    if not math.isfinite(periods_per_year) or periods_per_year <= 0:
        raise ValueError(f"periods_per_year must be finite and > 0, got {periods_per_year!r}")
    if not math.isfinite(risk_free):
        raise ValueError(f"risk_free must be finite, got {risk_free!r}")
    eq = _as_1d_finite(equity, "equity")
    if eq.size and eq[0] <= 0:
        raise ValueError(f"equity must start positive, got {eq[0]!r}")
    non_positive = np.flatnonzero(eq[:-1] <= 0)
    if non_positive.size:
        idx = int(non_positive[0])
        raise ValueError(
            f"equity must stay positive before its last point, got {eq[idx]!r} at index {idx}"
        )

    n_periods = max(eq.size - 1, 0)
    if n_periods == 0:
        return EquityMetrics(
            n_periods=0,
            total_return=0.0,
            annualised_return=0.0,
            sharpe=0.0,
            sortino=0.0,
            max_drawdown=0.0,
            max_drawdown_duration=0,
            calmar=math.nan,
        )

    ratio = float(eq[-1] / eq[0])
    total_return = ratio - 1.0
    if ratio <= 0.0:
        annualised = -1.0
    else:
        with np.errstate(over="ignore"):
            annualised = float(np.power(ratio, periods_per_year / n_periods)) - 1.0

    returns = eq[1:] / eq[:-1] - 1.0
    excess = returns - risk_free
    max_dd, duration = _max_drawdown(eq)
    calmar = annualised / abs(max_dd) if max_dd < 0.0 else math.nan
    return EquityMetrics(
        n_periods=n_periods,
        total_return=total_return,
        annualised_return=annualised,
        sharpe=_sharpe(excess, periods_per_year),
        sortino=_sortino(excess, periods_per_year),
        max_drawdown=max_dd,
        max_drawdown_duration=duration,
        calmar=calmar,
    )


def trade_metrics(
    net_pnl: np.ndarray,
    *,
    bars_held: np.ndarray | None = None,
    total_bars: int | None = None,
) -> TradeMetrics:
    """Compute :class:`TradeMetrics` of per-trade net P&L (after spread and commission).

    ``bars_held[i]`` is how many bars trade ``i`` was open and ``total_bars`` the
    length of the period traded; give both for ``exposure`` or neither.

    Raises:
        ValueError: on non-finite or non-1-D ``net_pnl``/``bars_held``, only one of
            ``bars_held``/``total_bars`` given, ``bars_held`` of another length than
            ``net_pnl`` or with negative values, or ``total_bars <= 0``.
    """
    pnl = _as_1d_finite(net_pnl, "net_pnl")
    if (bars_held is None) != (total_bars is None):
        raise ValueError("give both bars_held and total_bars for exposure, or neither")
    exposure = math.nan
    if bars_held is not None and total_bars is not None:
        held = _as_1d_finite(bars_held, "bars_held")
        if held.size != pnl.size:
            raise ValueError(f"bars_held has {held.size} entries but net_pnl has {pnl.size} trades")
        if (held < 0).any():
            raise ValueError("bars_held must be >= 0")
        if total_bars <= 0:
            raise ValueError(f"total_bars must be > 0, got {total_bars!r}")
        exposure = float(held.sum()) / total_bars

    wins = pnl[pnl > 0]
    losses = pnl[pnl < 0]
    gross_profit = float(wins.sum())
    gross_loss = float(losses.sum())
    if gross_loss < 0.0:
        profit_factor = gross_profit / -gross_loss
    elif gross_profit > 0.0:
        profit_factor = math.inf
    else:
        profit_factor = math.nan

    count = int(pnl.size)
    return TradeMetrics(
        trade_count=count,
        net_profit=float(pnl.sum()),
        gross_profit=gross_profit,
        gross_loss=gross_loss,
        win_rate=wins.size / count if count else math.nan,
        profit_factor=profit_factor,
        expectancy=float(pnl.mean()) if count else math.nan,
        avg_win=float(wins.mean()) if wins.size else math.nan,
        avg_loss=float(losses.mean()) if losses.size else math.nan,
        exposure=exposure,
    )
