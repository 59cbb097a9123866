"""Per-bar decision time of the strategy and replay throughput of the paper daemon.

Two variants side by side in one run:
- ``tight``: feature update + every predictor + ensemble for one bar, in a loop
  over pre-generated bars (no journal, no broker): the decision's own cost;
- ``daemon``: the real daemon (start_daemon + serve) replaying the synthetic
  market as fast as possible into a temporary journal: decision time as the
  strategy measures it inside the event loop, the whole bar (exits, risk,
  orders, journal awaits), and bars per second end to end.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from config.settings import load_settings
from main import serve, start_daemon
from market_data.bars import iter_bars
from market_data.synthetic import SyntheticMarket
from ml.predictor_map import PredictorMap
from strategy.baseline import MomentumBaseline
from strategy.ensemble import predict_all
from strategy.features import FeatureEngine, FeatureSpec
from utils.logsetup import configure_logging


@dataclass(frozen=True)
class Results:
    bars: int
    tight_us: np.ndarray
    daemon_decision_us: np.ndarray
    daemon_bar_us: np.ndarray
    daemon_bars: int
    daemon_seconds: float
    trades: int


def _tight(n_bars: int) -> np.ndarray:
    spec = FeatureSpec()
    frame = SyntheticMarket(seed=11).generate(n_bars)
    bars = list(iter_bars(frame, "EURUSD"))
    engine = FeatureEngine(spec, point=1e-5, default_spread_points=10)
    pm = PredictorMap()
    pm.swap("EURUSD", "baseline", MomentumBaseline(spec))
    out = np.empty(len(bars))
    k = 0
    clock = time.perf_counter_ns
    for bar in bars:
        t0 = clock()
        row = engine.update(bar)
        if row is None:
            continue
        predict_all(pm.snapshot("EURUSD"), row, {}, clock)
        out[k] = (clock() - t0) / 1000.0
        k += 1
    return out[:k]


async def run(tmp: Path, *, quick: bool) -> Results:
    n_bars = 3_000 if quick else 50_000
    tight = _tight(n_bars)
    env = {
        "SCALPER__STORAGE__JOURNAL_PATH": str(tmp / "bench.sqlite3"),
        "SCALPER__PAPER__REPLAY_BARS_PER_S": "0",
        "SCALPER__LOGGING__LEVEL": "WARNING",
        "SCALPER__RISK__KILL_SWITCH_PATH": str(tmp / "KILL"),
        "SCALPER__STORAGE__MODELS_DIR": str(tmp / "models"),
        # The baseline path: models are measured in bench/models.py.
        **{f"SCALPER__MODELS__{k}__ENABLED": "false" for k in ("RF", "XGB", "LSTM", "MLP")},
    }
    settings = load_settings(environ=env)
    configure_logging(settings.logging.level, settings.logging.format)
    daemon = await start_daemon(settings, max_bars=n_bars)
    t0 = time.perf_counter()
    try:
        await serve(daemon, install_signals=False, command_poll_s=None)
    finally:
        daemon.journal.close()
    seconds = time.perf_counter() - t0
    status = daemon.strategy.status
    return Results(
        bars=n_bars,
        tight_us=tight,
        daemon_decision_us=np.array(status.decision_us),
        daemon_bar_us=np.array(status.bar_us),
        daemon_bars=daemon.engine.stats.bars,
        daemon_seconds=seconds,
        trades=status.entries,
    )


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def summary_lines(r: Results) -> list[str]:
    return [
        f"decision tight loop   p50 {_pct(r.tight_us, 50):8.1f} us  "
        f"p99 {_pct(r.tight_us, 99):8.1f} us",
        f"decision in daemon    p50 {_pct(r.daemon_decision_us, 50):8.1f} us  "
        f"p99 {_pct(r.daemon_decision_us, 99):8.1f} us",
        f"whole bar in daemon   p50 {_pct(r.daemon_bar_us, 50):8.1f} us  "
        f"p99 {_pct(r.daemon_bar_us, 99):8.1f} us",
        f"replay                {r.daemon_bars / r.daemon_seconds:8.0f} bars/s "
        f"({r.daemon_bars} bars, {r.trades} entries, {r.daemon_seconds:.1f} s)",
    ]


def render(r: Results) -> str:
    rows = [
        ("decision, tight loop (features + baseline + ensemble)", r.tight_us),
        ("decision inside the running daemon", r.daemon_decision_us),
        ("whole bar inside the daemon (exits, risk, orders, journal)", r.daemon_bar_us),
    ]
    lines = [
        "## Strategy decision time per bar and replay throughput",
        "",
        f"Synthetic EURUSD M1, {r.bars:,} bars, baseline predictor, paper broker, "
        "journal on local disk (`bench/decision.py`).",
        "",
        "| what | p50 µs | p99 µs | max µs |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, values in rows:
        lines.append(
            f"| {name} | {_pct(values, 50):.1f} | {_pct(values, 99):.1f} | "
            f"{(values.max() if len(values) else float('nan')):.1f} |"
        )
    lines += [
        "",
        "Replay as fast as possible through the whole daemon: "
        f"**{r.daemon_bars / r.daemon_seconds:,.0f} bars/s** ({r.daemon_bars:,} bars, "
        f"{r.trades} entries, {r.daemon_seconds:.1f} s).",
        "",
    ]
    return "\n".join(lines)
