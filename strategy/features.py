"""Features: one definition, two evaluations (whole history and bar by bar).

A leaf module (numpy only at import; pandas and scipy are imported lazily by
the training-side helpers) so training workers can import it without the
serving code, and the serving process never pays for pandas or scipy.

``FeatureSpec`` names the ordered features and their parameters; its ``hash``
(names + parameters + ``FEATURES_VERSION``) is stored with every model and
checked at load and predict time. Bump ``FEATURES_VERSION`` whenever a formula
below changes.

Two evaluations of the same definitions:

- ``compute_features(spec, cols, ...)``: vectorised over a whole history
  (training, backtests); row ``i`` describes bar ``i`` using bars ``<= i``
  only; rows ``< spec.window - 1`` are NaN (warm-up).
- ``FeatureEngine.update(bar)``: per-symbol running state on the hot path
  (about 12 us per bar on this machine); returns row ``i`` once ``spec.window`` bars were seen.

Both give bit-identical float32 rows (``tests/test_features.py`` proves it on
long synthetic histories with gaps). Every feature is computed in float64 and
rounded to float32 once, at the end, and each path performs the *same IEEE
operations in the same order*:

- recursive features (Wilder ATR and RSI, MACD EMAs) are first-order filters
  ``y = a*x + (1-a)*y_prev`` seeded with ``y_prev = x_first``; the history
  path evaluates them with ``scipy.signal.lfilter``, which performs exactly
  that multiply/multiply/add per step;
- float window sums (returns, squared returns, order-flow) are recomputed
  over the window each bar, oldest first (``sum(deque, 0.0)``), and the
  history path adds the shifted arrays in the same order. Nothing is a
  running float sum, so there is no drift and nothing to re-seed;
- window statistics of prices, tick volume and spread run on integers
  (prices as integer points ``round(price / point)``): running sums are
  exact in Python ints and in wrap-around int64 cumulative sums alike;
- ``log`` and ``log1p`` are evaluated with ``math`` in both paths (numpy's
  SIMD ``log`` may differ in the last bit on some CPUs); time-of-day uses a
  1440-entry table shared by both paths.

The parity relies on CPython 3.11's plain left-to-right float ``sum`` (3.12
made it compensated); the parity test would catch a change.

Features across gaps (missing minutes, weekends): nothing is reset. Lagged
returns, ``mom_*`` and the true range span the gap (a weekend jump shows up as
a large return and true range, which Wilder's smoothing decays over about
``atr_period`` bars); windows count bars, not minutes; ``gap_bars_log`` says
how big the gap before the bar was. Both paths do exactly this.

The features (numbers in a name are fixed lags; windows without a number in
the name come from ``params``). ``atr``, ``atr_points`` and ``spread_points``
are in price/point units (the risk manager sizes stops from ``atr``); every
other feature is scale-free, so a model trained at one price level serves at
another:

==================  ======================================================
ret_1 .. ret_20     log return over 1, 2, 3, 5, 10, 20 bars
ret_tstat           mean / std of 1-bar log returns over ``vol_fast`` bars
vol_fast, vol_slow  std (population) of 1-bar log returns over the window
vol_ratio           vol_fast / vol_slow (1 when vol_slow is 0)
mom_5_atr           (close - close 5 bars ago) / atr
mom_20_atr          (close - close 20 bars ago) / atr
atr                 Wilder ATR in price units: TR smoothed with alpha 1/n,
                    seeded with the first bar's high - low
atr_points          atr / point
atr_pct             atr / close
rsi                 Wilder RSI (0..100; 50 when nothing moved)
macd_atr            (EMA fast - EMA slow of close) / atr
macd_signal_atr     EMA(macd_signal) of the MACD line / atr
macd_hist_atr       (MACD - signal) / atr
zclose              (close - mean) / std of close over ``z_window``
bb_pctb             Bollinger %B over ``bb_window`` with ``bb_k`` std
bb_width            Bollinger bandwidth (upper - lower) / middle
stoch_k, stoch_d    stochastic %K over ``stoch_k`` bars (0..100, 50 when the
                    range is 0) and its ``stoch_d``-bar mean
range_atr           (high - low) / atr
body_atr            (close - open) / atr
body_ratio          (close - open) / (high - low); 0 for a zero-range bar
upper_wick          (high - max(open, close)) / (high - low); 0 if no range
lower_wick          (min(open, close) - low) / (high - low); 0 if no range
tickvol_rel         tick volume / its mean over ``volume_window`` (1 if 0)
tickvol_z           z-score of tick volume over ``volume_window``
flow_1              signed order-flow pressure body_ratio * tickvol_rel
flow_fast           flow_1 summed over ``flow_fast`` bars
flow_slow           flow_1 summed over ``flow_slow`` bars
spread_points       bar spread in points (symbol default when it is 0)
spread_rel          spread / its mean over ``spread_window`` (1 if 0)
spread_atr          spread in price / atr (the cost of a round trip in ATRs)
tod_sin, tod_cos    time of day (UTC minute of the bar's open) on the circle
day_of_week         0 = Monday .. 6 = Sunday (UTC)
gap_bars_log        log1p(bars missing before this one); 0 without a gap
==================  ======================================================

Every division by a quantity that can be 0 (atr, range, std) yields the
stated neutral value instead, identically in both paths.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from market_data.bars import Bar

if TYPE_CHECKING:
    import pandas as pd

FEATURES_VERSION = 2

FEATURE_NAMES: tuple[str, ...] = (
    "ret_1",
    "ret_2",
    "ret_3",
    "ret_5",
    "ret_10",
    "ret_20",
    "ret_tstat",
    "vol_fast",
    "vol_slow",
    "vol_ratio",
    "mom_5_atr",
    "mom_20_atr",
    "atr",
    "atr_points",
    "atr_pct",
    "rsi",
    "macd_atr",
    "macd_signal_atr",
    "macd_hist_atr",
    "zclose",
    "bb_pctb",
    "bb_width",
    "stoch_k",
    "stoch_d",
    "range_atr",
    "body_atr",
    "body_ratio",
    "upper_wick",
    "lower_wick",
    "tickvol_rel",
    "tickvol_z",
    "flow_1",
    "flow_fast",
    "flow_slow",
    "spread_points",
    "spread_rel",
    "spread_atr",
    "tod_sin",
    "tod_cos",
    "day_of_week",
    "gap_bars_log",
)
_POSITION: dict[str, int] = {name: i for i, name in enumerate(FEATURE_NAMES)}

DEFAULT_PARAMS: Mapping[str, int | float] = {
    "atr_period": 14,
    "rsi_period": 14,
    "macd_fast": 12,
    "macd_slow": 26,
    "macd_signal": 9,
    "vol_fast": 20,
    "vol_slow": 60,
    "z_window": 50,
    "bb_window": 20,
    "bb_k": 2.0,
    "stoch_k": 14,
    "stoch_d": 3,
    "volume_window": 20,
    "spread_window": 60,
    "flow_fast": 3,
    "flow_slow": 10,
    "bar_seconds": 60,
}
# Smallest allowed value of each integer parameter (std needs two samples).
_MINIMUM: Mapping[str, int] = {
    "vol_fast": 2,
    "vol_slow": 2,
    "z_window": 2,
    "bb_window": 2,
    "volume_window": 2,
}
_RETURN_LAGS: tuple[int, ...] = (1, 2, 3, 5, 10, 20)
_MAX_LAG = 20
# EMA warm-up: bars until the seed's weight (1 - alpha)**k falls below this.
_SEED_WEIGHT = 1e-3

_MINUTES_PER_DAY = 1440
_ANGLE = 2.0 * np.pi * np.arange(_MINUTES_PER_DAY, dtype=np.float64) / _MINUTES_PER_DAY
_TOD_SIN_TABLE = np.sin(_ANGLE)
_TOD_COS_TABLE = np.cos(_ANGLE)
_TOD_SIN: tuple[float, ...] = tuple(_TOD_SIN_TABLE.tolist())
_TOD_COS: tuple[float, ...] = tuple(_TOD_COS_TABLE.tolist())
_NS_PER_S = 1_000_000_000
_NS_PER_MIN = 60 * _NS_PER_S
_NS_PER_DAY = 86_400 * _NS_PER_S
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _settle(alpha: float) -> int:
    """Bars until an EMA's seed weighs less than ``_SEED_WEIGHT``."""
    return math.ceil(math.log(_SEED_WEIGHT) / math.log(1.0 - alpha)) if alpha < 1.0 else 1


def _normalise_params(given: Mapping[str, Any]) -> dict[str, int | float]:
    unknown = sorted(set(given) - set(DEFAULT_PARAMS))
    if unknown:
        raise ValueError(f"unknown feature parameter(s) {unknown}; known: {sorted(DEFAULT_PARAMS)}")
    params: dict[str, int | float] = {}
    for key, default in DEFAULT_PARAMS.items():
        value = given.get(key, default)
        if isinstance(default, int):
            if isinstance(value, bool) or not float(value).is_integer():
                raise ValueError(f"feature parameter {key} must be an integer (got {value!r})")
            ivalue = int(value)
            if ivalue < _MINIMUM.get(key, 1):
                raise ValueError(
                    f"feature parameter {key} must be >= {_MINIMUM.get(key, 1)} (got {ivalue})"
                )
            params[key] = ivalue
        else:
            fvalue = float(value)
            if not (math.isfinite(fvalue) and fvalue > 0):
                raise ValueError(f"feature parameter {key} must be positive (got {value!r})")
            params[key] = fvalue
    return params


@dataclass(frozen=True)
class FeatureSpec:
    """Ordered feature names (any subset of ``FEATURE_NAMES``) and parameters.

    ``params`` may be partial: missing keys take ``DEFAULT_PARAMS`` (the
    stored mapping is always complete, so equal settings hash equal).
    """

    names: tuple[str, ...] = FEATURE_NAMES
    params: Mapping[str, int | float] = field(default_factory=lambda: dict(DEFAULT_PARAMS))
    _hash: str = field(init=False, repr=False, compare=False, default="")
    _window: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        names = tuple(self.names)
        if not names:
            raise ValueError("a feature spec needs at least one feature")
        unknown = [n for n in names if n not in _POSITION]
        if unknown:
            raise ValueError(f"unknown feature(s) {unknown}; known: {list(FEATURE_NAMES)}")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate feature names in {list(names)}")
        params = _normalise_params(self.params)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "params", params)
        payload = json.dumps(
            {"version": FEATURES_VERSION, "names": list(names), "params": params},
            sort_keys=True,
        )
        object.__setattr__(self, "_hash", hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16])
        object.__setattr__(self, "_window", _window_for(params))

    @property
    def hash(self) -> str:
        """Stable 16-hex-digit id of names + parameters + ``FEATURES_VERSION``."""
        return self._hash

    @property
    def window(self) -> int:
        """Bars needed before the first valid row: row ``window - 1`` is the first.

        The longest look-back plus the EMA warm-up (until each seed weighs
        less than 1e-3), so engines started at different bars agree closely.
        """
        return self._window

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(
                f"feature {name!r} is not in the feature spec {self.hash} ({len(self.names)} names)"
            ) from None


def _window_for(p: Mapping[str, int | float]) -> int:
    """Index of the first bar whose every feature is defined, plus one."""
    first_valid = max(
        _MAX_LAG,
        int(p["vol_slow"]),  # returns start at bar 1
        int(p["vol_fast"]),
        int(p["z_window"]) - 1,
        int(p["bb_window"]) - 1,
        int(p["stoch_k"]) + int(p["stoch_d"]) - 2,
        int(p["volume_window"]) + int(p["flow_slow"]) - 2,
        int(p["volume_window"]) + int(p["flow_fast"]) - 2,
        int(p["spread_window"]) - 1,
        _settle(1.0 / int(p["atr_period"])),
        1 + _settle(1.0 / int(p["rsi_period"])),
        _settle(2.0 / (max(int(p["macd_fast"]), int(p["macd_slow"])) + 1))
        + _settle(2.0 / (int(p["macd_signal"]) + 1)),
    )
    return first_valid + 1


# -- columns ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class BarColumns:
    """A bar history as numpy columns (time as int64 UTC nanoseconds).

    Validated on construction: equal lengths, strictly increasing times,
    finite positive prices.
    """

    time_ns: np.ndarray
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    tick_volume: np.ndarray
    spread: np.ndarray

    def __post_init__(self) -> None:
        conv: dict[str, np.ndarray] = {
            "time_ns": np.ascontiguousarray(self.time_ns, dtype=np.int64),
            "open": np.ascontiguousarray(self.open, dtype=np.float64),
            "high": np.ascontiguousarray(self.high, dtype=np.float64),
            "low": np.ascontiguousarray(self.low, dtype=np.float64),
            "close": np.ascontiguousarray(self.close, dtype=np.float64),
            "tick_volume": _as_int64("tick_volume", self.tick_volume),
            "spread": _as_int64("spread", self.spread),
        }
        n = conv["time_ns"].shape[0]
        for name, arr in conv.items():
            if arr.ndim != 1 or arr.shape[0] != n:
                raise ValueError(
                    f"BarColumns.{name} has shape {arr.shape}, expected ({n},) like time_ns"
                )
            object.__setattr__(self, name, arr)
        if n > 1:
            steps = np.diff(conv["time_ns"])
            if (steps <= 0).any():
                at = int(np.argmax(steps <= 0)) + 1
                raise ValueError(
                    f"bar times must be strictly increasing: row {at} is not after row {at - 1}"
                )
        for name in ("open", "high", "low", "close"):
            bad = ~(np.isfinite(conv[name]) & (conv[name] > 0))
            if bad.any():
                at = int(np.argmax(bad))
                raise ValueError(
                    f"BarColumns.{name} must be finite and positive: row {at} is {conv[name][at]}"
                )

    def __len__(self) -> int:
        return int(self.time_ns.shape[0])

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> BarColumns:
        """Columns from the canonical frame (``market_data.bars.BAR_COLUMNS``)."""
        import pandas as pd  # lazy: the serving process never needs it

        missing = [c for c in ("time", "open", "high", "low", "close") if c not in frame.columns]
        if missing:
            raise ValueError(f"bar frame is missing column(s) {missing}")
        times = pd.DatetimeIndex(frame["time"])
        if times.tz is None:
            raise ValueError("bar frame 'time' must be UTC-aware (datetime64[ns, UTC])")
        n = len(frame)
        zeros = np.zeros(n, dtype=np.int64)
        return cls(
            time_ns=times.tz_convert("UTC").as_unit("ns").asi8.copy(),
            open=frame["open"].to_numpy(dtype=np.float64),
            high=frame["high"].to_numpy(dtype=np.float64),
            low=frame["low"].to_numpy(dtype=np.float64),
            close=frame["close"].to_numpy(dtype=np.float64),
            tick_volume=frame["tick_volume"].to_numpy() if "tick_volume" in frame else zeros,
            spread=frame["spread"].to_numpy() if "spread" in frame else zeros,
        )

    @classmethod
    def from_bars(cls, bars: Iterable[Bar]) -> BarColumns:
        items = list(bars)
        micros = [(b.time - _EPOCH) // _ONE_MICROSECOND for b in items]
        return cls(
            time_ns=np.array(micros, dtype=np.int64) * 1000,
            open=np.array([b.open for b in items], dtype=np.float64),
            high=np.array([b.high for b in items], dtype=np.float64),
            low=np.array([b.low for b in items], dtype=np.float64),
            close=np.array([b.close for b in items], dtype=np.float64),
            tick_volume=np.array([b.tick_volume for b in items], dtype=np.int64),
            spread=np.array([b.spread for b in items], dtype=np.int64),
        )


def _as_int64(name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.kind == "f" and (not np.isfinite(arr).all() or (arr != np.rint(arr)).any()):
        raise ValueError(f"BarColumns.{name} must hold whole numbers")
    return np.ascontiguousarray(arr, dtype=np.int64)


_ONE_MICROSECOND = datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC) - _EPOCH


# -- the history (vectorised) path ----------------------------------------------------


def _ema(x: np.ndarray, alpha: float) -> np.ndarray:
    """``y = alpha*x + (1-alpha)*y_prev`` with ``y_prev = x[0]``, as the engine does it."""
    from scipy.signal import lfilter  # lazy: serving never imports scipy

    if x.size == 0:
        return x.copy()
    beta = 1.0 - alpha
    y, _ = lfilter([alpha], [1.0, -beta], x, zi=[beta * x[0]])
    return np.asarray(y, dtype=np.float64)


def _wsum(x: np.ndarray, w: int) -> np.ndarray:
    """Window sums added oldest first from 0.0 (like ``sum(deque, 0.0)``); NaN before."""
    n = x.shape[0]
    out = np.full(n, np.nan)
    if n >= w:
        m = n - w + 1
        acc = np.zeros(m)
        for j in range(w):
            acc += x[j : j + m]
        out[w - 1 :] = acc
    return out


def _isum(x: np.ndarray, w: int) -> np.ndarray:
    """Exact int64 window sums (wrap-around cumsum differences); 0 before the window fills."""
    n = x.shape[0]
    out = np.zeros(n, dtype=np.int64)
    if n >= w:
        cs = np.concatenate(([0], np.cumsum(x, dtype=np.int64)))
        out[w - 1 :] = cs[w:] - cs[: n - w + 1]
    return out


def _lag(x: np.ndarray, k: int) -> np.ndarray:
    out = np.full(x.shape[0], np.nan)
    if x.shape[0] > k:
        out[k:] = x[:-k]
    return out


def _div(num: np.ndarray, den: np.ndarray, neutral: float) -> np.ndarray:
    """``num / den`` where ``den > 0``, else ``neutral`` (NaN den stays NaN)."""
    out = np.full(num.shape[0], neutral)
    np.divide(num, den, out=out, where=den > 0)
    out[np.isnan(den)] = np.nan
    return out


def _window_z(x: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact integer window stats: (w*x - S1, w*S2 - S1**2, S1) as int64; valid from w-1."""
    s1 = _isum(x, w)
    s2 = _isum(x * x, w)
    return w * x - s1, w * s2 - s1 * s1, s1


def _all_features(
    cols: BarColumns, p: Mapping[str, int | float], point: float, default_spread: int
) -> np.ndarray:
    """Every feature in ``FEATURE_NAMES`` order, float64, shape (n_features, n)."""
    n = len(cols)
    o, h, lo, c = cols.open, cols.high, cols.low, cols.close
    f: dict[str, np.ndarray] = {}
    nan = np.full(n, np.nan)

    lc = np.fromiter(map(math.log, c.tolist()), dtype=np.float64, count=n)
    for k in _RETURN_LAGS:
        f[f"ret_{k}"] = lc - _lag(lc, k)
    r = lc - _lag(lc, 1)
    q = r * r
    vols: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key in ("vol_fast", "vol_slow"):
        w = int(p[key])
        s1 = _wsum(r, w)
        s2 = _wsum(q, w)
        m = s1 / w
        var = s2 / w - m * m
        vol = np.where(var > 0, np.sqrt(np.where(var > 0, var, 0.0)), 0.0)
        vol[np.isnan(var)] = np.nan
        vols[key] = (m, vol)
    m_fast, vol_fast = vols["vol_fast"]
    vol_slow = vols["vol_slow"][1]
    f["ret_tstat"] = _div(m_fast, vol_fast, 0.0)
    f["vol_fast"] = vol_fast
    f["vol_slow"] = vol_slow
    f["vol_ratio"] = _div(vol_fast, vol_slow, 1.0)

    # Wilder ATR: TR seeded with the first bar's range.
    c1 = _lag(c, 1)
    tr = np.empty(n)
    if n:
        tr[0] = h[0] - lo[0]
        tr[1:] = np.maximum(h[1:], c1[1:]) - np.minimum(lo[1:], c1[1:])
    atr = _ema(tr, 1.0 / int(p["atr_period"]))
    f["mom_5_atr"] = _div(c - _lag(c, 5), atr, 0.0)
    f["mom_20_atr"] = _div(c - _lag(c, 20), atr, 0.0)
    f["atr"] = atr
    f["atr_points"] = atr / point
    f["atr_pct"] = atr / c

    # Wilder RSI from bar 1.
    d = c - c1
    gain = np.where(d > 0, d, 0.0)
    loss = np.where(d < 0, -d, 0.0)
    rsi = nan.copy()
    if n > 1:
        a_rsi = 1.0 / int(p["rsi_period"])
        ag = _ema(gain[1:], a_rsi)
        al = _ema(loss[1:], a_rsi)
        rsi[1:] = _div(100.0 * ag, ag + al, 50.0)
    f["rsi"] = rsi

    ema_fast = _ema(c, 2.0 / (int(p["macd_fast"]) + 1))
    ema_slow = _ema(c, 2.0 / (int(p["macd_slow"]) + 1))
    macd = ema_fast - ema_slow
    signal = _ema(macd, 2.0 / (int(p["macd_signal"]) + 1))
    f["macd_atr"] = _div(macd, atr, 0.0)
    f["macd_signal_atr"] = _div(signal, atr, 0.0)
    f["macd_hist_atr"] = _div(macd - signal, atr, 0.0)

    # Close statistics on integer points (exact sums; any reference cancels).
    cp = np.rint(c / point).astype(np.int64)
    x = cp - cp[0] if n else cp
    zw, bw = int(p["z_window"]), int(p["bb_window"])
    num, vn, _ = _window_z(x, zw)
    zclose = _div(num.astype(np.float64), np.sqrt(np.maximum(vn, 0).astype(np.float64)), 0.0)
    zclose[: zw - 1] = np.nan
    f["zclose"] = zclose
    num_b, vn_b, s1_b = _window_z(x, bw)
    sd_b = np.sqrt(np.maximum(vn_b, 0).astype(np.float64))
    z_b = _div(num_b.astype(np.float64), sd_b, 0.0)
    k2 = 2.0 * float(p["bb_k"])
    pctb = 0.5 + z_b / k2
    sum_cp = (bw * cp[0] + s1_b if n else s1_b).astype(np.float64)
    width = _div(k2 * sd_b, sum_cp, 0.0)
    pctb[: bw - 1] = np.nan
    width[: bw - 1] = np.nan
    f["bb_pctb"] = pctb
    f["bb_width"] = width

    sk, sd = int(p["stoch_k"]), int(p["stoch_d"])
    kline = nan.copy()
    if n >= sk:
        from numpy.lib.stride_tricks import sliding_window_view

        hh = nan.copy()
        ll = nan.copy()
        hh[sk - 1 :] = sliding_window_view(h, sk).max(axis=1)
        ll[sk - 1 :] = sliding_window_view(lo, sk).min(axis=1)
        kline = _div(100.0 * (c - ll), hh - ll, 50.0)
    f["stoch_k"] = kline
    f["stoch_d"] = _wsum(kline, sd) / sd

    rng = h - lo
    body = c - o
    body_ratio = _div(body, rng, 0.0)
    f["range_atr"] = _div(rng, atr, 0.0)
    f["body_atr"] = _div(body, atr, 0.0)
    f["body_ratio"] = body_ratio
    f["upper_wick"] = _div(h - np.maximum(o, c), rng, 0.0)
    f["lower_wick"] = _div(np.minimum(o, c) - lo, rng, 0.0)

    tv = cols.tick_volume
    vw = int(p["volume_window"])
    tnum, tvn, t1 = _window_z(tv, vw)
    tv_rel = _div((tv * vw).astype(np.float64), t1.astype(np.float64), 1.0)
    tv_z = _div(tnum.astype(np.float64), np.sqrt(np.maximum(tvn, 0).astype(np.float64)), 0.0)
    tv_rel[: vw - 1] = np.nan
    tv_z[: vw - 1] = np.nan
    f["tickvol_rel"] = tv_rel
    f["tickvol_z"] = tv_z
    flow = body_ratio * tv_rel
    f["flow_1"] = flow
    f["flow_fast"] = _wsum(flow, int(p["flow_fast"]))
    f["flow_slow"] = _wsum(flow, int(p["flow_slow"]))

    sp = np.where(cols.spread > 0, cols.spread, np.int64(default_spread))
    sw = int(p["spread_window"])
    sp_f = sp.astype(np.float64)
    sp_rel = _div((sp * sw).astype(np.float64), _isum(sp, sw).astype(np.float64), 1.0)
    sp_rel[: sw - 1] = np.nan
    f["spread_points"] = sp_f
    f["spread_rel"] = sp_rel
    f["spread_atr"] = _div(sp_f * point, atr, 0.0)

    t = cols.time_ns
    minute = (t // _NS_PER_MIN) % _MINUTES_PER_DAY
    f["tod_sin"] = _TOD_SIN_TABLE[minute]
    f["tod_cos"] = _TOD_COS_TABLE[minute]
    f["day_of_week"] = ((t // _NS_PER_DAY + 3) % 7).astype(np.float64)
    gap = np.zeros(n)
    if n > 1:
        bs = int(p["bar_seconds"])
        missing = np.diff(t) // _NS_PER_S - bs
        at = np.flatnonzero(missing > 0)
        gap[at + 1] = [math.log1p(v / bs) for v in missing[at].tolist()]
    f["gap_bars_log"] = gap

    return np.stack([f[name] for name in FEATURE_NAMES]) if n else np.empty((len(f), 0))


def compute_features(
    spec: FeatureSpec, cols: BarColumns, *, point: float, default_spread_points: int
) -> np.ndarray:
    """Feature rows for a whole history: (n, n_features) float32 in ``spec.names`` order.

    Row ``i`` describes bar ``i`` (bars ``<= i`` only) and equals what
    ``FeatureEngine.update`` returns for that bar when fed the same bars from
    the start; rows ``< spec.window - 1`` are NaN (warm-up).
    """
    if not point > 0:
        raise ValueError(f"point must be positive (got {point!r})")
    with np.errstate(all="ignore"):
        full = _all_features(cols, spec.params, float(point), int(default_spread_points))
    idx = [_POSITION[name] for name in spec.names]
    out = np.ascontiguousarray(full[idx].T, dtype=np.float32)
    out[: spec.window - 1] = np.nan
    return out


def atr_series(cols: BarColumns, period: int) -> np.ndarray:
    """The ``atr`` feature in float64 for every bar (labels are scaled by it)."""
    n = len(cols)
    tr = np.empty(n)
    if n:
        tr[0] = cols.high[0] - cols.low[0]
        tr[1:] = np.maximum(cols.high[1:], cols.close[:-1]) - np.minimum(
            cols.low[1:], cols.close[:-1]
        )
    return _ema(tr, 1.0 / int(period))


def effective_spread_points(cols: BarColumns, default_spread_points: int) -> np.ndarray:
    """The ``spread_points`` feature as int64 (the symbol default where a bar says 0)."""
    return np.where(cols.spread > 0, cols.spread, np.int64(default_spread_points))


# -- the serving (incremental) path ---------------------------------------------------


class FeatureEngine:
    """Per-symbol serving state, updated once per closed bar.

    ``update`` returns a fresh float32 row (the caller may keep it) once
    ``spec.window`` bars have been seen, ``None`` before. Bars must arrive in
    strictly increasing time order (``ValueError`` otherwise, state unchanged).
    """

    def __init__(self, spec: FeatureSpec, *, point: float, default_spread_points: int) -> None:
        if not point > 0:
            raise ValueError(f"point must be positive (got {point!r})")
        p = spec.params
        self.spec = spec
        self._point = float(point)
        self._default_spread = int(default_spread_points)
        self._window = spec.window
        order = [_POSITION[name] for name in spec.names]
        self._select = None if tuple(spec.names) == FEATURE_NAMES else np.array(order)
        self._count = 0
        self._prev_time: datetime | None = None
        self._c1 = 0.0
        self._lc1 = 0.0
        self._ref = 0
        # Filters: y = a*x + b*y_prev.
        self._a_atr = 1.0 / int(p["atr_period"])
        self._b_atr = 1.0 - self._a_atr
        self._a_rsi = 1.0 / int(p["rsi_period"])
        self._b_rsi = 1.0 - self._a_rsi
        self._a_f = 2.0 / (int(p["macd_fast"]) + 1)
        self._b_f = 1.0 - self._a_f
        self._a_s = 2.0 / (int(p["macd_slow"]) + 1)
        self._b_s = 1.0 - self._a_s
        self._a_g = 2.0 / (int(p["macd_signal"]) + 1)
        self._b_g = 1.0 - self._a_g
        self._atr = 0.0
        self._ag = 0.0
        self._al = 0.0
        self._ef = 0.0
        self._es = 0.0
        self._sig = 0.0
        self._vf = int(p["vol_fast"])
        self._vs = int(p["vol_slow"])
        self._zw = int(p["z_window"])
        self._bw = int(p["bb_window"])
        self._k2 = 2.0 * float(p["bb_k"])
        self._sk = int(p["stoch_k"])
        self._sd = int(p["stoch_d"])
        self._vw = int(p["volume_window"])
        self._sw = int(p["spread_window"])
        self._bs = int(p["bar_seconds"])
        self._lcq: deque[float] = deque(maxlen=_MAX_LAG + 1)
        self._cq: deque[float] = deque(maxlen=_MAX_LAG + 1)
        self._r_f: deque[float] = deque(maxlen=self._vf)
        self._q_f: deque[float] = deque(maxlen=self._vf)
        self._r_s: deque[float] = deque(maxlen=self._vs)
        self._q_s: deque[float] = deque(maxlen=self._vs)
        self._xq: deque[int] = deque(maxlen=max(self._zw, self._bw))
        self._z1 = self._z2 = self._b1 = self._b2 = 0
        self._hq: deque[float] = deque(maxlen=self._sk)
        self._lq: deque[float] = deque(maxlen=self._sk)
        self._kq: deque[float] = deque(maxlen=self._sd)
        self._tvq: deque[int] = deque(maxlen=self._vw)
        self._t1 = self._t2 = 0
        self._fq_f: deque[float] = deque(maxlen=int(p["flow_fast"]))
        self._fq_s: deque[float] = deque(maxlen=int(p["flow_slow"]))
        self._spq: deque[int] = deque(maxlen=self._sw)
        self._p1 = 0

    @property
    def ready(self) -> bool:
        return self._count >= self._window

    @property
    def count(self) -> int:
        """Bars seen so far."""
        return self._count

    def update(self, bar: Bar) -> np.ndarray | None:
        """Add a closed bar; return its feature row once warm (a new array each call)."""
        t = bar.time
        o = bar.open
        h = bar.high
        lo = bar.low
        c = bar.close
        tv = bar.tick_volume
        sp = bar.spread
        if sp <= 0:
            sp = self._default_spread
        if not (o > 0 and h > 0 and lo > 0 and c > 0) or math.isinf(h):
            raise ValueError(f"{bar.symbol} bar at {t}: prices must be finite and positive")
        prev = self._prev_time
        n = self._count
        gap = 0.0
        if prev is not None:
            if t <= prev:
                raise ValueError(f"{bar.symbol} bar at {t} is not after the previous bar at {prev}")
            delta = t - prev
            missing = delta.days * 86400 + delta.seconds - self._bs
            if missing > 0:
                gap = math.log1p(missing / self._bs)
        lc = math.log(c)
        cp = round(c / self._point)

        if n == 0:
            tr = h - lo
            self._atr = tr
            self._ef = self._es = c
            self._ref = cp
        else:
            c1 = self._c1
            tr = (h if h > c1 else c1) - (lo if lo < c1 else c1)
            d = c - c1
            g = d if d > 0 else 0.0
            ls = -d if d < 0 else 0.0
            if n == 1:
                self._ag = g
                self._al = ls
            self._ag = self._a_rsi * g + self._b_rsi * self._ag
            self._al = self._a_rsi * ls + self._b_rsi * self._al
            r = lc - self._lc1
            q = r * r
            self._r_f.append(r)
            self._q_f.append(q)
            self._r_s.append(r)
            self._q_s.append(q)
        atr = self._atr = self._a_atr * tr + self._b_atr * self._atr
        ef = self._ef = self._a_f * c + self._b_f * self._ef
        es = self._es = self._a_s * c + self._b_s * self._es
        macd = ef - es
        if n == 0:
            self._sig = macd
        sig = self._sig = self._a_g * macd + self._b_g * self._sig

        lcq = self._lcq
        cq = self._cq
        lcq.append(lc)
        cq.append(c)

        # Close window sums on integer points.
        x = cp - self._ref
        xq = self._xq
        size = len(xq)
        zw = self._zw
        bw = self._bw
        if size >= zw:
            old = xq[-zw]
            self._z1 -= old
            self._z2 -= old * old
        if size >= bw:
            old = xq[-bw]
            self._b1 -= old
            self._b2 -= old * old
        xq.append(x)
        z1 = self._z1 = self._z1 + x
        z2 = self._z2 = self._z2 + x * x
        b1 = self._b1 = self._b1 + x
        b2 = self._b2 = self._b2 + x * x

        # Stochastic.
        hq = self._hq
        lq = self._lq
        hq.append(h)
        lq.append(lo)
        if len(hq) == self._sk:
            hh = max(hq)
            ll = min(lq)
            self._kq.append(100.0 * (c - ll) / (hh - ll) if hh > ll else 50.0)

        # Tick volume, body and flow.
        tvq = self._tvq
        vw = self._vw
        if len(tvq) == vw:
            old = tvq[0]
            self._t1 -= old
            self._t2 -= old * old
        tvq.append(tv)
        t1 = self._t1 = self._t1 + tv
        t2 = self._t2 = self._t2 + tv * tv
        rng = h - lo
        body = c - o
        body_ratio = body / rng if rng > 0 else 0.0
        tv_rel = math.nan  # placeholder while the volume window fills (never in a row)
        if len(tvq) == vw:
            tv_rel = float(tv * vw) / float(t1) if t1 > 0 else 1.0
        flow = body_ratio * tv_rel
        self._fq_f.append(flow)
        self._fq_s.append(flow)

        # Spread.
        spq = self._spq
        sw = self._sw
        if len(spq) == sw:
            self._p1 -= spq[0]
        spq.append(sp)
        p1 = self._p1 = self._p1 + sp

        self._prev_time = t
        self._c1 = c
        self._lc1 = lc
        self._count = n + 1
        if n + 1 < self._window:
            return None

        # -- the row (only once warm) --
        vf = self._vf
        m_f = sum(self._r_f, 0.0) / vf
        var = sum(self._q_f, 0.0) / vf - m_f * m_f
        vol_f = math.sqrt(var) if var > 0 else 0.0
        vs = self._vs
        m_s = sum(self._r_s, 0.0) / vs
        var = sum(self._q_s, 0.0) / vs - m_s * m_s
        vol_s = math.sqrt(var) if var > 0 else 0.0
        pos = atr > 0
        vn = zw * z2 - z1 * z1
        zclose = float(zw * x - z1) / math.sqrt(float(vn)) if vn > 0 else 0.0
        vn = bw * b2 - b1 * b1
        sd_b = math.sqrt(float(vn)) if vn > 0 else 0.0
        z_b = float(bw * x - b1) / sd_b if sd_b > 0 else 0.0
        sum_cp = float(bw * self._ref + b1)
        tvn = vw * t2 - t1 * t1
        fq_f = self._fq_f
        kq = self._kq
        minute = t.hour * 60 + t.minute
        sp_f = float(sp)
        values = [
            lc - lcq[-2],
            lc - lcq[-3],
            lc - lcq[-4],
            lc - lcq[-6],
            lc - lcq[-11],
            lc - lcq[-21],
            m_f / vol_f if vol_f > 0 else 0.0,
            vol_f,
            vol_s,
            vol_f / vol_s if vol_s > 0 else 1.0,
            (c - cq[-6]) / atr if pos else 0.0,
            (c - cq[-21]) / atr if pos else 0.0,
            atr,
            atr / self._point,
            atr / c,
            100.0 * self._ag / (self._ag + self._al) if self._ag + self._al > 0 else 50.0,
            macd / atr if pos else 0.0,
            sig / atr if pos else 0.0,
            (macd - sig) / atr if pos else 0.0,
            zclose,
            0.5 + z_b / self._k2,
            self._k2 * sd_b / sum_cp if sum_cp > 0 else 0.0,
            kq[-1],
            sum(kq, 0.0) / self._sd,
            rng / atr if pos else 0.0,
            body / atr if pos else 0.0,
            body_ratio,
            (h - (o if o > c else c)) / rng if rng > 0 else 0.0,
            ((o if o < c else c) - lo) / rng if rng > 0 else 0.0,
            tv_rel,
            float(vw * tv - t1) / math.sqrt(float(tvn)) if tvn > 0 else 0.0,
            flow,
            sum(fq_f, 0.0),
            sum(self._fq_s, 0.0),
            sp_f,
            float(sp * sw) / float(p1) if p1 > 0 else 1.0,
            sp_f * self._point / atr if pos else 0.0,
            _TOD_SIN[minute],
            _TOD_COS[minute],
            float(t.weekday()),
            gap,
        ]
        row = np.array(values, dtype=np.float32)
        if self._select is not None:
            return row[self._select]
        return row
