"""Validation gates for retrained candidates, and the paired test for shadow and rollback.

A retrained model kind is scored on a time-ordered holdout beside the production
model and the baseline predictor. :func:`evaluate` turns their class probabilities
(down/flat/up = classes 0/1/2) into :class:`Gate` results: holdout accuracy and
log-loss floors, not worse than production, a cost-aware simulated run
(:func:`simulate_holdout`) and single-row latency. :func:`paired_noninferiority`
decides, from per-bar log-losses scored on live bars, whether a shadow candidate
may be promoted and whether a freshly promoted model must be rolled back.

numpy and scipy only (scipy.special, imported when first needed): the serving
process and spawn workers import this module, so it pulls in neither pandas,
scikit-learn nor torch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Literal

import numpy as np

from ml.metrics import EquityMetrics, TradeMetrics, equity_metrics, trade_metrics

if TYPE_CHECKING:
    from config.settings import ValidationSettings

__all__ = [
    "DEFAULT_BLOCK",
    "LOG_LOSS_EPS",
    "Gate",
    "SimCosts",
    "SimResult",
    "ValidationReport",
    "Verdict",
    "checkpoints",
    "evaluate",
    "holdout_metrics",
    "json_safe",
    "latency_p99_ms",
    "paired_noninferiority",
    "per_row_log_loss",
    "signal_sides",
    "simulate_holdout",
]

N_CLASSES = 3
DOWN, FLAT, UP = 0, 1, 2
# Probabilities are clipped here before the log: one confident miss costs
# -ln(1e-12) = 27.6 nats instead of infinity.
LOG_LOSS_EPS = 1e-12
# Block size of paired_noninferiority when the caller gives block=0 (bars).
DEFAULT_BLOCK = 10


# --------------------------------------------------------------------------- helpers


def _proba_2d(proba: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(proba, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != N_CLASSES:
        raise ValueError(f"{name} must have shape (rows, 3) (down/flat/up), got {arr.shape}")
    return arr


def _vector(values: np.ndarray, name: str, rows: int) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.shape[0] != rows:
        raise ValueError(f"{name} must be one-dimensional with {rows} rows, got shape {arr.shape}")
    return arr


def _labels(y: np.ndarray, rows: int, scored: np.ndarray) -> np.ndarray:
    """``y`` as int64; every scored row must hold a class 0, 1 or 2."""
    raw = _vector(y, "y", rows)
    sub = raw[scored]
    bad = ~np.isin(sub, (DOWN, FLAT, UP))
    if bad.any():
        value = sub[np.flatnonzero(bad)[0]]
        raise ValueError(f"y must hold classes 0/1/2 on scored rows, got {value!r}")
    out = np.zeros(rows, dtype=np.int64)
    out[scored] = sub.astype(np.int64)
    return out


def _finite_rows(proba: np.ndarray) -> np.ndarray:
    return np.isfinite(proba).all(axis=1)


def json_safe(value: object) -> object:
    """``value`` with every float made JSON-safe: nan -> None, +-inf -> "inf"/"-inf".

    Recurses into dicts, lists and tuples (tuples become lists); numpy scalars
    become Python numbers, so ``json.dumps(..., allow_nan=False)`` accepts the result.
    """
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        x = float(value)
        if math.isnan(x):
            return None
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return x
    return value


def _fmt(x: float) -> str:
    """5 significant digits, whole numbers with one decimal: -1.8, -1.0, 0.003, 30.0."""
    if not math.isfinite(x):
        return str(x)
    rounded = float(f"{x:.5g}")
    if rounded.is_integer() and abs(rounded) < 1e6:
        return f"{rounded:.1f}"
    return f"{rounded:.5g}"


# --------------------------------------------------------------------------- holdout


def per_row_log_loss(proba: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``-ln p(realised class)`` per row, probabilities clipped at ``LOG_LOSS_EPS``.

    ``nan`` on rows whose probabilities are not all finite (no prediction: e.g. a
    sequence model still filling its window); ``y`` on those rows is not looked at.

    Raises:
        ValueError: ``proba`` not of shape (rows, 3), ``y`` of another length, or a
            scored row whose label is not 0, 1 or 2.
    """
    p = _proba_2d(proba, "proba")
    ok = _finite_rows(p)
    labels = _labels(y, p.shape[0], ok)
    out = np.full(p.shape[0], np.nan, dtype=np.float64)
    picked = p[np.flatnonzero(ok), labels[ok]]
    out[ok] = -np.log(np.clip(picked, LOG_LOSS_EPS, 1.0))
    return out


def holdout_metrics(proba: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy and log-loss on the rows with a prediction, beside the majority-class rate.

    Rows whose probabilities are not all finite are skipped. Keys: ``accuracy``
    (argmax equals the label; ties go to the lower class, as ``argmax`` does),
    ``log_loss`` (mean of :func:`per_row_log_loss`), ``majority_rate`` (share of the
    most frequent class among the scored rows: what always guessing it would
    score) and ``holdout_rows`` (scored rows, as a float).

    Raises:
        ValueError: no row has a prediction, or the inputs are malformed (see
            :func:`per_row_log_loss`).
    """
    p = _proba_2d(proba, "proba")
    ok = _finite_rows(p)
    if not ok.any():
        raise ValueError("no holdout row has a prediction (test part shorter than the window?)")
    labels = _labels(y, p.shape[0], ok)
    scored_p, scored_y = p[ok], labels[ok]
    losses = -np.log(np.clip(scored_p[np.arange(scored_y.size), scored_y], LOG_LOSS_EPS, 1.0))
    counts = np.bincount(scored_y, minlength=N_CLASSES)
    return {
        "accuracy": float(np.mean(scored_p.argmax(axis=1) == scored_y)),
        "log_loss": float(np.mean(losses)),
        "majority_rate": float(counts.max() / counts.sum()),
        "holdout_rows": float(scored_y.size),
    }


# --------------------------------------------------------------------------- simulation


@dataclass(frozen=True)
class SimCosts:
    """Contract and strategy parameters of the simulated holdout run.

    * ``point``: price of one point (``symbols.<S>.point``).
    * ``contract_size``: units per lot (``symbols.<S>.contract_size``).
    * ``commission_per_lot``: per lot **per side**, in account currency; the
      account currency is assumed to be the profit (quote) currency, so it is
      turned into a fraction of notional by dividing by ``contract_size * price``.
    * ``default_spread_points``: used on bars whose spread is <= 0 or not finite
      (the live strategy does the same with a zero spread).
    * ``min_confidence``: ``strategy.min_confidence``.
    * ``horizon``: bars a trade is held (``models.horizon_bars``).
    * ``periods_per_year``: bars per year of the timeframe, to annualise Sharpe.
    """

    point: float
    contract_size: float
    commission_per_lot: float
    default_spread_points: int
    min_confidence: float
    horizon: int
    periods_per_year: float

    def __post_init__(self) -> None:
        checks = (
            ("point", self.point, math.isfinite(self.point) and self.point > 0, "> 0"),
            (
                "contract_size",
                self.contract_size,
                math.isfinite(self.contract_size) and self.contract_size > 0,
                "> 0",
            ),
            (
                "commission_per_lot",
                self.commission_per_lot,
                math.isfinite(self.commission_per_lot) and self.commission_per_lot >= 0,
                ">= 0",
            ),
            (
                "default_spread_points",
                self.default_spread_points,
                self.default_spread_points >= 0,
                ">= 0",
            ),
            (
                "min_confidence",
                self.min_confidence,
                0.0 <= self.min_confidence <= 1.0,
                "within [0, 1]",
            ),
            (
                "horizon",
                self.horizon,
                not isinstance(self.horizon, bool)
                and int(self.horizon) == self.horizon
                and self.horizon >= 1,
                "a positive whole number of bars",
            ),
            (
                "periods_per_year",
                self.periods_per_year,
                math.isfinite(self.periods_per_year) and self.periods_per_year > 0,
                "> 0",
            ),
        )
        for name, value, ok, rule in checks:
            if not ok:
                raise ValueError(f"SimCosts.{name} must be {rule} (got {value!r})")


@dataclass(frozen=True)
class SimResult:
    """Outcome of :func:`simulate_holdout`.

    ``net_returns[t]`` is trade ``t``'s net return as a fraction of its entry
    notional; ``net_pnl`` their sum (not compounded); ``n_trades`` their count.
    ``trades`` are :func:`ml.metrics.trade_metrics` of ``net_returns`` (exposure =
    bars held / holdout bars) and ``equity`` are :func:`ml.metrics.equity_metrics`
    of ``equity_curve`` (one point before the first bar, then one per bar).
    ``entry_rows`` and ``sides`` (+1 long, -1 short) say where each trade opened.
    """

    trades: TradeMetrics
    equity: EquityMetrics
    net_returns: np.ndarray
    n_trades: int
    net_pnl: float
    entry_rows: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    sides: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    equity_curve: np.ndarray = field(default_factory=lambda: np.ones(1, dtype=np.float64))

    def as_dict(self) -> dict[str, float]:
        """``n_trades``, ``net_pnl`` and every trade and equity metric, as floats."""
        out: dict[str, float] = {"n_trades": float(self.n_trades), "net_pnl": float(self.net_pnl)}
        for key, value in (*self.trades.as_dict().items(), *self.equity.as_dict().items()):
            out[key] = float(value)
        return out


def signal_sides(proba: np.ndarray, min_confidence: float) -> np.ndarray:
    """+1 (buy), -1 (sell) or 0 per row, by the live strategy's entry rule.

    Buy when ``p_up >= min_confidence and p_up > p_down``; sell when
    ``p_down >= min_confidence and p_down > p_up`` (``ScalperStrategy._signal``).
    Rows with a non-finite probability give 0.
    """
    p = _proba_2d(proba, "proba")
    ok = _finite_rows(p)
    with np.errstate(invalid="ignore"):
        p_down, p_up = p[:, DOWN], p[:, UP]
        buy = ok & (p_up >= min_confidence) & (p_up > p_down)
        sell = ok & (p_down >= min_confidence) & (p_down > p_up)
    return buy.astype(np.int64) - sell.astype(np.int64)


def simulate_holdout(
    proba: np.ndarray, close: np.ndarray, spread_points: np.ndarray, costs: SimCosts
) -> SimResult:
    """Cost-aware run of the live entry rule over the holdout, one position at a time.

    Rows ``i`` are consecutive closed bars: ``close`` is the bar's bid close and
    ``spread_points`` its spread (<= 0 or non-finite -> ``default_spread_points``).

    Choices, made to follow the live strategy with ``max_positions_per_symbol = 1``:

    * **Entry rule**: exactly the live one (:func:`signal_sides`): buy when
      ``p_up >= min_confidence and p_up > p_down``, sell symmetrically. This is the
      argmax rule whenever up or down is the most likely class; it also enters when
      flat is (narrowly) the most likely but up or down still clears
      ``min_confidence``, as the live strategy does, and it never enters on a tie
      between up and down. Rows with non-finite probabilities never enter.
    * **Timing**: entry at bar ``i``'s close, exit at bar ``i + horizon``'s close;
      a row without bar ``i + horizon`` in the holdout does not trade. No entry
      while a position is open; at the exit bar a new position may open at once
      (live, exits are managed before entries on the same bar). Exits are by
      horizon only: no SL/TP, opposite-signal exit or risk filters (spread cap,
      session hours), which need prices inside the bar or account state.
    * **Prices**: closes are bids. A long buys at the ask ``close[i] + spread[i] *
      point`` and sells at the bid ``close[i + horizon]``; a short sells at the bid
      ``close[i]`` and buys back at the ask ``close[i + horizon] + spread[i +
      horizon] * point``. So a long pays the entry bar's spread, a short the exit
      bar's. No slippage.
    * **Net return** of a trade, a fraction of its entry notional (entry price =
      the price it was entered at): ``price P&L / entry price - 2 *
      commission_per_lot / (contract_size * entry price)``.
    * **Equity**: starts at 1.0 with one point before the first bar, then one point
      per bar (``n`` bars give ``n`` periods for ``equity_metrics`` with
      ``periods_per_year``). Each trade commits the whole equity (full-notional
      compounding) and is **marked to market** at every bar it is open, at its
      liquidation value: what closing at that bar's close would return, both
      commissions and the closing spread included. So the entry bar already shows
      the spread and commission paid, drawdowns inside a trade count, and the
      exit bar's point equals the realised equity. Between trades equity is flat.
    * **Ruin**: if the equity would reach <= 0, the position is liquidated at that
      bar (its net return is that bar's liquidation return), the curve ends there
      and no further trade is taken (``equity_metrics`` accepts a last point <= 0).

    Raises:
        ValueError: shapes that disagree, or a ``close`` that is not finite and
            positive (the holdout's bars must be clean).
    """
    p = _proba_2d(proba, "proba")
    n = p.shape[0]
    c = _vector(close, "close", n)
    if n and not (np.isfinite(c).all() and (c > 0).all()):
        idx = int(np.flatnonzero(~(np.isfinite(c) & (c > 0)))[0])
        raise ValueError(f"close must be finite and > 0, got {c[idx]!r} at row {idx}")
    raw_spread = _vector(spread_points, "spread_points", n)
    spread_ok = np.isfinite(raw_spread) & (raw_spread > 0)
    spread = np.where(spread_ok, raw_spread, float(costs.default_spread_points)) * costs.point
    h = int(costs.horizon)

    sides = signal_sides(p, costs.min_confidence)
    candidates = np.flatnonzero(sides[: max(n - h, 0)])

    curve = np.empty(n + 1, dtype=np.float64)
    curve[0] = 1.0
    realised = 1.0
    filled = 0  # curve[:filled + 1] is written; curve[k + 1] is the equity after bar k
    entries: list[int] = []
    trade_sides: list[int] = []
    returns: list[float] = []
    held: list[int] = []
    next_free = 0
    ruined = False
    for i in candidates.tolist():
        if i < next_free:
            continue
        side = int(sides[i])
        j = i + h
        if side > 0:
            entry = c[i] + spread[i]
            liquidation = (c[i : j + 1] - entry) / entry
        else:
            entry = c[i]
            liquidation = (entry - (c[i : j + 1] + spread[i : j + 1])) / entry
        liquidation = liquidation - 2.0 * costs.commission_per_lot / (costs.contract_size * entry)
        values = realised * (1.0 + liquidation)
        curve[filled + 1 : i + 1] = realised
        broke = np.flatnonzero(values <= 0.0)
        stop = int(broke[0]) if broke.size else h
        curve[i + 1 : i + stop + 2] = values[: stop + 1]
        entries.append(i)
        trade_sides.append(side)
        returns.append(float(liquidation[stop]))
        held.append(stop)
        realised = float(values[stop])
        filled = i + stop + 1
        next_free = j
        if broke.size:
            ruined = True
            break
    if ruined:
        curve = curve[: filled + 1]
    else:
        curve[filled + 1 :] = realised

    net_returns = np.asarray(returns, dtype=np.float64)
    if n:
        trades = trade_metrics(net_returns, bars_held=np.asarray(held, np.float64), total_bars=n)
    else:
        trades = trade_metrics(net_returns)
    return SimResult(
        trades=trades,
        equity=equity_metrics(curve, periods_per_year=costs.periods_per_year),
        net_returns=net_returns,
        n_trades=int(net_returns.size),
        net_pnl=float(net_returns.sum()),
        entry_rows=np.asarray(entries, dtype=np.int64),
        sides=np.asarray(trade_sides, dtype=np.int64),
        equity_curve=curve,
    )


# --------------------------------------------------------------------------- latency


def latency_p99_ms(
    predict_one: Callable[[np.ndarray], object],
    rows: np.ndarray,
    *,
    repeats: int = 200,
    warmup: int = 20,
    timer: Callable[[], float] = time.perf_counter,
) -> float:
    """99th percentile of single-row call time of ``predict_one``, in milliseconds.

    ``rows`` is (n, features); calls cycle over its rows (``rows[k % n]``), the first
    ``warmup`` untimed, the next ``repeats`` each timed by two ``timer()`` readings
    (seconds; ``time.perf_counter`` unless a test injects a fake one). The
    percentile interpolates linearly (numpy's default). A stateful predictor (a
    sequence model's window) is the caller's to prepare.

    Raises:
        ValueError: ``rows`` not 2-D with at least one row, ``repeats < 1`` or
            ``warmup < 0``.
    """
    arr = np.asarray(rows)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"rows must be (n, features) with n >= 1, got shape {arr.shape}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1 (got {repeats})")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0 (got {warmup})")
    n = arr.shape[0]
    for k in range(warmup):
        predict_one(arr[k % n])
    samples_ms = np.empty(repeats, dtype=np.float64)
    for k in range(repeats):
        row = arr[(warmup + k) % n]
        started = timer()
        predict_one(row)
        samples_ms[k] = (timer() - started) * 1000.0
    return float(np.percentile(samples_ms, 99))


# --------------------------------------------------------------------------- gates


@dataclass(frozen=True)
class Gate:
    """One validation gate: ``value op threshold`` must hold (``op`` is ">=" or "<=")."""

    name: str
    value: float
    threshold: float
    passed: bool
    op: str

    def as_dict(self) -> dict[str, object]:
        """JSON-ready: nan -> None, +-inf -> "inf"/"-inf"."""
        return {
            "name": self.name,
            "value": json_safe(self.value),
            "threshold": json_safe(self.threshold),
            "passed": bool(self.passed),
            "op": self.op,
        }

    def reason(self) -> str:
        """Why the gate failed, e.g. ``sim_sharpe -1.8 < -1.0`` ("" if it passed)."""
        if self.passed:
            return ""
        if math.isnan(self.value) or math.isnan(self.threshold):
            return f"{self.name} {_fmt(self.value)} (needs {self.op} {_fmt(self.threshold)})"
        broken = "<" if self.op == ">=" else ">"
        return f"{self.name} {_fmt(self.value)} {broken} {_fmt(self.threshold)}"


def _gate(name: str, value: float, op: str, threshold: float, lo: float, hi: float) -> Gate:
    """``value op threshold``; nan fails unless the threshold is vacuous.

    ``[lo, hi]`` is the range the metric can take. A threshold at or beyond that
    range's edge (``>= lo`` with ``threshold <= lo``, ``<= hi`` with ``threshold >=
    hi``) accepts every possible value, so the gate is vacuous and passes even a nan
    value: e.g. ``min_win_rate = 0`` with no trades (win rate nan). A nan threshold
    (e.g. a production model with no comparable rows) fails.
    """
    value, threshold = float(value), float(threshold)
    if op == ">=":
        vacuous = threshold <= lo
        holds = value >= threshold
    elif op == "<=":
        vacuous = threshold >= hi
        holds = value <= threshold
    else:  # pragma: no cover - internal misuse
        raise ValueError(f"op must be '>=' or '<=', got {op!r}")
    return Gate(name=name, value=value, threshold=threshold, passed=bool(holds or vacuous), op=op)


@dataclass(frozen=True)
class ValidationReport:
    """Every gate's result and the metrics behind them (see :func:`evaluate`)."""

    gates: tuple[Gate, ...]
    metrics: dict[str, float]

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def failed(self) -> list[Gate]:
        return [g for g in self.gates if not g.passed]

    def reasons(self) -> str:
        """Failed gates on one line, e.g. ``sim_sharpe -1.8 < -1.0; beat_baseline
        -0.003 < 0.0``; "" when every gate passed."""
        return "; ".join(g.reason() for g in self.failed())

    def as_dict(self) -> dict[str, object]:
        """JSON-ready (for the journal): nan -> None, +-inf -> "inf"/"-inf"."""
        return {
            "passed": self.passed,
            "reasons": self.reasons(),
            "gates": [g.as_dict() for g in self.gates],
            "metrics": json_safe(self.metrics),
        }


def _safe_holdout(proba: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """:func:`holdout_metrics`, or nan metrics and 0 rows when no row has a prediction."""
    p = _proba_2d(proba, "proba")
    if not _finite_rows(p).any():
        nan = math.nan
        return {"accuracy": nan, "log_loss": nan, "majority_rate": nan, "holdout_rows": 0.0}
    return holdout_metrics(p, y)


def _prefixed(prefix: str, values: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in values.items()}


def evaluate(
    *,
    candidate: np.ndarray,
    y: np.ndarray,
    close: np.ndarray,
    spread_points: np.ndarray,
    costs: SimCosts,
    settings: ValidationSettings,
    production: np.ndarray | None = None,
    baseline: np.ndarray | None = None,
    latency_ms: float | None = None,
) -> ValidationReport:
    """Run every validation gate on a candidate's holdout probabilities.

    All arrays cover the same holdout rows (consecutive closed bars, time order);
    ``production`` and ``baseline`` are those predictors' probabilities on them.
    Gates, in this order (``settings`` fields in brackets):

    * ``accuracy_edge``: accuracy - majority rate >= [min_accuracy_edge].
    * ``log_loss``: holdout log-loss <= [max_log_loss].
    * ``vs_production_accuracy`` (with ``production``): candidate accuracy >=
      production accuracy - [max_accuracy_drop].
    * ``vs_production_log_loss`` (with ``production``): candidate log-loss <=
      production log-loss + [max_log_loss_increase].
      Both production comparisons use only the rows where **both** models have
      finite probabilities, so the gate's value may differ from ``accuracy`` /
      ``log_loss`` in the metrics; with no such row both gates fail (nan).
    * ``sim_trades``: simulated trades >= [min_trades].
    * ``sim_sharpe``: simulated Sharpe >= [min_sharpe].
    * ``sim_max_drawdown``: maximum drawdown in percent (positive) <= [max_drawdown_pct].
    * ``sim_win_rate``: >= [min_win_rate]; ``sim_profit_factor``: >= [min_profit_factor].
    * ``beat_baseline`` (when [beat_baseline] and ``baseline`` given): candidate
      simulated ``net_pnl`` - baseline's >= 0.
    * ``latency_p99`` (with ``latency_ms``): <= [max_latency_p99_ms].

    A nan value fails its gate unless the threshold sits at the edge of the
    metric's range and so accepts everything (``min_win_rate = 0`` and
    ``min_profit_factor = 0``, the defaults, with no trades; ``min_trades = 0``;
    ``min_accuracy_edge = -1``). Comparisons are exact (no tolerance).

    ``metrics``: the candidate's holdout metrics (``accuracy``, ``log_loss``,
    ``majority_rate``, ``holdout_rows``, ``accuracy_edge``) and simulation
    (``sim_`` + :meth:`SimResult.as_dict` keys), ``latency_p99_ms`` when given;
    with ``production``: ``production_`` + its holdout metrics on its own finite
    rows, ``production_sim_...`` and ``vs_production_rows``; with ``baseline``:
    ``baseline_`` and ``baseline_sim_...`` likewise. Production and baseline
    holdout metrics are nan (rows 0) when they predict on no row.

    Raises:
        ValueError: the candidate predicts on no row, or inputs are malformed.
    """
    cand = _proba_2d(candidate, "candidate")
    n = cand.shape[0]
    s = settings
    metrics: dict[str, float] = {}
    gates: list[Gate] = []

    hold = holdout_metrics(cand, y)
    edge = hold["accuracy"] - hold["majority_rate"]
    metrics.update(hold)
    metrics["accuracy_edge"] = edge
    gates.append(_gate("accuracy_edge", edge, ">=", s.min_accuracy_edge, -1.0, 1.0))
    gates.append(_gate("log_loss", hold["log_loss"], "<=", s.max_log_loss, 0.0, math.inf))

    prod = None if production is None else _proba_2d(production, "production")
    if prod is not None:
        if prod.shape[0] != n:
            raise ValueError(f"production has {prod.shape[0]} rows but candidate has {n}")
        metrics.update(_prefixed("production_", _safe_holdout(prod, y)))
        both = _finite_rows(cand) & _finite_rows(prod)
        metrics["vs_production_rows"] = float(both.sum())
        if both.any():
            c_common = holdout_metrics(cand[both], np.asarray(y)[both])
            p_common = holdout_metrics(prod[both], np.asarray(y)[both])
            c_acc, p_acc = c_common["accuracy"], p_common["accuracy"]
            c_ll, p_ll = c_common["log_loss"], p_common["log_loss"]
        else:
            c_acc = p_acc = c_ll = p_ll = math.nan
        gates.append(
            _gate("vs_production_accuracy", c_acc, ">=", p_acc - s.max_accuracy_drop, 0.0, 1.0)
        )
        gates.append(
            _gate(
                "vs_production_log_loss",
                c_ll,
                "<=",
                p_ll + s.max_log_loss_increase,
                0.0,
                math.inf,
            )
        )

    sim = simulate_holdout(cand, close, spread_points, costs)
    metrics.update(_prefixed("sim_", sim.as_dict()))
    gates.append(_gate("sim_trades", sim.n_trades, ">=", s.min_trades, 0.0, math.inf))
    gates.append(_gate("sim_sharpe", sim.equity.sharpe, ">=", s.min_sharpe, -math.inf, math.inf))
    drawdown_pct = -100.0 * sim.equity.max_drawdown
    gates.append(_gate("sim_max_drawdown", drawdown_pct, "<=", s.max_drawdown_pct, 0.0, math.inf))
    gates.append(_gate("sim_win_rate", sim.trades.win_rate, ">=", s.min_win_rate, 0.0, 1.0))
    gates.append(
        _gate(
            "sim_profit_factor",
            sim.trades.profit_factor,
            ">=",
            s.min_profit_factor,
            0.0,
            math.inf,
        )
    )

    if prod is not None:
        prod_sim = simulate_holdout(prod, close, spread_points, costs)
        metrics.update(_prefixed("production_sim_", prod_sim.as_dict()))

    if baseline is not None:
        base = _proba_2d(baseline, "baseline")
        if base.shape[0] != n:
            raise ValueError(f"baseline has {base.shape[0]} rows but candidate has {n}")
        metrics.update(_prefixed("baseline_", _safe_holdout(base, y)))
        base_sim = simulate_holdout(base, close, spread_points, costs)
        metrics.update(_prefixed("baseline_sim_", base_sim.as_dict()))
        if s.beat_baseline:
            diff = sim.net_pnl - base_sim.net_pnl
            gates.append(_gate("beat_baseline", diff, ">=", 0.0, -math.inf, math.inf))

    if latency_ms is not None:
        metrics["latency_p99_ms"] = float(latency_ms)
        gates.append(_gate("latency_p99", latency_ms, "<=", s.max_latency_p99_ms, 0.0, math.inf))

    return ValidationReport(gates=tuple(gates), metrics=metrics)


# --------------------------------------------------------------------------- shadow / rollback


Outcome = Literal["success", "failure", "inconclusive", "expired"]


@dataclass(frozen=True)
class Verdict:
    """Outcome of :func:`paired_noninferiority` and the numbers behind it.

    * ``n``: the pairs the verdict rests on: the last checkpoint reached (see
      :func:`paired_noninferiority`), or every finite pair while fewer than
      ``min_samples`` exist.
    * ``mean_diff``: mean of ``candidate - reference`` loss over those pairs'
      complete blocks.
    * ``lower`` / ``upper``: one-sided ``1 - level`` confidence bounds of that mean.
    * ``p_value``: of the non-inferiority null "the candidate is worse by
      ``margin`` or more"; success iff ``p_value < level`` and no failure.
    * ``level``: the one-sided level each look uses (``alpha`` divided by the
      number of checkpoints).

    The numbers are nan when fewer than two blocks exist.
    """

    outcome: Outcome
    n: int
    mean_diff: float
    lower: float
    upper: float
    p_value: float
    level: float = math.nan

    def as_dict(self) -> dict[str, object]:
        """JSON-ready: nan -> None, +-inf -> "inf"/"-inf"."""
        return {f.name: json_safe(getattr(self, f.name)) for f in fields(self)}


def checkpoints(min_samples: int, max_samples: int) -> list[int]:
    """Where :func:`paired_noninferiority` looks: ``min_samples`` doubling, then ``max_samples``.

    E.g. 300, 600, 1200, 2400, 3000 for the defaults (five looks).
    """
    out: list[int] = []
    at = min_samples
    while at < max_samples:
        out.append(at)
        at *= 2
    out.append(max_samples)
    return out


def paired_noninferiority(
    candidate_loss: np.ndarray,
    reference_loss: np.ndarray,
    *,
    margin: float,
    alpha: float,
    min_samples: int,
    max_samples: int,
    block: int = 0,
    failure_margin: float = 0.0,
    sequential: bool = True,
) -> Verdict:
    """Is the candidate not worse than the reference, per-bar loss paired by bar?

    ``d = candidate_loss - reference_loss`` per scored bar (per-bar log-loss of the
    realised class, :func:`per_row_log_loss`; lower is better), in time order.
    Pairs where either loss is not finite are dropped.

    **Repeated looks.** The caller re-runs this as bars are scored. Testing at
    level ``alpha`` on every call would promote a candidate that is worse by the
    margin, or roll back an equal model, far more often than ``alpha`` (a
    simulation with a look every 10 bars from 300 to 3000 gave about 25 % instead
    of 5 %). So with ``sequential=True`` (the default) the test looks only at fixed
    :func:`checkpoints` (``min_samples``, doubling, then ``max_samples``): the
    verdict rests on the first ``c`` pairs for the last checkpoint ``c`` reached
    and stays the same between checkpoints however often it is asked; each look
    uses level ``alpha / K`` for ``K`` checkpoints (Bonferroni), so over the whole
    run a false success and a false failure each stay within ``alpha``. With
    ``sequential=False`` it is a single fixed-sample test at level ``alpha`` on
    the first ``max_samples`` pairs (for one-off analyses).

    **Autocorrelation.** Consecutive bars share most of their label window, so
    ``d`` is cut into non-overlapping blocks of ``block`` bars (``block=0`` ->
    ``DEFAULT_BLOCK`` = 10; give at least the label horizon), from the first pair
    on, an incomplete last block left out. The ``m`` block means get a one-sample
    t interval: ``se = std(ddof=1) / sqrt(m)``, inflated by ``sqrt(1 + 2 r1)`` when
    the block means' lag-1 autocorrelation ``r1`` is positive (blocks only as long
    as the horizon are still correlated with their neighbours; never deflated),
    ``lower/upper = mean -/+ t_{1-level, m-1} * se``.

    Outcome, checked in this order:

    1. fewer than ``min_samples`` pairs (or fewer than two blocks): "inconclusive";
    2. "failure" when the candidate is significantly worse: ``lower >
       failure_margin`` (default 0: worse at all; for a rollback "worse by more than
       rollback_margin" pass ``failure_margin=rollback_margin``);
    3. "success" when ``upper < margin``: not worse by ``margin`` or more;
    4. otherwise "expired" once ``max_samples`` pairs are in, else "inconclusive".

    A candidate exactly as good as the reference ends in "success" when the
    bound is tight enough (``t * se < margin``) by the last checkpoint, and in
    "expired" when the noise is too large for ``max_samples`` bars to show it.

    Raises:
        ValueError: arrays not 1-D of equal length, ``margin`` or
            ``failure_margin`` < 0 or not finite, ``alpha`` outside (0, 0.5),
            ``min_samples < 1``, ``max_samples < min_samples`` or ``block < 0``.
    """
    cand = np.asarray(candidate_loss, dtype=np.float64)
    ref = np.asarray(reference_loss, dtype=np.float64)
    if cand.ndim != 1 or cand.shape != ref.shape:
        raise ValueError(
            f"candidate_loss and reference_loss must be 1-D of equal length, got "
            f"{cand.shape} and {ref.shape}"
        )
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be finite and >= 0 (got {margin!r})")
    if not (math.isfinite(failure_margin) and failure_margin >= 0):
        raise ValueError(f"failure_margin must be finite and >= 0 (got {failure_margin!r})")
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha must be within (0, 0.5) (got {alpha!r})")
    if min_samples < 1 or max_samples < min_samples:
        raise ValueError(
            f"need 1 <= min_samples <= max_samples (got {min_samples!r}, {max_samples!r})"
        )
    if block < 0:
        raise ValueError(f"block must be >= 0 bars (got {block!r})")
    size = block or DEFAULT_BLOCK

    d = cand - ref
    d = d[np.isfinite(d)]
    if sequential:
        looks = checkpoints(min_samples, max_samples)
        level = alpha / len(looks)
        reached = [c for c in looks if c <= d.size]
        d = d[: reached[-1]] if reached else d
    else:
        level = alpha
        d = d[:max_samples]
    n = int(d.size)
    mean_diff, lower, upper, p_value = _block_bounds(d, size, level, margin)

    def verdict(outcome: Outcome) -> Verdict:
        return Verdict(outcome, n, mean_diff, lower, upper, p_value, level)

    if n < min_samples or n // size < 2:
        return verdict("expired" if n >= max_samples else "inconclusive")
    if lower > failure_margin:
        return verdict("failure")
    if upper < margin:
        return verdict("success")
    return verdict("expired" if n >= max_samples else "inconclusive")


def _block_bounds(
    d: np.ndarray, size: int, level: float, margin: float
) -> tuple[float, float, float, float]:
    """(mean, lower, upper, p-value vs ``margin``) from block means; nan below 2 blocks."""
    m = d.size // size
    if m < 2:
        return math.nan, math.nan, math.nan, math.nan
    from scipy.special import stdtr, stdtrit

    means = d[: m * size].reshape(m, size).mean(axis=1)
    mean = float(means.mean())
    centred = means - mean
    sum_sq = float(centred @ centred)
    if sum_sq == 0.0:  # every block mean equal: the bounds collapse onto the mean
        return mean, mean, mean, (0.0 if mean < margin else 1.0)
    lag1 = float(centred[1:] @ centred[:-1]) / sum_sq
    se = math.sqrt(sum_sq / (m - 1) / m) * math.sqrt(max(1.0, 1.0 + 2.0 * lag1))
    dof = m - 1
    half = float(stdtrit(dof, 1.0 - level)) * se
    p_value = float(stdtr(dof, (mean - margin) / se))
    return mean, mean - half, mean + half, p_value
