"""Validation gates, the holdout simulation and the paired non-inferiority test.

Everything is deterministic: fixed seeds, hand-computed prices, a fake timer for
latency (nothing sleeps, no wall-clock assertion).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from config.settings import ValidationSettings
from ml.metrics import equity_metrics, trade_metrics
from ml.validation import (
    DEFAULT_BLOCK,
    Gate,
    SimCosts,
    ValidationReport,
    checkpoints,
    evaluate,
    holdout_metrics,
    latency_p99_ms,
    paired_noninferiority,
    per_row_log_loss,
    signal_sides,
    simulate_holdout,
)

NAN = math.nan

# --------------------------------------------------------------------------- holdout metrics


def test_holdout_metrics_skip_rows_without_prediction() -> None:
    proba = np.array(
        [
            [0.7, 0.2, 0.1],  # y=0, right, p=0.7
            [0.1, 0.2, 0.7],  # y=1, wrong, p=0.2
            [NAN, NAN, NAN],  # skipped (its label 5 is never looked at)
            [0.2, 0.2, 0.6],  # y=2, right, p=0.6
            [0.1, 0.8, 0.1],  # y=1, right, p=0.8
        ]
    )
    y = np.array([0, 1, 5, 2, 1])
    m = holdout_metrics(proba, y)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["log_loss"] == pytest.approx(-(math.log(0.7 * 0.2 * 0.6 * 0.8)) / 4)
    assert m["majority_rate"] == pytest.approx(0.5)  # class 1 on 2 of 4 scored rows
    assert m["holdout_rows"] == 4.0
    assert set(m) == {"accuracy", "log_loss", "majority_rate", "holdout_rows"}


def test_holdout_metrics_refuse_a_holdout_without_predictions() -> None:
    with pytest.raises(ValueError, match="no holdout row has a prediction"):
        holdout_metrics(np.full((3, 3), NAN), np.array([0, 1, 2]))


def test_holdout_metrics_refuse_labels_outside_the_classes() -> None:
    with pytest.raises(ValueError, match="classes 0/1/2"):
        holdout_metrics(np.full((2, 3), 1 / 3), np.array([0, -1]))


def test_per_row_log_loss_clips_and_marks_missing_rows() -> None:
    proba = np.array([[0.5, 0.25, 0.25], [0.0, 0.0, 1.0], [0.2, NAN, 0.8]])
    out = per_row_log_loss(proba, np.array([0, 0, 2]))
    assert out[0] == pytest.approx(math.log(2))
    assert out[1] == pytest.approx(-math.log(1e-12))
    assert math.isnan(out[2])


# --------------------------------------------------------------------------- simulation

COSTS = SimCosts(
    point=0.01,
    contract_size=100.0,
    commission_per_lot=1.0,  # per side: 2 * 1 / (100 * price) = 0.02 / price per trade
    default_spread_points=5,
    min_confidence=0.5,
    horizon=2,
    periods_per_year=252.0,
)
UP_P = [0.1, 0.2, 0.7]
DOWN_P = [0.7, 0.2, 0.1]
FLAT_P = [0.2, 0.6, 0.2]
NAN_P = [NAN, NAN, NAN]


def test_simulate_holdout_matches_a_hand_computed_run() -> None:
    close = np.array([100.0, 101.0, 102.0, 101.0, 99.0, 98.0, 100.0, 97.5, 101.0])
    spread = np.array([10.0, 0.0, 20.0, NAN, 10.0, -3.0, 10.0, 10.0, 10.0])
    proba = np.array(
        [
            UP_P,  # 0: long, ask 100 + 0.10 = 100.1, exit bar 2 at bid 102
            UP_P,  # 1: ignored, a position is open
            DOWN_P,  # 2: short at the exit bar of the long, bid 102, exit bar 4 at ask 99.1
            UP_P,  # 3: ignored, a position is open
            NAN_P,  # 4: no prediction, no entry
            UP_P,  # 5: long, spread -3 -> default 5: ask 98.05, exit bar 7 at bid 97.5
            DOWN_P,  # 6: ignored, a position is open
            UP_P,  # 7: free again but bar 9 is beyond the holdout
            UP_P,  # 8: beyond the holdout too
        ]
    )
    sim = simulate_holdout(proba, close, spread, COSTS)

    r1 = (102 - 100.1 - 0.02) / 100.1  # = 1.88 / 100.1
    r2 = (102 - 99.1 - 0.02) / 102  # = 2.88 / 102
    r3 = (97.5 - 98.05 - 0.02) / 98.05  # = -0.57 / 98.05
    assert sim.entry_rows.tolist() == [0, 2, 5]
    assert sim.sides.tolist() == [1, -1, 1]
    np.testing.assert_allclose(sim.net_returns, [r1, r2, r3], rtol=0, atol=1e-15)
    assert sim.n_trades == 3
    assert sim.net_pnl == pytest.approx(r1 + r2 + r3)

    # Marked to liquidation value each bar a position is open (both commissions in).
    e1 = 1 + r1
    e2 = e1 * (1 + r2)
    expected_curve = np.array(
        [
            1.0,
            1 + (100 - 100.12) / 100.1,  # bar 0: long just opened
            1 + (101 - 100.12) / 100.1,  # bar 1
            e1 * (1 + (102 - 102.2 - 0.02) / 102),  # bar 2: long closed, short opened
            e1 * (1 + (102 - 101.05 - 0.02) / 102),  # bar 3: nan spread -> 5 points
            e2,  # bar 4: short closed
            e2 * (1 + (98 - 98.07) / 98.05),  # bar 5: long opened
            e2 * (1 + (100 - 98.07) / 98.05),  # bar 6
            e2 * (1 + r3),  # bar 7: long closed
            e2 * (1 + r3),  # bar 8: flat
        ]
    )
    np.testing.assert_allclose(sim.equity_curve, expected_curve, rtol=1e-14)
    expected_equity = equity_metrics(expected_curve, periods_per_year=252.0)
    for key, value in expected_equity.as_dict().items():
        assert getattr(sim.equity, key) == pytest.approx(value, rel=1e-12), key
    # The deepest fall is inside the last trade: from bar 6's mark to bar 7's close.
    assert sim.equity.max_drawdown == pytest.approx((98.05 - 0.57) / (98.05 + 1.93) - 1)
    expected_trades = trade_metrics(
        np.array([r1, r2, r3]), bars_held=np.array([2.0, 2.0, 2.0]), total_bars=9
    )
    for key, value in expected_trades.as_dict().items():
        assert getattr(sim.trades, key) == pytest.approx(value, rel=1e-12), key
    assert sim.trades.win_rate == pytest.approx(2 / 3)
    assert sim.trades.profit_factor == pytest.approx((r1 + r2) / -r3)
    d = sim.as_dict()
    assert d["n_trades"] == 3.0
    assert d["win_rate"] == pytest.approx(2 / 3)
    assert d["max_drawdown"] == sim.equity.max_drawdown


def test_simulate_holdout_only_trades_rows_whose_exit_is_in_range() -> None:
    close = np.array([100.0, 100.5, 101.0])
    spread = np.full(3, 10.0)
    late = simulate_holdout(np.array([FLAT_P, UP_P, UP_P]), close, spread, COSTS)
    assert late.n_trades == 0
    assert late.equity_curve.tolist() == [1.0, 1.0, 1.0, 1.0]
    assert math.isnan(late.trades.win_rate)
    first = simulate_holdout(np.array([UP_P, FLAT_P, FLAT_P]), close, spread, COSTS)
    assert first.net_returns.tolist() == pytest.approx([(101 - 100.12) / 100.1])


def test_simulate_holdout_uses_the_live_entry_rule() -> None:
    proba = np.array(
        [
            [0.10, 0.45, 0.45],  # up at the threshold, beats down: buy (flat ties)
            [0.05, 0.50, 0.45],  # flat most likely, up still clears 0.45: buy, as live
            [0.30, 0.26, 0.44],  # under the threshold
            [0.46, 0.08, 0.46],  # up and down tie: no side
            [0.50, 0.20, 0.30],  # sell
            [NAN, 0.1, 0.9],  # no prediction
        ]
    )
    assert signal_sides(proba, 0.45).tolist() == [1, 1, 0, 0, -1, 0]


def test_simulate_holdout_stops_at_ruin() -> None:
    # A short whose price more than doubles: equity would go below zero at bar 1.
    close = np.array([100.0, 250.0, 300.0])
    sim = simulate_holdout(np.array([DOWN_P, FLAT_P, FLAT_P]), close, np.full(3, 10.0), COSTS)
    ruin = (100 - 250.1 - 0.02) / 100
    assert sim.net_returns.tolist() == pytest.approx([ruin])
    np.testing.assert_allclose(sim.equity_curve, [1.0, 1 + (100 - 100.12) / 100, 1 + ruin])
    assert sim.equity.max_drawdown < -1.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("point", 0.0),
        ("contract_size", -1.0),
        ("commission_per_lot", NAN),
        ("default_spread_points", -1),
        ("min_confidence", 1.5),
        ("horizon", 0),
        ("periods_per_year", 0.0),
    ],
)
def test_sim_costs_refuse_bad_values(field: str, value: float) -> None:
    kwargs: dict[str, float] = {
        "point": 0.01,
        "contract_size": 100.0,
        "commission_per_lot": 1.0,
        "default_spread_points": 5,
        "min_confidence": 0.5,
        "horizon": 2,
        "periods_per_year": 252.0,
    }
    kwargs[field] = value
    with pytest.raises(ValueError, match=f"SimCosts.{field}"):
        SimCosts(**kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- gates

HORIZON = 2
N_ROWS = 300


@dataclass(frozen=True)
class Holdout:
    y: np.ndarray
    close: np.ndarray
    spread: np.ndarray


def _holdout() -> Holdout:
    """A +-0.5 random walk around 100; labels are its 2-bar move (threshold 0.5)."""
    rng = np.random.default_rng(11)
    close = 100.0 + np.concatenate([[0.0], np.cumsum(rng.choice([-0.5, 0.5], N_ROWS - 1))])
    move = close[HORIZON:] - close[:-HORIZON]
    y = np.ones(N_ROWS, dtype=np.int64)
    y[:-HORIZON] = np.where(move > 0.5, 2, np.where(move < -0.5, 0, 1))
    return Holdout(y=y, close=close, spread=np.full(N_ROWS, 10.0))


HOLD = _holdout()
SIM_COSTS = SimCosts(
    point=0.01,
    contract_size=100.0,
    commission_per_lot=1.0,
    default_spread_points=10,
    min_confidence=0.45,
    horizon=HORIZON,
    periods_per_year=252.0 * 24 * 12,
)
SETTINGS = ValidationSettings(
    min_accuracy_edge=0.05,
    min_trades=20,
    min_sharpe=0.0,
    max_drawdown_pct=5.0,
    min_win_rate=0.5,
    min_profit_factor=1.2,
    max_latency_p99_ms=5.0,
)


def _confident(labels: np.ndarray, p: float) -> np.ndarray:
    """Probability ``p`` on ``labels``, the rest shared by the other two classes."""
    out = np.full((labels.size, 3), (1.0 - p) / 2)
    out[np.arange(labels.size), labels] = p
    return out


def _good() -> np.ndarray:
    return _confident(HOLD.y, 0.8)


def _contrarian() -> np.ndarray:
    """Right about flat bars, backwards about every move: trades lose."""
    return _confident(np.where(HOLD.y == 1, 1, 2 - HOLD.y), 0.8)


def _majority_guesser() -> np.ndarray:
    majority = int(np.bincount(HOLD.y).argmax())
    return _confident(np.full(N_ROWS, majority), 0.5)


def _confidently_wrong_tenth() -> np.ndarray:
    """Right argmax on 90 % of rows; on every tenth row p(true) = 1e-6."""
    proba = _confident(HOLD.y, 0.5)
    wrong = (HOLD.y[::10] + 1) % 3
    proba[::10] = 1e-6
    proba[np.arange(0, N_ROWS, 10), wrong] = 1 - 2e-6
    return proba


def _mostly_right() -> np.ndarray:
    """Right on 85 % of rows, mildly wrong on the rest."""
    labels = HOLD.y.copy()
    labels[::7] = (labels[::7] + 1) % 3
    return _confident(labels, 0.8)


PRODUCTION = _confident(HOLD.y, 0.7)  # right everywhere, log-loss -ln 0.7 = 0.357
# The baseline knows the first half of the holdout and guesses uniformly after it.
BASELINE = np.vstack([_confident(HOLD.y[: N_ROWS // 2], 0.8), np.full((N_ROWS // 2, 3), 1 / 3)])


def _report(
    candidate: np.ndarray, *, latency_ms: float = 1.0, settings: ValidationSettings = SETTINGS
) -> ValidationReport:
    return evaluate(
        candidate=candidate,
        y=HOLD.y,
        close=HOLD.close,
        spread_points=HOLD.spread,
        costs=SIM_COSTS,
        settings=settings,
        production=PRODUCTION,
        baseline=BASELINE,
        latency_ms=latency_ms,
    )


ALL_GATES = [
    "accuracy_edge",
    "log_loss",
    "vs_production_accuracy",
    "vs_production_log_loss",
    "sim_trades",
    "sim_sharpe",
    "sim_max_drawdown",
    "sim_win_rate",
    "sim_profit_factor",
    "beat_baseline",
    "latency_p99",
]


def test_a_good_candidate_passes_every_gate() -> None:
    report = _report(_good())
    assert [g.name for g in report.gates] == ALL_GATES
    assert report.passed, report.reasons()
    assert report.failed() == []
    assert report.reasons() == ""
    assert report.metrics["sim_n_trades"] >= SETTINGS.min_trades


@pytest.mark.parametrize(
    ("gate", "bad"),
    [
        ("accuracy_edge", lambda: _report(_majority_guesser())),
        ("log_loss", lambda: _report(_confidently_wrong_tenth())),
        ("vs_production_accuracy", lambda: _report(_mostly_right())),
        ("vs_production_log_loss", lambda: _report(_confident(HOLD.y, 0.5))),
        # p(true) 0.44 is under min_confidence 0.45: right everywhere, never trades
        ("sim_trades", lambda: _report(_confident(HOLD.y, 0.44))),
        ("sim_sharpe", lambda: _report(_contrarian())),
        ("sim_max_drawdown", lambda: _report(_contrarian())),
        ("sim_win_rate", lambda: _report(_contrarian())),
        ("sim_profit_factor", lambda: _report(_contrarian())),
        ("beat_baseline", lambda: _report(_contrarian())),
        ("latency_p99", lambda: _report(_good(), latency_ms=8.0)),
    ],
)
def test_each_gate_rejects_its_bad_candidate(
    gate: str, bad: Callable[[], ValidationReport]
) -> None:
    good = {g.name: g for g in _report(_good()).gates}
    assert good[gate].passed
    report = bad()
    failed = {g.name: g for g in report.failed()}
    assert gate in failed, report.reasons()
    assert not report.passed
    assert failed[gate].reason() in report.reasons()


def test_gate_isolation_for_the_production_log_loss_gate() -> None:
    # Same argmax as production, only less sure: accuracy holds, log-loss does not.
    report = _report(_confident(HOLD.y, 0.5))
    assert [g.name for g in report.failed()] == ["vs_production_log_loss"]
    gate = next(g for g in report.gates if g.name == "vs_production_log_loss")
    assert gate.value == pytest.approx(math.log(2))
    assert gate.threshold == pytest.approx(-math.log(0.7) + SETTINGS.max_log_loss_increase)


def test_a_candidate_worse_than_production_fails_both_production_gates() -> None:
    report = _report(_mostly_right())
    failed = {g.name for g in report.failed()}
    assert {"vs_production_accuracy", "vs_production_log_loss"} <= failed
    assert report.metrics["production_accuracy"] == 1.0
    assert report.metrics["vs_production_rows"] == N_ROWS


def test_production_gates_compare_only_rows_both_models_predict() -> None:
    # The candidate is wrong on the first 50 rows, where production has no prediction.
    candidate = _good()
    candidate[:50] = _confident((HOLD.y[:50] + 1) % 3, 0.8)
    production = PRODUCTION.copy()
    production[:50] = NAN
    report = evaluate(
        candidate=candidate,
        y=HOLD.y,
        close=HOLD.close,
        spread_points=HOLD.spread,
        costs=SIM_COSTS,
        settings=SETTINGS,
        production=production,
    )
    gates = {g.name: g for g in report.gates}
    assert gates["vs_production_accuracy"].passed
    assert gates["vs_production_accuracy"].value == 1.0
    assert gates["vs_production_log_loss"].passed
    assert report.metrics["vs_production_rows"] == N_ROWS - 50
    assert report.metrics["production_holdout_rows"] == N_ROWS - 50
    assert report.metrics["accuracy"] == pytest.approx(250 / 300)


def test_a_production_model_without_comparable_rows_fails_closed() -> None:
    production = np.full((N_ROWS, 3), NAN)
    report = evaluate(
        candidate=_good(),
        y=HOLD.y,
        close=HOLD.close,
        spread_points=HOLD.spread,
        costs=SIM_COSTS,
        settings=SETTINGS,
        production=production,
    )
    failed = [g.name for g in report.failed()]
    assert failed == ["vs_production_accuracy", "vs_production_log_loss"]
    assert math.isnan(report.metrics["production_accuracy"])
    json.dumps(report.as_dict(), allow_nan=False)


def test_optional_gates_appear_only_when_their_inputs_are_given() -> None:
    report = evaluate(
        candidate=_good(),
        y=HOLD.y,
        close=HOLD.close,
        spread_points=HOLD.spread,
        costs=SIM_COSTS,
        settings=SETTINGS,
    )
    assert [g.name for g in report.gates] == [
        "accuracy_edge",
        "log_loss",
        "sim_trades",
        "sim_sharpe",
        "sim_max_drawdown",
        "sim_win_rate",
        "sim_profit_factor",
    ]
    assert not any(k.startswith(("production_", "baseline_")) for k in report.metrics)
    no_baseline_gate = SETTINGS.model_copy(update={"beat_baseline": False})
    names = [g.name for g in _report(_contrarian(), settings=no_baseline_gate).gates]
    assert "beat_baseline" not in names


def test_beat_baseline_compares_simulated_net_pnl() -> None:
    good = _report(_good())
    gate = next(g for g in good.gates if g.name == "beat_baseline")
    pnl, base_pnl = good.metrics["sim_net_pnl"], good.metrics["baseline_sim_net_pnl"]
    assert base_pnl > 0  # the baseline is profitable, only less so
    assert gate.value == pytest.approx(pnl - base_pnl)
    assert gate.value > 0 and gate.threshold == 0.0 and gate.passed
    # The baseline against itself: a tie passes.
    tie = _report(BASELINE)
    assert next(g for g in tie.gates if g.name == "beat_baseline").value == 0.0
    assert next(g for g in tie.gates if g.name == "beat_baseline").passed


def test_nan_metrics_fail_unless_the_threshold_is_vacuous() -> None:
    no_trades = _confident(HOLD.y, 0.44)
    vacuous = SETTINGS.model_copy(update={"min_win_rate": 0.0, "min_profit_factor": 0.0})
    gates = {g.name: g for g in _report(no_trades, settings=vacuous).gates}
    assert math.isnan(gates["sim_win_rate"].value) and gates["sim_win_rate"].passed
    assert math.isnan(gates["sim_profit_factor"].value) and gates["sim_profit_factor"].passed
    gates = {g.name: g for g in _report(no_trades).gates}
    assert not gates["sim_win_rate"].passed
    assert not gates["sim_profit_factor"].passed
    assert gates["sim_win_rate"].reason() == "sim_win_rate nan (needs >= 0.5)"
    latency = _report(_good(), latency_ms=NAN)
    assert [g.name for g in latency.failed()] == ["latency_p99"]


def test_reasons_are_one_line() -> None:
    gates = (
        Gate("sim_sharpe", -1.8, -1.0, False, ">="),
        Gate("log_loss", 0.9, 1.0986, True, "<="),
        Gate("beat_baseline", -0.003, 0.0, False, ">="),
        Gate("latency_p99", 7.5, 5.0, False, "<="),
    )
    report = ValidationReport(gates=gates, metrics={})
    assert not report.passed
    assert report.reasons() == (
        "sim_sharpe -1.8 < -1.0; beat_baseline -0.003 < 0.0; latency_p99 7.5 > 5.0"
    )


def test_report_survives_a_json_round_trip_with_nan_and_inf() -> None:
    report = _report(_confident(HOLD.y, 0.44))  # no trades: nan win rate, calmar, ...
    assert math.isnan(report.metrics["sim_win_rate"])
    good = _report(_good())
    assert math.isinf(good.metrics["sim_profit_factor"])  # no losing trade
    for r in (report, good):
        text = json.dumps(r.as_dict(), allow_nan=False)
        back = json.loads(text)
        assert back == r.as_dict()
        assert back["passed"] is r.passed
        assert back["reasons"] == r.reasons()
        assert len(back["gates"]) == len(r.gates)
    assert json.loads(json.dumps(report.as_dict()))["metrics"]["sim_win_rate"] is None
    assert json.loads(json.dumps(good.as_dict()))["metrics"]["sim_profit_factor"] == "inf"


# --------------------------------------------------------------------------- latency


class _FakeModel:
    """Advances a fake clock by a scripted duration per call and records its rows."""

    def __init__(self, durations_s: Callable[[int], float]) -> None:
        self.now = 0.0
        self.calls = 0
        self.seen: list[int] = []
        self._durations = durations_s

    def timer(self) -> float:
        return self.now

    def __call__(self, row: np.ndarray) -> np.ndarray:
        self.seen.append(int(row[0]))
        self.now += self._durations(self.calls)
        self.calls += 1
        return np.array([0.2, 0.6, 0.2])


def test_latency_p99_uses_the_injected_timer_and_skips_warmup() -> None:
    rows = np.arange(7, dtype=np.float32).reshape(7, 1)
    # Warm-up calls are very slow (not timed); then every 10th call takes 8 ms, others 1 ms.
    model = _FakeModel(lambda k: 0.5 if k < 20 else (0.008 if k % 10 == 0 else 0.001))
    p99 = latency_p99_ms(model, rows, repeats=200, warmup=20, timer=model.timer)
    assert p99 == pytest.approx(8.0)
    assert model.calls == 220
    assert model.seen == [k % 7 for k in range(220)]
    fast = _FakeModel(lambda k: 0.002)
    assert latency_p99_ms(fast, rows, repeats=50, warmup=0, timer=fast.timer) == pytest.approx(2.0)


def test_a_slow_model_fails_the_latency_gate() -> None:
    rows = np.zeros((3, 4), dtype=np.float32)
    slow = _FakeModel(lambda k: 0.008)
    latency = latency_p99_ms(slow, rows, timer=slow.timer)
    report = _report(_good(), latency_ms=latency)
    assert [g.reason() for g in report.failed()] == ["latency_p99 8.0 > 5.0"]


def test_latency_p99_with_the_real_clock_returns_a_time() -> None:
    value = latency_p99_ms(lambda row: row.sum(), np.ones((4, 3)), repeats=20, warmup=2)
    assert math.isfinite(value) and value >= 0.0


def test_latency_p99_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rows"):
        latency_p99_ms(lambda row: row, np.ones(3))
    with pytest.raises(ValueError, match="repeats"):
        latency_p99_ms(lambda row: row, np.ones((1, 3)), repeats=0)


# --------------------------------------------------------------------------- shadow / rollback

MARGIN = 0.02
ALPHA = 0.05


def _outcome(d: np.ndarray) -> str:
    """Shadow defaults: 300..3000 bars, blocks of the label horizon (5 bars)."""
    return paired_noninferiority(
        d, np.zeros_like(d), margin=MARGIN, alpha=ALPHA, min_samples=300, max_samples=3000, block=5
    ).outcome


def test_a_clearly_better_candidate_succeeds() -> None:
    d = np.random.default_rng(1).normal(-0.05, 0.1, 1000)
    verdict = paired_noninferiority(
        1.0 + d, np.ones(1000), margin=MARGIN, alpha=ALPHA, min_samples=300, max_samples=3000
    )
    assert verdict.outcome == "success"
    assert verdict.n == 600  # the last checkpoint reached: 300, 600, 1200, 2400, 3000
    assert verdict.level == pytest.approx(ALPHA / 5)
    assert verdict.upper < MARGIN
    assert verdict.p_value < verdict.level
    assert verdict.lower < verdict.mean_diff < verdict.upper


def test_a_clearly_worse_candidate_fails() -> None:
    d = np.random.default_rng(2).normal(0.1, 0.1, 400)
    verdict = paired_noninferiority(
        d, np.zeros(400), margin=MARGIN, alpha=ALPHA, min_samples=300, max_samples=3000
    )
    assert verdict.outcome == "failure"
    assert verdict.lower > 0


def test_an_equal_candidate_with_few_samples_is_inconclusive() -> None:
    verdict = paired_noninferiority(
        np.full(50, 0.7),
        np.full(50, 0.7),
        margin=MARGIN,
        alpha=ALPHA,
        min_samples=300,
        max_samples=3000,
    )
    assert verdict.outcome == "inconclusive"
    assert verdict.n == 50


def test_an_equal_candidate_at_max_samples_expires_when_noisy_and_succeeds_when_not() -> None:
    rng = np.random.default_rng(3)
    # Documented: equal losses end in "success" once t * se < margin, else "expired".
    assert _outcome(rng.normal(0.0, 2.0, 3000)) == "expired"
    assert _outcome(rng.normal(0.0, 2.0, 2000)) == "inconclusive"
    assert _outcome(rng.normal(0.0, 0.1, 3000)) == "success"


def test_the_verdict_changes_only_at_checkpoints() -> None:
    assert checkpoints(300, 3000) == [300, 600, 1200, 2400, 3000]
    assert checkpoints(300, 300) == [300]
    d = np.random.default_rng(7).normal(0.0, 0.5, 3000)
    at_600 = paired_noninferiority(
        d[:600], np.zeros(600), margin=MARGIN, alpha=ALPHA, min_samples=300, max_samples=3000
    )
    for n in (601, 900, 1199):
        later = paired_noninferiority(
            d[:n], np.zeros(n), margin=MARGIN, alpha=ALPHA, min_samples=300, max_samples=3000
        )
        assert later == at_600


def test_failure_is_checked_before_success() -> None:
    # Significantly worse (every bar +0.01) yet within the margin: failure wins.
    verdict = paired_noninferiority(
        np.full(400, 0.01),
        np.zeros(400),
        margin=MARGIN,
        alpha=ALPHA,
        min_samples=300,
        max_samples=3000,
    )
    assert verdict.outcome == "failure"
    assert verdict.lower == pytest.approx(0.01) and verdict.upper == pytest.approx(0.01)
    # For a rollback "worse by more than the margin" the caller moves the failure line.
    relaxed = paired_noninferiority(
        np.full(400, 0.01),
        np.zeros(400),
        margin=MARGIN,
        alpha=ALPHA,
        min_samples=300,
        max_samples=3000,
        failure_margin=MARGIN,
    )
    assert relaxed.outcome == "success"


def test_blocks_drop_the_incomplete_tail_and_non_finite_pairs() -> None:
    d = np.arange(35, dtype=np.float64)
    ref = np.zeros(37)
    cand = np.concatenate([[NAN], d[:20], [np.inf], d[20:]])
    ref[0] = 1.0
    verdict = paired_noninferiority(
        cand, ref, margin=MARGIN, alpha=ALPHA, min_samples=10, max_samples=100, sequential=False
    )
    assert DEFAULT_BLOCK == 10
    assert verdict.n == 35
    assert verdict.level == ALPHA
    assert verdict.mean_diff == pytest.approx(np.mean(np.arange(30)))  # 3 blocks of 10


def test_only_max_samples_pairs_are_looked_at() -> None:
    d = np.concatenate([np.zeros(3000), np.full(2000, 5.0)])
    for sequential in (True, False):
        verdict = paired_noninferiority(
            d,
            np.zeros_like(d),
            margin=MARGIN,
            alpha=ALPHA,
            min_samples=300,
            max_samples=3000,
            sequential=sequential,
        )
        assert verdict.n == 3000
        assert verdict.outcome == "success"  # identical losses: se 0, mean 0 < margin


def test_blocks_keep_autocorrelated_bars_from_overstating_confidence() -> None:
    # Each value repeated 10 times, as overlapping label windows do: per-bar blocks
    # (block=1) would see 10x the evidence there is; blocks of 10 see the real amount,
    # and the lag-1 correction widens the per-bar interval towards it.
    d = np.repeat(np.random.default_rng(4).normal(0.0, 0.3, 60), 10)
    blocked, per_bar = (
        paired_noninferiority(
            d,
            np.zeros_like(d),
            margin=MARGIN,
            alpha=ALPHA,
            min_samples=300,
            max_samples=3000,
            block=block,
            sequential=False,
        )
        for block in (10, 1)
    )
    assert blocked.mean_diff == pytest.approx(per_bar.mean_diff)
    naive_half = 1.6475 * np.std(d, ddof=1) / math.sqrt(d.size)  # t(599) at 95 %
    assert (per_bar.upper - per_bar.mean_diff) > 1.5 * naive_half
    assert (blocked.upper - blocked.mean_diff) > 2.5 * naive_half


def _autocorrelated_losses(rng: np.random.Generator, n: int, shift: float) -> np.ndarray:
    """Per-bar loss differences with the 5-bar overlap of a horizon-5 label."""
    shocks = rng.normal(0.0, 0.3, n + 4)
    return shift + np.convolve(shocks, np.ones(5) / math.sqrt(5), mode="valid")


def _shadow_runs(shift: float, trials: int, seed: int) -> dict[str, int]:
    """Seeded shadow runs looked at every 50 scored bars, as a daemon would, until a
    decisive verdict or max_samples; block = the label horizon (5)."""
    rng = np.random.default_rng(seed)
    counts = {"success": 0, "failure": 0, "expired": 0}
    for _ in range(trials):
        d = _autocorrelated_losses(rng, 3000, shift)
        for n in range(50, 3001, 50):
            outcome = _outcome(d[:n])
            if outcome != "inconclusive":
                counts[outcome] += 1
                break
    return counts


def test_false_promotion_rate_of_a_candidate_worse_by_twice_the_margin() -> None:
    counts = _shadow_runs(2 * MARGIN, trials=200, seed=5)
    assert counts["success"] <= ALPHA * 200
    assert counts["failure"] >= 0.8 * 200  # and it is mostly caught


def test_repeated_looks_keep_error_rates_near_alpha_at_the_boundaries() -> None:
    # Testing at level alpha on every look would give about 25 % here; the checkpoints
    # keep both errors near alpha (200 runs: within three binomial standard errors).
    trials = 200
    bound = ALPHA * trials + 3 * math.sqrt(ALPHA * (1 - ALPHA) * trials)
    # Worse by exactly the margin: promoted.
    assert _shadow_runs(MARGIN, trials=trials, seed=6)["success"] <= bound
    # Exactly as good: rejected, or rolled back.
    assert _shadow_runs(0.0, trials=trials, seed=8)["failure"] <= bound


def test_verdict_as_dict_is_json_ready() -> None:
    verdict = paired_noninferiority(
        np.zeros(5), np.zeros(5), margin=MARGIN, alpha=ALPHA, min_samples=10, max_samples=20
    )
    assert verdict.outcome == "inconclusive"
    assert math.isnan(verdict.lower)
    back = json.loads(json.dumps(verdict.as_dict(), allow_nan=False))
    assert back == {
        "outcome": "inconclusive",
        "n": 5,
        "mean_diff": None,
        "lower": None,
        "upper": None,
        "p_value": None,
        "level": pytest.approx(ALPHA / 2),
    }


@pytest.mark.parametrize(
    "kwargs",
    [
        {"margin": -0.1},
        {"failure_margin": NAN},
        {"alpha": 0.5},
        {"min_samples": 0},
        {"max_samples": 5},
        {"block": -1},
    ],
)
def test_paired_noninferiority_refuses_bad_arguments(kwargs: dict[str, float]) -> None:
    args: dict[str, float] = {
        "margin": MARGIN,
        "alpha": ALPHA,
        "min_samples": 10,
        "max_samples": 20,
    } | kwargs
    with pytest.raises(ValueError):
        paired_noninferiority(np.zeros(5), np.zeros(5), **args)  # type: ignore[arg-type]
