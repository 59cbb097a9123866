"""Metrics pinned by hand-computed series and cross-checked against direct numpy formulas."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from ml.metrics import EquityMetrics, TradeMetrics, equity_metrics, trade_metrics


def _arr(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)


# --------------------------------------------------------------------------- equity


def test_hand_computed_curve() -> None:
    # equity [100, 110, 99, 120], P = 3 periods per year (so CAGR == total return)
    # returns r = [0.1, -0.1, 120/99 - 1 = 7/33 = 0.2121...]
    # mean(r) = (0.1 - 0.1 + 7/33) / 3 = 7/99
    # deviations from the mean, times 99: [2.9, -16.9, 14]
    # var(ddof=1) = (2.9² + 16.9² + 14²) / 99² / 2 = 245.01 / 9801
    # sharpe = (7/99) / (sqrt(245.01)/99) * sqrt(3) = 7 * sqrt(3) / sqrt(245.01) = 0.774581...
    # downside dd = sqrt((0 + 0.01 + 0) / 3) = 0.1 / sqrt(3)
    # sortino = (7/99) / (0.1/sqrt(3)) * sqrt(3) = 210/99 = 2.1212...
    # running peak [100, 110, 110, 120], drawdowns [0, 0, -0.1, 0] -> max DD -0.1,
    # peak at index 1, recovered at index 3 -> duration 2; calmar = 0.2 / 0.1 = 2
    m = equity_metrics(_arr(100, 110, 99, 120), periods_per_year=3)
    assert m.n_periods == 3
    assert m.total_return == pytest.approx(0.2)
    assert m.annualised_return == pytest.approx(0.2)
    assert m.sharpe == pytest.approx(7 * math.sqrt(3) / math.sqrt(245.01))
    assert m.sharpe == pytest.approx(0.774581, abs=1e-6)
    assert m.sortino == pytest.approx(210 / 99)
    assert m.max_drawdown == pytest.approx(-0.1)
    assert m.max_drawdown_duration == 2
    assert m.calmar == pytest.approx(2.0)


def test_annualisation_uses_periods_per_year() -> None:
    # same curve on daily data: CAGR = 1.2 ** (252 / 3) - 1, sharpe scales by sqrt(252/3)
    daily = equity_metrics(_arr(100, 110, 99, 120), periods_per_year=252)
    yearly = equity_metrics(_arr(100, 110, 99, 120), periods_per_year=3)
    assert daily.annualised_return == pytest.approx(1.2**84 - 1)
    assert daily.sharpe == pytest.approx(yearly.sharpe * math.sqrt(84))
    assert daily.sortino == pytest.approx(yearly.sortino * math.sqrt(84))
    assert daily.calmar == pytest.approx((1.2**84 - 1) / 0.1)


def test_unrecovered_drawdown_runs_to_the_end() -> None:
    # [100, 120, 90, 100, 110]: peak 120 at index 1, trough 90 -> 90/120 - 1 = -0.25,
    # never back to 120 -> duration = last index 4 - 1 = 3
    m = equity_metrics(_arr(100, 120, 90, 100, 110), periods_per_year=252)
    assert m.max_drawdown == pytest.approx(-0.25)
    assert m.max_drawdown_duration == 3


def test_duration_starts_at_the_last_touch_of_the_peak() -> None:
    # [100, 110, 105, 110, 99, 120]: the 110 peak is re-reached at index 3, so the
    # max drawdown 99/110 - 1 = -0.1 starts there and recovers at index 5 -> 2
    m = equity_metrics(_arr(100, 110, 105, 110, 99, 120), periods_per_year=252)
    assert m.max_drawdown == pytest.approx(-0.1)
    assert m.max_drawdown_duration == 2


def test_duration_is_that_of_the_deepest_drawdown_not_the_longest() -> None:
    # episode 1: 100 -> 90 -> 95 -> 100: -10 %, 3 periods (index 0 to 3)
    # episode 2: 101 -> 80 -> 101.5: 80/101 - 1 = -20.79 %, 2 periods (index 4 to 6)
    m = equity_metrics(_arr(100, 90, 95, 100, 101, 80, 101.5), periods_per_year=252)
    assert m.max_drawdown == pytest.approx(80 / 101 - 1)
    assert m.max_drawdown_duration == 2


def test_first_of_equal_troughs_wins() -> None:
    # two -10 % drawdowns: 100 -> 90 -> 100 (2 periods), 100 -> 90 -> 95 -> 100 (3 periods)
    m = equity_metrics(_arr(100, 90, 100, 90, 95, 100), periods_per_year=252)
    assert m.max_drawdown == pytest.approx(-0.1)
    assert m.max_drawdown_duration == 2


def test_constant_returns_and_risk_free() -> None:
    # [1, 2, 4]: returns [1, 1] exactly; std 0 -> sharpe 0.0; no downside -> sortino inf
    m = equity_metrics(_arr(1, 2, 4), periods_per_year=4)
    assert m.total_return == 3.0
    assert m.annualised_return == pytest.approx(4.0**2 - 1)  # (4/1) ** (4/2) - 1
    assert m.sharpe == 0.0
    assert m.sortino == math.inf
    assert m.max_drawdown == 0.0
    assert m.max_drawdown_duration == 0
    assert math.isnan(m.calmar)
    # risk_free equal to the return: excess [0, 0] -> sortino 0.0
    assert equity_metrics(_arr(1, 2, 4), periods_per_year=4, risk_free=1.0).sortino == 0.0
    # risk_free 2.0: excess [-1, -1], dd = 1, sortino = -1 * sqrt(4) = -2
    assert equity_metrics(_arr(1, 2, 4), periods_per_year=4, risk_free=2.0).sortino == -2.0


def test_risk_free_shifts_sharpe_numerator_only() -> None:
    # excess = r - rf: the mean moves by rf, the std does not
    eq = _arr(100, 110, 99, 120)
    r = np.diff(eq) / eq[:-1]
    m = equity_metrics(eq, periods_per_year=3, risk_free=0.01)
    assert m.sharpe == pytest.approx((r.mean() - 0.01) / r.std(ddof=1) * math.sqrt(3))
    # the total and annualised return are not risk-adjusted
    assert m.total_return == pytest.approx(0.2)


def test_flat_curve() -> None:
    m = equity_metrics(_arr(100, 100, 100), periods_per_year=252)
    assert m == EquityMetrics(
        n_periods=2,
        total_return=0.0,
        annualised_return=0.0,
        sharpe=0.0,
        sortino=0.0,
        max_drawdown=0.0,
        max_drawdown_duration=0,
        calmar=m.calmar,
    )
    assert math.isnan(m.calmar)


@pytest.mark.parametrize("equity", [_arr(), _arr(100)])
def test_no_periods(equity: np.ndarray) -> None:
    m = equity_metrics(equity, periods_per_year=252)
    assert m.n_periods == 0
    assert (m.total_return, m.annualised_return, m.sharpe, m.sortino) == (0.0, 0.0, 0.0, 0.0)
    assert (m.max_drawdown, m.max_drawdown_duration) == (0.0, 0)
    assert math.isnan(m.calmar)


def test_single_period() -> None:
    # [100, 90]: one return -0.1 -> sharpe 0.0 (needs two returns);
    # sortino = -0.1 / sqrt(0.01) * sqrt(4) = -2; DD -0.1 from index 0 to the end (1)
    m = equity_metrics(_arr(100, 90), periods_per_year=4)
    assert m.sharpe == 0.0
    assert m.sortino == pytest.approx(-2.0)
    assert m.max_drawdown == pytest.approx(-0.1)
    assert m.max_drawdown_duration == 1
    assert m.annualised_return == pytest.approx(0.9**4 - 1)
    assert m.calmar == pytest.approx((0.9**4 - 1) / 0.1)


@pytest.mark.parametrize("last", [0.0, -10.0])
def test_wiped_out_account(last: float) -> None:
    # a last point <= 0 is allowed: CAGR -1.0 (everything lost)
    m = equity_metrics(_arr(100, 50, last), periods_per_year=252)
    assert m.total_return == pytest.approx(last / 100 - 1)
    assert m.annualised_return == -1.0
    assert m.max_drawdown == pytest.approx(last / 100 - 1)
    assert m.max_drawdown_duration == 2


def test_cagr_overflow_is_inf() -> None:
    m = equity_metrics(_arr(1, 1e6), periods_per_year=1e6)
    assert m.annualised_return == math.inf


@pytest.mark.parametrize(
    ("equity", "message"),
    [
        (_arr(100, math.nan, 120), "finite"),
        (_arr(100, math.inf), "finite"),
        (_arr(0, 100), "start positive"),
        (_arr(-5), "start positive"),
        (_arr(100, 0, 50), "stay positive"),
        (_arr(100, -1, 50), "stay positive"),
        (np.ones((2, 3)), "one-dimensional"),
    ],
)
def test_bad_equity(equity: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        equity_metrics(equity, periods_per_year=252)


@pytest.mark.parametrize(
    ("ppy", "rf", "message"),
    [(0, 0.0, "periods_per_year"), (math.nan, 0.0, "periods_per_year"), (252, math.nan, "risk")],
)
def test_bad_parameters(ppy: float, rf: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        equity_metrics(_arr(100, 110), periods_per_year=ppy, risk_free=rf)


def _brute_force_dd_duration(eq: list[float]) -> tuple[float, int]:
    """Max drawdown and its duration by a plain loop, independent of the module's code."""
    peak, peak_i = eq[0], 0
    worst, worst_start, worst_trough = 0.0, 0, 0
    for i, v in enumerate(eq):
        if v >= peak:
            peak, peak_i = v, i
        dd = v / peak - 1
        if dd < worst:
            worst, worst_start, worst_trough = dd, peak_i, i
    if worst == 0.0:
        return 0.0, 0
    for j in range(worst_trough + 1, len(eq)):
        if eq[j] >= eq[worst_start]:
            return worst, j - worst_start
    return worst, len(eq) - 1 - worst_start


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_cross_check_random_series(seed: int) -> None:
    rng = np.random.default_rng(seed)
    r = rng.normal(0.0005, 0.01, 500)
    eq = 1000.0 * np.concatenate([[1.0], np.cumprod(1.0 + r)])
    m = equity_metrics(eq, periods_per_year=252, risk_free=0.0001)

    ret = np.diff(eq) / eq[:-1]
    x = ret - 0.0001
    assert ret == pytest.approx(r)
    assert m.sharpe == pytest.approx(x.mean() / x.std(ddof=1) * np.sqrt(252))
    assert m.sortino == pytest.approx(
        x.mean() / np.sqrt(np.mean(np.minimum(x, 0) ** 2)) * np.sqrt(252)
    )
    mdd = float(np.min(eq / np.maximum.accumulate(eq) - 1))
    assert m.max_drawdown == pytest.approx(mdd)
    assert (m.max_drawdown, m.max_drawdown_duration) == pytest.approx(
        _brute_force_dd_duration(eq.tolist())
    )
    cagr = (eq[-1] / eq[0]) ** (252 / 500) - 1
    assert m.annualised_return == pytest.approx(cagr)
    assert m.calmar == pytest.approx(cagr / abs(mdd))


def test_equity_as_dict_and_frozen() -> None:
    m = equity_metrics(_arr(100, 110, 99, 120), periods_per_year=3)
    d = m.as_dict()
    assert list(d) == [
        "n_periods",
        "total_return",
        "annualised_return",
        "sharpe",
        "sortino",
        "max_drawdown",
        "max_drawdown_duration",
        "calmar",
    ]
    assert d["max_drawdown_duration"] == 2
    assert EquityMetrics(**d) == m  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.sharpe = 1.0  # type: ignore[misc]


# --------------------------------------------------------------------------- trades


def test_hand_computed_trades() -> None:
    # net pnl [10, -5, 0, 20, -15]: wins 10, 20; losses -5, -15; one scratch trade
    # win rate 2/5 = 0.4; gross profit 30, gross loss -20, profit factor 1.5
    # expectancy 10/5 = 2; avg win 15; avg loss -10
    # bars held [3, 1, 2, 5, 4] = 15 of 100 bars -> exposure 0.15
    m = trade_metrics(_arr(10, -5, 0, 20, -15), bars_held=np.array([3, 1, 2, 5, 4]), total_bars=100)
    assert m == TradeMetrics(
        trade_count=5,
        net_profit=10.0,
        gross_profit=30.0,
        gross_loss=-20.0,
        win_rate=0.4,
        profit_factor=1.5,
        expectancy=2.0,
        avg_win=15.0,
        avg_loss=-10.0,
        exposure=0.15,
    )


def test_no_losses_gives_infinite_profit_factor() -> None:
    m = trade_metrics(_arr(5, 0, 3))
    assert m.profit_factor == math.inf
    assert m.win_rate == pytest.approx(2 / 3)
    assert m.avg_win == 4.0
    assert math.isnan(m.avg_loss)
    assert math.isnan(m.exposure)  # bars_held / total_bars not given


def test_only_losses() -> None:
    m = trade_metrics(_arr(-1, -3))
    assert m.profit_factor == 0.0
    assert m.win_rate == 0.0
    assert m.expectancy == -2.0
    assert m.avg_loss == -2.0
    assert math.isnan(m.avg_win)


def test_all_scratch_trades() -> None:
    # every trade exactly 0: 0/0 profit factor is nan, the rest are zeros
    m = trade_metrics(_arr(0, 0))
    assert (m.trade_count, m.win_rate, m.expectancy, m.net_profit) == (2, 0.0, 0.0, 0.0)
    assert math.isnan(m.profit_factor)
    assert math.isnan(m.avg_win)
    assert math.isnan(m.avg_loss)


def test_no_trades() -> None:
    m = trade_metrics(_arr())
    assert (m.trade_count, m.net_profit, m.gross_profit, m.gross_loss) == (0, 0.0, 0.0, 0.0)
    for name in ("win_rate", "profit_factor", "expectancy", "avg_win", "avg_loss", "exposure"):
        assert math.isnan(getattr(m, name)), name
    assert trade_metrics(_arr(), bars_held=_arr(), total_bars=10).exposure == 0.0


def test_overlapping_trades_exposure_above_one() -> None:
    assert trade_metrics(_arr(1, 2), bars_held=_arr(8, 6), total_bars=10).exposure == 1.4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"net_pnl": _arr(1, math.nan)}, "finite"),
        ({"net_pnl": np.zeros((2, 2))}, "one-dimensional"),
        ({"net_pnl": _arr(1), "bars_held": _arr(1)}, "both"),
        ({"net_pnl": _arr(1), "total_bars": 10}, "both"),
        ({"net_pnl": _arr(1, 2), "bars_held": _arr(1), "total_bars": 10}, "entries"),
        ({"net_pnl": _arr(1), "bars_held": _arr(-1), "total_bars": 10}, ">= 0"),
        ({"net_pnl": _arr(1), "bars_held": _arr(math.inf), "total_bars": 10}, "finite"),
        ({"net_pnl": _arr(1), "bars_held": _arr(1), "total_bars": 0}, "total_bars"),
    ],
)
def test_bad_trades(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        trade_metrics(**kwargs)  # type: ignore[arg-type]


def test_trade_as_dict() -> None:
    m = trade_metrics(_arr(10, -5))
    d = m.as_dict()
    assert d["profit_factor"] == 2.0
    assert next(iter(d)) == "trade_count"
    assert TradeMetrics(**d) == m  # type: ignore[arg-type]
