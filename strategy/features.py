"""Features: pure functions from a window of bars to a row of named float32 values.

A leaf module (numpy only) so training workers can import it without the
serving code. ``FeatureSpec`` names the ordered features and their parameters;
its ``hash`` is stored with every model and checked at load and predict time.
``FeatureEngine`` keeps a per-symbol window and yields one row per closed bar;
``compute_rows`` computes the rows for a whole history (training) through the
same window function, so serving and training cannot disagree.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from market_data.bars import Bar

_FEATURE_NAMES: tuple[str, ...] = (
    "ret_1",
    "ret_3",
    "ret_5",
    "ret_10",
    "mom_5_atr",
    "atr",
    "atr_points",
    "vol_20",
    "zclose_20",
    "rsi_14",
    "body_ratio",
    "range_atr",
    "ofi_3",
    "tickvol_rel_20",
    "spread_points",
    "hour_sin",
    "hour_cos",
)


@dataclass(frozen=True)
class FeatureSpec:
    names: tuple[str, ...] = _FEATURE_NAMES
    params: Mapping[str, int] = field(
        default_factory=lambda: {"atr_period": 14, "rsi_period": 14, "z_window": 20}
    )

    @property
    def window(self) -> int:
        """Bars of history one row needs (the longest look-back plus one)."""
        return max(11, *self.params.values()) + 1

    @property
    def hash(self) -> str:
        payload = json.dumps(
            {"names": list(self.names), "params": dict(self.params)}, sort_keys=True
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"feature {name!r} is not in the feature spec {self.hash}") from None


def _row(
    spec: FeatureSpec,
    o: np.ndarray,
    h: np.ndarray,
    lo: np.ndarray,
    c: np.ndarray,
    tv: np.ndarray,
    spread: float,
    point: float,
    when: datetime,
) -> np.ndarray:
    """One feature row from the last ``spec.window`` bars (oldest first)."""
    atr_n = spec.params["atr_period"]
    rsi_n = spec.params["rsi_period"]
    z_n = spec.params["z_window"]
    logc = np.log(c)
    prev_c = c[:-1]
    tr = np.maximum(h[1:], prev_c) - np.minimum(lo[1:], prev_c)
    atr = float(tr[-atr_n:].mean())
    rets = np.diff(logc)
    vol = float(rets[-z_n:].std())
    closes_z = c[-z_n:]
    std_z = float(closes_z.std())
    delta = np.diff(c[-(rsi_n + 1) :])
    gains = float(delta[delta > 0].sum())
    losses = float(-delta[delta < 0].sum())
    rsi = 50.0 if gains + losses == 0 else 100.0 * gains / (gains + losses)
    rng = h - lo
    body = np.divide(c - o, rng, out=np.zeros_like(c), where=rng > 0)
    tv_mean = float(tv[-z_n:].mean())
    tv_rel = tv / tv_mean if tv_mean > 0 else np.ones_like(tv)
    hour = when.hour + when.minute / 60.0
    values = {
        "ret_1": logc[-1] - logc[-2],
        "ret_3": logc[-1] - logc[-4],
        "ret_5": logc[-1] - logc[-6],
        "ret_10": logc[-1] - logc[-11],
        "mom_5_atr": (c[-1] - c[-6]) / atr if atr > 0 else 0.0,
        "atr": atr,
        "atr_points": atr / point,
        "vol_20": vol,
        "zclose_20": (c[-1] - closes_z.mean()) / std_z if std_z > 0 else 0.0,
        "rsi_14": rsi,
        "body_ratio": body[-1],
        "range_atr": rng[-1] / atr if atr > 0 else 0.0,
        "ofi_3": float((body[-3:] * tv_rel[-3:]).sum()),
        "tickvol_rel_20": tv_rel[-1],
        "spread_points": spread,
        "hour_sin": math.sin(2 * math.pi * hour / 24.0),
        "hour_cos": math.cos(2 * math.pi * hour / 24.0),
    }
    return np.array([values[name] for name in spec.names], dtype=np.float32)


class FeatureEngine:
    """Per-symbol serving state: a fixed window of the latest bars."""

    def __init__(self, spec: FeatureSpec, *, point: float, default_spread_points: int) -> None:
        self.spec = spec
        self._point = point
        self._default_spread = float(default_spread_points)
        n = spec.window
        self._buf = np.zeros((5, n), dtype=np.float64)  # open, high, low, close, tick volume
        self._count = 0

    @property
    def ready(self) -> bool:
        return self._count >= self.spec.window

    def update(self, bar: Bar) -> np.ndarray | None:
        """Add a closed bar; return its feature row once the window is full."""
        buf = self._buf
        buf[:, :-1] = buf[:, 1:]
        buf[:, -1] = (bar.open, bar.high, bar.low, bar.close, bar.tick_volume)
        self._count += 1
        if not self.ready:
            return None
        spread = float(bar.spread) if bar.spread > 0 else self._default_spread
        return _row(
            self.spec, buf[0], buf[1], buf[2], buf[3], buf[4], spread, self._point, bar.time
        )


def compute_rows(
    spec: FeatureSpec, bars: list[Bar], *, point: float, default_spread_points: int
) -> np.ndarray:
    """Feature rows for a whole history: row i describes bar i (NaN while warming up)."""
    engine = FeatureEngine(spec, point=point, default_spread_points=default_spread_points)
    out = np.full((len(bars), len(spec.names)), np.nan, dtype=np.float32)
    for i, bar in enumerate(bars):
        row = engine.update(bar)
        if row is not None:
            out[i] = row
    return out
