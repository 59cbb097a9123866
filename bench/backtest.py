"""Backtest throughput through the daemon's own kernel, where a bar's time goes, and the
ceiling of a vectorised path (``python -m bench.backtest [--quick]``).

1. **Throughput.** Plain backtests exactly as ``python main.py backtest`` runs them
   (``plan_backtest`` -> ``_copy_production_models`` -> ``backtest_settings`` ->
   ``run_backtest``: paper broker, journal on local disk in a temporary directory,
   replay as fast as possible, logging at WARNING) of (a) the baseline predictor
   alone, (b) RF+XGB+MLP (the target configuration) and (c) all four kinds, on the
   daemon's synthetic market and, when the file exists, a 50,000-bar slice of real
   EURUSD M1 chosen with ``--from``/``--to``. The models are trained once, before
   anything is timed, at the settings' default sizes on synthetic bars that precede
   the traded period (the daemon's spawned training worker, no gates), and promoted
   in a temporary "live" store that every backtest copies and serves. *Bars/s* is
   the processed bars over the time from the first to the last processed bar (the
   ``on_bar`` hook); start-up (model load and warm-up, feature warm-up) and
   shutdown (journal flush) are reported beside it.
2. **Where a bar's time goes**: a shorter run of (b) and (c) with the kernel's calls
   wrapped by ``perf_counter_ns`` accumulators (monkeypatched in this process only).
   Each part is *exclusive* time: a call's own time minus the wrapped calls inside
   it, so the parts add up to the wall time of ``TradingEngine.run``.
3. **Vectorised ceiling**: ``compute_features`` over the whole history at once and
   one ``predict_proba_batch`` per model over every traded row (one ONNX ``run`` for
   a row model, 256 windows per ``run`` for the LSTM), against the live single-row
   ``predict_proba`` on the same rows: CONVENTIONS allows a backtest to batch only
   where the two agree within 1e-6.
4. **Peak RSS** of this process during each backtest (Linux: the high-water mark is
   reset before each run through ``/proc/self/clear_refs``).

Nothing is asserted. ``--quick`` (tiny models, ~2,000 synthetic bars) is a smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import gc
import math
import os
import sqlite3
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import main as daemon_main
import ml.serving
import strategy.scalper as scalper_module
from bench.autotrain import _CpuWait
from bench.models import QUICK_ENV, _market
from config.settings import Settings, load_settings
from execution.paper import PaperBroker
from execution.risk import RiskManager
from main import (
    BacktestPlan,
    _copy_production_models,
    backtest_settings,
    plan_backtest,
    run_backtest,
)
from market_data.bars import Bar, iter_bars
from market_data.feeds import _Stream
from ml.auto_trainer import AutoTrainer
from ml.model_manager import TRAINING_ORDER, seed_param
from ml.serving import OnnxPredictor
from ml.store import ModelStore
from ml.training import LocalProcessBackend, TrainJob, save_bar_cache
from strategy.baseline import MomentumBaseline, PredictorNotReady
from strategy.engine import TradingEngine
from strategy.ensemble import predict_all
from strategy.features import BarColumns, FeatureEngine, FeatureSpec, compute_features
from strategy.scalper import ScalpingStrategy
from utils.clock import FakeClock, SystemClock
from utils.logsetup import configure_logging
from utils.trade_journal import Journal, JournalFuture

ROOT = Path(__file__).resolve().parent.parent
SYMBOL = "EURUSD"
KINDS = ("rf", "xgb", "lstm", "mlp")
TARGET_KINDS = ("rf", "xgb", "mlp")
KINDS_ALL = KINDS

# Targets (CONVENTIONS.md "Targets, made precise").
TARGET_BARS_PER_S = 50_000.0
TARGET_US_PER_BAR = 1e6 / TARGET_BARS_PER_S
LSTM_BOUND_BARS_PER_S = 7_500.0  # at sequence 60, 2 cores, batched
LSTM_BOUND_SEQ = 60
PARITY_TOLERANCE = 1e-6

# Real data, when present (benchmarks may use it; tests must not).
REAL_DATA = ROOT.parent / "shared" / "data" / "EURUSD_M1_20180101_20191231.csv.gz"
REAL_FROM = "2019-03-01"  # a Friday: the slice spans weekends and the EU DST switch

CONFIGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("(a) baseline only", ()),
    ("(b) RF+XGB+MLP", TARGET_KINDS),
    ("(c) RF+XGB+LSTM+MLP", KINDS_ALL),
)


@dataclass(frozen=True)
class Sizes:
    train_bars: int
    trade_bars: int
    profile_bars: int
    parity_rows: int
    real_data: bool
    lstm_seq60: bool  # an extra LSTM at sequence 60 for the vectorised ceiling

    @classmethod
    def pick(cls, *, quick: bool, train_bars: int) -> Sizes:
        if quick:
            return cls(3_000, 2_000, 500, 2_000, False, False)
        return cls(train_bars, 50_000, 10_000, 20_000, True, True)


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Trained:
    kind: str
    label: str
    version: str
    hyperparams: dict[str, Any]
    worker_s: float
    store_root: Path
    trained_to: str | None = None  # the manifest's training_window.last


@dataclass(frozen=True)
class RunResult:
    data: str
    config: str
    kinds: tuple[str, ...]
    bars: int  # processed (on_bar calls)
    planned: int  # the plan's bars to trade
    kernel_s: float  # first to last processed bar
    startup_s: float  # run_backtest called -> first bar processed
    shutdown_s: float  # last bar processed -> run_backtest returned
    cpu_s: float  # process CPU (all threads) over the whole run_backtest
    loop_cpu_s: float  # CPU of the event-loop thread, first to last processed bar
    loop_wait_s: float | None  # the loop thread runnable but without a core, same period
    peak_rss_mb: float
    trades: int
    served: tuple[str, ...]  # models in the journal's predictions
    exit_code: int

    @property
    def bars_per_s(self) -> float:
        return (self.bars - 1) / self.kernel_s if self.bars > 1 and self.kernel_s > 0 else math.nan

    @property
    def us_per_bar(self) -> float:
        return 1e6 / self.bars_per_s

    @property
    def wall_s(self) -> float:
        return self.startup_s + self.kernel_s + self.shutdown_s

    @property
    def loop_cpu_us(self) -> float:
        return self.loop_cpu_s * 1e6 / (self.bars - 1) if self.bars > 1 else math.nan

    @property
    def loop_wait_us(self) -> float:
        if self.loop_wait_s is None or self.bars <= 1:
            return math.nan
        return self.loop_wait_s * 1e6 / (self.bars - 1)


@dataclass(frozen=True)
class Breakdown:
    config: str
    bars: int
    run_s: float  # wall time of TradingEngine.run
    parts_ns: dict[str, int]  # exclusive ns per part
    calls: dict[str, int]
    loop_cpu_s: float  # CPU of the event-loop thread over the run
    loop_wait_s: float | None  # the loop thread runnable but without a core
    writer_cpu_s: float | None  # CPU of the journal's writer thread over the run

    def us(self, part: str) -> float:
        return self.parts_ns.get(part, 0) / 1000.0 / self.bars if self.bars else math.nan

    @property
    def total_us(self) -> float:
        return self.run_s * 1e6 / self.bars if self.bars else math.nan


@dataclass(frozen=True)
class ModelCeiling:
    kind: str
    label: str
    rows: int
    batch_s: float
    single_us: float  # live path, per row
    parity_rows: int
    max_abs_diff: float
    nan_mismatch: int  # rows where exactly one of the two paths has no answer
    batch2_s: float  # the same batch on a 2-thread session
    mflop: float | None = None  # LSTM: floating-point work per bar

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.batch_s if self.batch_s > 0 else math.nan

    @property
    def parity_ok(self) -> bool:
        return self.max_abs_diff <= PARITY_TOLERANCE and self.nan_mismatch == 0


@dataclass(frozen=True)
class Ceiling:
    history_rows: int
    features_s: float
    incremental_us: float  # FeatureEngine.update per bar, same bars
    features_max_diff: float
    features_nan_mismatch: int
    models: list[ModelCeiling]

    @property
    def features_rows_per_s(self) -> float:
        return self.history_rows / self.features_s

    def combined_rows_per_s(self, labels: Sequence[str], *, threads: int = 1) -> float:
        """Features (one call, one thread) + the models' batches, per row, as a rate."""
        per_row = self.features_s / self.history_rows
        for m in self.models:
            if m.label in labels:
                per_row += (m.batch_s if threads == 1 else m.batch2_s) / m.rows
        return 1.0 / per_row


@dataclass
class Results:
    quick: bool
    sizes: Sizes
    trained: list[Trained]
    training_s: float
    runs: list[RunResult]
    breakdowns: list[Breakdown]
    ceiling: Ceiling | None
    data_notes: dict[str, list[str]]  # per data set: the plan's notes
    copy_warnings: dict[str, list[str]]  # per data set: _copy_production_models' warnings
    journal_fs: str
    real_data_skipped: str | None
    rss_method: str
    load: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- helpers


def _load1() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return math.nan


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark for this process (Linux >= 4.0); False elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5", encoding="ascii")
    except OSError:
        return False
    return True


def _peak_rss_mb() -> float:
    """Peak resident set size of this process, MB (since the last reset where supported)."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    try:
        import resource

        peak = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        # Linux reports KiB, macOS bytes.
        return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0
    except ImportError:  # Windows
        try:
            import psutil

            return float(psutil.Process().memory_info().peak_wset) / (1024.0 * 1024.0)
        except Exception:  # noqa: BLE001 - psutil missing or unsupported: no figure
            return math.nan


def _fs_type(path: Path) -> str:
    """The file system holding ``path`` (from /proc/mounts), or "" where unknown."""
    best, fstype = "", ""
    try:
        mounts = Path("/proc/mounts").read_text(encoding="utf-8").splitlines()
    except OSError:
        return ""
    target = str(path.resolve())
    for line in mounts:
        parts = line.split()
        if len(parts) < 3 or len(parts[1]) <= len(best):
            continue
        if target == parts[1] or target.startswith(parts[1].rstrip("/") + "/"):
            best, fstype = parts[1], parts[2]
    return fstype


def _thread_cpu_s(thread: threading.Thread | None) -> float | None:
    if thread is None or thread.ident is None or not hasattr(time, "pthread_getcpuclockid"):
        return None
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    except OSError:
        return None


def _settings(tmp: Path, *, quick: bool) -> Settings:
    env = {
        "SCALPER__STORAGE__JOURNAL_PATH": str(tmp / "data" / "journal.sqlite3"),
        "SCALPER__STORAGE__MODELS_DIR": str(tmp / "live-models"),
        "SCALPER__RISK__KILL_SWITCH_PATH": str(tmp / "KILL"),
        "SCALPER__PAPER__REPLAY_BARS_PER_S": "0",
        "SCALPER__LOGGING__LEVEL": "WARNING",
        **(QUICK_ENV if quick else {}),
    }
    return load_settings(environ=env)


def _lstm_mflop(hp: Mapping[str, Any], n_features: int, seq: int | None = None) -> float | None:
    """Multiply-adds x 2 of a stacked LSTM over its window (gates only; the head is tiny)."""
    if hp.get("architecture", "lstm") != "lstm":
        return None
    h1, h2 = int(hp["hidden_size_1"]), int(hp["hidden_size_2"])
    per_step = 8 * h1 * (n_features + h1) + 8 * h2 * (h1 + h2)
    return (seq or int(hp["seq_len"])) * per_step / 1e6


def _lstm_bound(hp: Mapping[str, Any], n_features: int) -> float | None:
    """CONVENTIONS' ~7,500 bars/s at sequence 60, scaled by the model's FLOPs."""
    at_60 = _lstm_mflop(hp, n_features, LSTM_BOUND_SEQ)
    mine = _lstm_mflop(hp, n_features)
    if at_60 is None or mine is None:
        return None
    return LSTM_BOUND_BARS_PER_S * at_60 / mine


# ----------------------------------------------------------------------------- training


def _train(
    settings: Settings,
    backend: LocalProcessBackend,
    store: ModelStore,
    cache: Path,
    kinds: Sequence[str],
    max_rows: int,
    override: Mapping[str, Any] | None = None,
    label_suffix: str = "",
) -> list[Trained]:
    """Train each kind in the daemon's order, commit and promote it (no gates)."""
    sym = settings.symbols[SYMBOL]
    spec = FeatureSpec()
    out = []
    for kind in (k for k in TRAINING_ORDER if k in kinds):
        draft = store.new_draft_dir(SYMBOL, kind)
        hyperparams = {
            **settings.models.kind(kind).hyperparams(),
            **seed_param(kind, settings.models.seed),
            **(override or {}),
        }
        job = TrainJob(
            symbol=SYMBOL,
            kind=kind,
            hyperparams=hyperparams,
            bars_path=str(cache),
            draft_dir=str(draft),
            point=sym.point,
            default_spread_points=sym.default_spread_points,
            horizon=settings.models.horizon_bars,
            threshold_atr=settings.models.label_threshold_atr,
            feature_params=dict(spec.params),
            max_rows=max_rows,
        )
        outcome = backend.submit(job).result()
        info = store.commit_draft(draft, symbol=SYMBOL, kind=kind, manifest=outcome.manifest)
        store.promote(SYMBOL, kind, info.version)
        hp = dict(outcome.manifest.get("hyperparams") or hyperparams)
        label = kind
        if kind == "lstm":
            label = f"lstm (seq {hp.get('seq_len')}{label_suffix})"
        window = outcome.manifest.get("training_window") or {}
        last = window.get("last") if isinstance(window, dict) else None
        out.append(
            Trained(kind, label, info.version, hp, outcome.seconds, store.root, last and str(last))
        )
        print(f"backtest: trained {label} {info.version} in {outcome.seconds:.1f} s")
    return out


# ----------------------------------------------------------------------------- plans


def _synthetic_plan(settings: Settings, sizes: Sizes) -> tuple[BacktestPlan, BarColumns]:
    """The traded period follows the training bars and the warm-up: no in-sample bar."""
    warm = max(settings.paper.history_bars, FeatureSpec().window)
    frame = _market(settings).generate(sizes.train_bars + warm + sizes.trade_bars + 1)
    times = frame["time"]
    first = times.iloc[sizes.train_bars + warm]
    end = times.iloc[sizes.train_bars + warm + sizes.trade_bars]  # --to is exclusive
    plan = plan_backtest(
        settings,
        symbol=SYMBOL,
        data="synthetic",
        start=first.isoformat(),
        end=end.isoformat(),
    )
    # plan_backtest regenerates the same market (same seed): check it is the same bars.
    if plan.trade_from != first.to_pydatetime() or plan.bars != sizes.trade_bars:
        raise RuntimeError(
            f"bench: synthetic plan trades {plan.bars} bars from {plan.trade_from}, "
            f"expected {sizes.trade_bars} from {first}"
        )
    return plan, BarColumns.from_frame(frame.iloc[: sizes.train_bars])


def _real_plan(settings: Settings, path: Path, bars: int) -> BacktestPlan:
    """``--from REAL_FROM --to <the open time of the bar after ``bars`` traded bars>``."""
    probe = plan_backtest(settings, symbol=SYMBOL, data=str(path), start=REAL_FROM)
    if probe.bars <= bars:
        return probe
    times = probe.frame["time"]
    first = len(probe.frame) - probe.bars
    end = pd.Timestamp(times.iloc[first + bars]).isoformat()
    return plan_backtest(settings, symbol=SYMBOL, data=str(path), start=REAL_FROM, end=end)


# ----------------------------------------------------------------------------- 2. profiler

FEED, YIELD, FEATURES, ENSEMBLE = "feed", "yield", "features", "ensemble"
STRATEGY, ROWS, RISK, BROKER = "strategy", "rows", "risk", "broker"
JOURNAL, JOURNAL_WAIT, ENGINE, HOOKS, LOOP = "journal", "journal_wait", "engine", "hooks", "loop"
JOURNAL_STATE, JOURNAL_PRED, AUTOTRAIN = "journal_state", "journal_predictions", "autotrain"

PARTS: tuple[tuple[str, str], ...] = (
    (FEED, "feed: next bar (replay arrays to a `Bar`)"),
    (YIELD, "feed: yield to the event loop (`FakeClock.sleep(0)`; other tasks run here)"),
    (FEATURES, "features (`FeatureEngine.update`)"),
    ("model:baseline", "baseline `predict_proba`"),
    ("model:rf", "RF `predict_proba` (ONNX)"),
    ("model:xgb", "XGB `predict_proba` (ONNX)"),
    ("model:lstm", "LSTM `predict_proba` (ONNX)"),
    ("model:mlp", "MLP `predict_proba` (ONNX)"),
    (ENSEMBLE, "ensemble (`predict_all` + `combine`, models excluded)"),
    (STRATEGY, "strategy: signal, exits, entries (`ScalpingStrategy`)"),
    (ROWS, "strategy: prediction rows for the journal (`_record_predictions`)"),
    (RISK, "risk (`RiskManager`)"),
    (BROKER, "paper broker (`PaperBroker`: fills, positions, account)"),
    (
        JOURNAL_STATE,
        "journal: `set_state` queued (last bar, heartbeat, auto-trainer status, risk state)",
    ),
    (JOURNAL_PRED, "journal: `record_predictions` queued"),
    (JOURNAL, "journal: other writes queued (orders, trades, events, equity)"),
    (JOURNAL_WAIT, "journal: awaiting commits (trade rows, order look-up)"),
    (ENGINE, "engine: per-bar bookkeeping (`TradingEngine._process`, equity snapshots)"),
    (AUTOTRAIN, "after-bar hook: auto-trainer `tick` (schedule, trials, status)"),
    (HOOKS, "after-bar hooks: service metrics, market clock"),
    (LOOP, "engine loop, async generator, event loop: the rest of `TradingEngine.run`"),
)


class _Profiler:
    """Exclusive perf_counter_ns time per part, on the event-loop thread, during engine.run."""

    def __init__(self) -> None:
        self.active = False
        self.thread = 0
        self.stack: list[int] = [0]
        self.excl: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.run_ns = 0
        self.loop_cpu_s = 0.0
        self.loop_wait_s: float | None = None
        self.writer_cpu_s: float | None = None

    def _on(self) -> bool:
        return self.active and threading.get_ident() == self.thread

    def _leave(self, name: str, t0: int) -> None:
        dt = time.perf_counter_ns() - t0
        child = self.stack.pop()
        self.excl[name] += dt - child
        self.calls[name] += 1
        self.stack[-1] += dt

    def sync(self, fn: Callable[..., Any], name: str | Callable[[Any], str]) -> Callable[..., Any]:
        prof = self

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not prof._on():
                return fn(*args, **kwargs)
            label = name if isinstance(name, str) else name(args[0])
            prof.stack.append(0)
            t0 = time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                prof._leave(label, t0)

        return wrapper

    def coro(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        prof = self

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not prof._on():
                return await fn(*args, **kwargs)
            prof.stack.append(0)
            t0 = time.perf_counter_ns()
            try:
                return await fn(*args, **kwargs)
            finally:
                prof._leave(name, t0)

        return wrapper

    def awaiting(self, fn: Callable[[Any], Any], name: str) -> Callable[[Any], Any]:
        """``JournalFuture.__await__``: the time a coroutine waits for a commit."""
        prof = self

        def timed(inner: Any) -> Generator[Any, None, Any]:
            prof.stack.append(0)
            t0 = time.perf_counter_ns()
            try:
                return (yield from inner)
            finally:
                prof._leave(name, t0)

        @functools.wraps(fn)
        def wrapper(future: Any) -> Any:
            inner = fn(future)
            return timed(inner) if prof._on() else inner

        return wrapper

    def root(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``TradingEngine.run``: switches the accounting on for its duration."""
        prof = self

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            writer = next((t for t in threading.enumerate() if t.name == "journal-writer"), None)
            w0 = _thread_cpu_s(writer)
            c0 = time.thread_time()
            loop_wait = _CpuWait()  # on the loop thread, the one it watches
            s0 = loop_wait.ns()
            prof.thread = threading.get_ident()
            prof.stack = [0, 0]
            prof.active = True
            t0 = time.perf_counter_ns()
            try:
                return await fn(*args, **kwargs)
            finally:
                dt = time.perf_counter_ns() - t0
                prof.active = False
                child = prof.stack.pop()
                prof.excl[LOOP] += dt - child
                prof.run_ns += dt
                prof.loop_cpu_s += time.thread_time() - c0
                s1 = loop_wait.ns()
                loop_wait.close()
                if s0 is not None and s1 is not None:
                    prof.loop_wait_s = (prof.loop_wait_s or 0.0) + (s1 - s0) / 1e9
                w1 = _thread_cpu_s(writer)
                if w0 is not None and w1 is not None:
                    prof.writer_cpu_s = (prof.writer_cpu_s or 0.0) + w1 - w0

        return wrapper


def _kind_label(predictor: Any) -> str:
    return f"model:{predictor.kind}"


@contextmanager
def _instrumented(prof: _Profiler) -> Iterator[None]:
    """Wrap the kernel's calls at class level; restore the originals afterwards."""
    p = prof
    targets: list[tuple[object, str, Callable[..., Any]]] = [
        (TradingEngine, "run", p.root(TradingEngine.run)),
        (TradingEngine, "_process", p.coro(TradingEngine._process, ENGINE)),
        (TradingEngine, "snapshot_equity", p.coro(TradingEngine.snapshot_equity, ENGINE)),
        (_Stream, "pop", p.sync(_Stream.pop, FEED)),
        (_Stream, "head_ns", p.sync(_Stream.head_ns, FEED)),
        (FakeClock, "sleep", p.coro(FakeClock.sleep, YIELD)),
        (FakeClock, "advance_to", p.sync(FakeClock.advance_to, HOOKS)),
        (FeatureEngine, "update", p.sync(FeatureEngine.update, FEATURES)),
        (OnnxPredictor, "predict_proba", p.sync(OnnxPredictor.predict_proba, _kind_label)),
        (MomentumBaseline, "predict_proba", p.sync(MomentumBaseline.predict_proba, _kind_label)),
        (scalper_module, "predict_all", p.sync(predict_all, ENSEMBLE)),
        (
            ScalpingStrategy,
            "_record_predictions",
            p.sync(ScalpingStrategy._record_predictions, ROWS),
        ),
        (AutoTrainer, "tick", p.sync(AutoTrainer.tick, AUTOTRAIN)),
        (daemon_main.Service, "on_bar", p.sync(daemon_main.Service.on_bar, HOOKS)),
        (JournalFuture, "__await__", p.awaiting(JournalFuture.__await__, JOURNAL_WAIT)),
        (Journal, "run", p.coro(Journal.run, JOURNAL_WAIT)),
    ]
    for name in ("on_bar", "_manage_exits", "_maybe_enter", "record_closed_deals", "close"):
        targets.append((ScalpingStrategy, name, p.coro(getattr(ScalpingStrategy, name), STRATEGY)))
    for name in ("_record_order", "_block", "_report_failures"):
        targets.append((ScalpingStrategy, name, p.sync(getattr(ScalpingStrategy, name), STRATEGY)))
    for name in ("check_entry", "stop_distance", "size", "sl_tp", "state"):
        targets.append((RiskManager, name, p.sync(getattr(RiskManager, name), RISK)))
    for name in (
        "on_bar",
        "drain_closed_deals",
        "positions",
        "account",
        "market_order",
        "close_position",
    ):
        targets.append((PaperBroker, name, p.coro(getattr(PaperBroker, name), BROKER)))
    targets.append((Journal, "set_state", p.sync(Journal.set_state, JOURNAL_STATE)))
    targets.append(
        (Journal, "record_predictions", p.sync(Journal.record_predictions, JOURNAL_PRED))
    )
    for name in (
        "record_order",
        "open_trade",
        "close_trade",
        "record_event",
        "record_equity",
        "record_model_event",
    ):
        targets.append((Journal, name, p.sync(getattr(Journal, name), JOURNAL)))
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in targets]
    try:
        for owner, name, wrapper in targets:
            setattr(owner, name, wrapper)
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


# ----------------------------------------------------------------------------- 1. runs


def _journal_facts(path: Path) -> tuple[int, tuple[str, ...]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        trades = int(conn.execute("SELECT COUNT(*) FROM trades").fetchone()[0])
        served = tuple(sorted(r[0] for r in conn.execute("SELECT DISTINCT model FROM predictions")))
    finally:
        conn.close()
    return trades, served


def _backtest(
    settings: Settings,
    plan: BacktestPlan,
    data: str,
    config: str,
    kinds: tuple[str, ...],
    name: str,
    *,
    max_bars: int | None = None,
    notes: list[str] | None = None,
) -> RunResult:
    """One plain backtest as ``cmd_backtest`` runs it, into its own journal and models."""
    root = plan.journal.parent
    run_plan = dataclasses.replace(
        plan, journal=root / f"{name}.sqlite3", models_dir=root / f"{name}_models"
    )
    root.mkdir(parents=True, exist_ok=True)
    if kinds:
        versions, warnings = _copy_production_models(settings, run_plan)
        missing = sorted(set(kinds) - set(versions))
        if missing:
            raise RuntimeError(f"bench: no production model to copy for {missing}: {warnings}")
        if notes is not None:
            notes.extend(w for w in warnings if w not in notes)
    run_settings = backtest_settings(settings, run_plan, kinds)
    count = 0
    first = last = first_cpu = last_cpu = 0.0
    wait: list[int | None] = [None, None]  # the loop thread's CPU wait, ns
    final = min(plan.bars, max_bars) if max_bars is not None else plan.bars

    async def go() -> int:
        stop = asyncio.Event()
        loop_wait = _CpuWait()  # on the loop thread, the one it watches

        def on_bar(_bar: Bar) -> None:
            nonlocal count, first, last, first_cpu, last_cpu
            now = time.perf_counter()
            cpu = time.thread_time()
            if not count:
                first, first_cpu = now, cpu
                wait[0] = loop_wait.ns()
            last, last_cpu = now, cpu
            count += 1
            if count == final:
                wait[1] = loop_wait.ns()
            if max_bars is not None and count >= max_bars:
                stop.set()  # what Ctrl-C does: the engine stops after this bar

        try:
            return await run_backtest(
                run_settings, run_plan, on_bar=on_bar, stop=stop, install_signals=False
            )
        finally:
            loop_wait.close()

    gc.collect()
    _reset_peak_rss()
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    code = asyncio.run(go())
    t1 = time.perf_counter()
    cpu = time.process_time() - cpu0
    rss = _peak_rss_mb()
    trades, served = _journal_facts(run_plan.journal)
    expected = tuple(sorted(kinds)) if kinds else ("baseline",)
    if served != expected:
        raise RuntimeError(f"bench: {data} {config} served {served}, expected {expected}")
    return RunResult(
        data=data,
        config=config,
        kinds=kinds,
        bars=count,
        planned=plan.bars,
        kernel_s=last - first,
        startup_s=first - t0 if count else t1 - t0,
        shutdown_s=t1 - last if count else 0.0,
        cpu_s=cpu,
        loop_cpu_s=last_cpu - first_cpu,
        loop_wait_s=None if wait[0] is None or wait[1] is None else (wait[1] - wait[0]) / 1e9,
        peak_rss_mb=rss,
        trades=trades,
        served=served,
        exit_code=code,
    )


def _profile(
    settings: Settings,
    plan: BacktestPlan,
    config: str,
    kinds: tuple[str, ...],
    name: str,
    bars: int,
) -> Breakdown:
    prof = _Profiler()
    with _instrumented(prof):
        result = _backtest(settings, plan, "synthetic", config, kinds, name, max_bars=bars)
    return Breakdown(
        config=config,
        bars=result.bars,
        run_s=prof.run_ns / 1e9,
        parts_ns=dict(prof.excl),
        calls=dict(prof.calls),
        loop_cpu_s=prof.loop_cpu_s,
        loop_wait_s=prof.loop_wait_s,
        writer_cpu_s=prof.writer_cpu_s,
    )


# ----------------------------------------------------------------------------- 3. ceiling


def _load_predictor(store: ModelStore, kind: str, spec: FeatureSpec) -> OnnxPredictor:
    info = store.resolve(SYMBOL, kind)
    if info is None:
        raise RuntimeError(f"bench: no production {SYMBOL}/{kind} in {store.root}")
    predictor = OnnxPredictor.load(
        info.path, feature_hash=spec.hash, kind=kind, version=info.version
    )
    predictor.warmup()
    return predictor


def _two_thread_options() -> Any:
    options = _DAEMON_SESSION_OPTIONS()
    options.intra_op_num_threads = 2
    return options


_DAEMON_SESSION_OPTIONS = ml.serving.session_options


def _ceiling(
    settings: Settings, plan: BacktestPlan, trained: Sequence[Trained], parity_rows: int
) -> Ceiling:
    spec = FeatureSpec()
    sym = settings.symbols[SYMBOL]
    cols = BarColumns.from_frame(plan.frame)
    point, spread = sym.point, sym.default_spread_points
    head = BarColumns.from_frame(plan.frame.iloc[:2_000])
    compute_features(spec, head, point=point, default_spread_points=spread)  # lazy imports
    t0 = time.perf_counter()
    feats = compute_features(spec, cols, point=point, default_spread_points=spread)
    features_s = time.perf_counter() - t0

    # The live path's features on the same bars: how far the batch rows are from them.
    bars = list(iter_bars(plan.frame, SYMBOL))
    engine = FeatureEngine(spec, point=sym.point, default_spread_points=sym.default_spread_points)
    inc = np.full_like(feats, np.nan)
    t0 = time.perf_counter()
    for i, bar in enumerate(bars):
        row = engine.update(bar)
        if row is not None:
            inc[i] = row
    incremental_us = (time.perf_counter() - t0) / len(bars) * 1e6
    del bars
    both = np.isfinite(feats) & np.isfinite(inc)
    feat_diff = float(np.abs(feats[both] - inc[both]).max()) if both.any() else math.nan
    feat_nan = int((np.isfinite(feats).all(axis=1) != np.isfinite(inc).all(axis=1)).sum())

    # The traded rows, with enough rows before them to fill the longest window.
    first = len(plan.frame) - plan.bars
    seqs = [int(t.hyperparams.get("seq_len", 0)) if t.kind == "lstm" else 0 for t in trained]
    ctx = max([*seqs, 1]) - 1
    X = np.ascontiguousarray(feats[first - ctx :])
    n = X.shape[0]
    m = min(n, ctx + parity_rows)
    models = []
    for t in trained:
        store = ModelStore(t.store_root, clock=SystemClock())
        batch_pred = _load_predictor(store, t.kind, spec)
        batch_pred.predict_proba_batch(X[:512])
        t0 = time.perf_counter()
        batch = batch_pred.predict_proba_batch(X)
        batch_s = time.perf_counter() - t0
        live = _load_predictor(store, t.kind, spec)
        single = np.full((m, 3), np.nan, dtype=np.float32)
        t0 = time.perf_counter()
        for i in range(m):
            try:
                single[i] = live.predict_proba(X[i])
            except PredictorNotReady:
                continue
        single_us = (time.perf_counter() - t0) / m * 1e6
        a, b = batch[ctx:m], single[ctx:m]
        ok_a, ok_b = np.isfinite(a).all(axis=1), np.isfinite(b).all(axis=1)
        both_rows = ok_a & ok_b
        diff = float(np.abs(a[both_rows] - b[both_rows]).max()) if both_rows.any() else math.nan
        mflop = _lstm_mflop(t.hyperparams, len(spec.names)) if t.kind == "lstm" else None
        ml.serving.session_options = _two_thread_options
        try:
            two = _load_predictor(store, t.kind, spec)
        finally:
            ml.serving.session_options = _DAEMON_SESSION_OPTIONS
        two.predict_proba_batch(X[:512])
        t0 = time.perf_counter()
        two.predict_proba_batch(X)
        batch2_s = time.perf_counter() - t0
        models.append(
            ModelCeiling(
                kind=t.kind,
                label=t.label,
                rows=n,
                batch_s=batch_s,
                single_us=single_us,
                parity_rows=m - ctx,
                max_abs_diff=diff,
                nan_mismatch=int((ok_a != ok_b).sum()),
                batch2_s=batch2_s,
                mflop=mflop,
            )
        )
        print(
            f"backtest: ceiling {t.label:<34} batched {n / batch_s:>10,.0f} rows/s "
            f"({n / batch2_s:,.0f} on 2 threads)  "
            f"single-row {single_us:7.1f} us  max |diff| {diff:.2e}"
        )
    return Ceiling(
        history_rows=len(feats),
        features_s=features_s,
        incremental_us=incremental_us,
        features_max_diff=feat_diff,
        features_nan_mismatch=feat_nan,
        models=models,
    )


# ----------------------------------------------------------------------------- run


def run(quick: bool) -> str:
    """Train once, run every measurement, and return the markdown section."""
    with tempfile.TemporaryDirectory(prefix="bench-backtest-") as tmp_name:
        results = _measure(Path(tmp_name), quick=quick)
    for line in summary_lines(results):
        print(line)
    return render(results)


def _measure(tmp: Path, *, quick: bool) -> Results:
    settings = _settings(tmp, quick=quick)
    configure_logging(settings.logging.level, settings.logging.format)
    sizes = Sizes.pick(quick=quick, train_bars=settings.models.train_bars)
    load = {"start": _load1()}

    # Data first (cheap), then the models, trained once on the bars before the traded period.
    plan, train_cols = _synthetic_plan(settings, sizes)
    data_notes: dict[str, list[str]] = {"synthetic": list(plan.notes)}
    copy_warnings: dict[str, list[str]] = defaultdict(list)
    store = ModelStore(Path(settings.storage.models_dir), clock=SystemClock())
    cache = save_bar_cache(tmp / "cache" / f"{SYMBOL}.npz", train_cols)
    backend = LocalProcessBackend()
    t0 = time.perf_counter()
    try:
        kinds = [k for k in KINDS if k in settings.models.enabled_kinds]
        trained = _train(settings, backend, store, cache, kinds, sizes.train_bars)
        extra: list[Trained] = []
        if sizes.lstm_seq60 and "lstm" in kinds:
            # Throughput only: the same architecture at sequence 60, a few optimiser steps.
            extra_store = ModelStore(tmp / "lstm-seq60-models", clock=SystemClock())
            extra = _train(
                settings,
                backend,
                extra_store,
                cache,
                ["lstm"],
                sizes.train_bars,
                override={"seq_len": LSTM_BOUND_SEQ, "max_steps": 10},
                label_suffix=", 10 steps: speed only",
            )
    finally:
        backend.shutdown()
    training_s = time.perf_counter() - t0
    load["after training"] = _load1()

    # 1. Throughput, synthetic then real.
    runs: list[RunResult] = []
    for config, config_kinds in CONFIGS:
        name = f"synthetic_{'-'.join(config_kinds) or 'baseline'}"
        result = _backtest(
            settings,
            plan,
            "synthetic",
            config,
            config_kinds,
            name,
            notes=copy_warnings["synthetic"],
        )
        runs.append(result)
        print(
            f"backtest: synthetic {config:<22} {result.bars_per_s:>8,.0f} bars/s "
            f"({result.bars:,} bars, {result.trades} trades, peak RSS {result.peak_rss_mb:,.0f} MB)"
        )
    real_skipped: str | None = None
    if not sizes.real_data:
        real_skipped = "quick mode: synthetic data only"
    elif not REAL_DATA.is_file():
        real_skipped = f"{REAL_DATA} not found"
    else:
        real = _real_plan(settings, REAL_DATA, sizes.trade_bars)
        label = f"EURUSD M1 {real.trade_from:%Y-%m-%d} to {real.trade_to:%Y-%m-%d} (real)"
        data_notes[label] = list(real.notes)
        for config, config_kinds in CONFIGS:
            name = f"real_{'-'.join(config_kinds) or 'baseline'}"
            result = _backtest(
                settings, real, label, config, config_kinds, name, notes=copy_warnings[label]
            )
            runs.append(result)
            print(
                f"backtest: real      {config:<22} {result.bars_per_s:>8,.0f} bars/s "
                f"({result.bars:,} bars, {result.trades} trades, "
                f"peak RSS {result.peak_rss_mb:,.0f} MB)"
            )
        del real
    load["after the throughput runs"] = _load1()

    # 2. Where the time goes: shorter instrumented runs of (b) and (c).
    breakdowns = []
    for config, config_kinds in CONFIGS[1:]:
        name = f"profile_{'-'.join(config_kinds)}"
        breakdowns.append(
            _profile(settings, plan, config, config_kinds, name, min(sizes.profile_bars, plan.bars))
        )

    # 3. The vectorised ceiling on the synthetic history.
    ceiling = _ceiling(settings, plan, [*trained, *extra], sizes.parity_rows)
    load["end"] = _load1()
    return Results(
        quick=quick,
        sizes=sizes,
        trained=[*trained, *extra],
        training_s=training_s,
        runs=runs,
        breakdowns=breakdowns,
        ceiling=ceiling,
        data_notes=data_notes,
        copy_warnings=dict(copy_warnings),
        journal_fs=_fs_type(tmp),
        real_data_skipped=real_skipped,
        rss_method=(
            "VmHWM, reset before each run"
            if Path("/proc/self/clear_refs").exists()
            else "ru_maxrss (process lifetime peak)"
        ),
        load=load,
    )


# ----------------------------------------------------------------------------- report


def _run(r: Results, data: str, kinds: tuple[str, ...]) -> RunResult | None:
    return next((x for x in r.runs if x.data == data and x.kinds == kinds), None)


def _model(c: Ceiling, kind: str, *, served: bool = True) -> ModelCeiling | None:
    for m in c.models:
        if m.kind == kind and (not served or "speed only" not in m.label):
            return m
    return None


def _served_lstm(r: Results) -> Trained | None:
    return next((t for t in r.trained if t.kind == "lstm" and "speed only" not in t.label), None)


def summary_lines(r: Results) -> list[str]:
    lines = [
        f"backtest: {x.data} {x.config}: {x.bars_per_s:,.0f} bars/s "
        f"({x.us_per_bar:,.0f} us/bar, {x.bars:,} bars)"
        for x in r.runs
    ]
    for b in r.breakdowns:
        top = sorted(b.parts_ns.items(), key=lambda kv: -kv[1])[:4]
        lines.append(
            f"backtest: {b.config} per bar {b.total_us:,.0f} us; largest: "
            + ", ".join(f"{k} {v / 1000 / b.bars:,.0f} us" for k, v in top)
        )
    for name, measured, verdict in _targets(r):
        lines.append(f"backtest: target {name}: {measured}: {verdict.replace('**', '')}")
    return lines


def _targets(r: Results) -> list[tuple[str, str, str]]:
    rows = []
    target = [x for x in r.runs if x.kinds == TARGET_KINDS]
    if target:
        measured = "; ".join(
            f"{x.bars_per_s:,.0f} bars/s on {x.data.split(' (')[0]}"
            f"{' (real)' if '(real)' in x.data else ''}"
            for x in target
        )
        worst = min(x.bars_per_s for x in target)
        if r.quick:
            verdict = "not checked (quick sizes)"
        elif worst >= TARGET_BARS_PER_S:
            verdict = "**MET**"
        else:
            verdict = (
                f"**NOT MET**: {1e6 / worst:,.0f} µs per bar against a budget of "
                f"{TARGET_US_PER_BAR:.0f} µs ({TARGET_BARS_PER_S / worst:,.0f}x too slow); "
                "see *What bounds it*"
            )
        rows.append(
            (
                f"backtest with RF+XGB+MLP ≥ {TARGET_BARS_PER_S:,.0f} bars/s "
                "(kernel, excluding training)",
                measured,
                verdict,
            )
        )
    lstm = _served_lstm(r)
    full = [x for x in r.runs if x.kinds == KINDS_ALL]
    if lstm is not None and full:
        n_features = len(FeatureSpec().names)
        bound = _lstm_bound(lstm.hyperparams, n_features)
        seq = lstm.hyperparams.get("seq_len")
        kernel = "; ".join(f"{x.bars_per_s:,.0f} bars/s ({x.data})" for x in full)
        parts = [f"kernel, all four at seq {seq}: {kernel}"]
        c = r.ceiling
        if c is not None:
            for m in c.models:
                if m.kind != "lstm":
                    continue
                rate = max(m.rows_per_s, m.rows / m.batch2_s)
                mine = LSTM_BOUND_BARS_PER_S * (
                    (_lstm_mflop(lstm.hyperparams, n_features, LSTM_BOUND_SEQ) or 1.0)
                    / (m.mflop or 1.0)
                )
                parts.append(
                    f"LSTM batched alone, {m.label}: {m.rows_per_s:,.0f} rows/s on 1 thread, "
                    f"{m.rows / m.batch2_s:,.0f} on 2 ({rate / mine:.0%} of its bound)"
                )
        bound_text = f"~{LSTM_BOUND_BARS_PER_S:,.0f} bars/s at seq {LSTM_BOUND_SEQ}" + (
            f", ~{bound:,.0f} at seq {seq} scaled by FLOPs" if bound is not None else ""
        )
        worst = min(x.bars_per_s for x in full)
        verdict = (
            "reported beside the bound"
            if r.quick or bound is None
            else f"reported beside the bound: the kernel reaches {worst / bound:.0%} of it"
        )
        rows.append(
            (
                f"backtest with the LSTM too, beside its bound ({bound_text})",
                "; ".join(parts),
                verdict,
            )
        )
    return rows


def _bounds_text(r: Results) -> str:
    b_runs = [x for x in r.runs if x.kinds == TARGET_KINDS]
    prof = next((b for b in r.breakdowns if b.config == CONFIGS[1][0]), None)
    c = r.ceiling
    if not b_runs or prof is None or c is None:
        return ""
    best = max(b_runs, key=lambda x: x.bars_per_s)
    feat = prof.us(FEATURES)
    per_model = {k: prof.us(f"model:{k}") for k in TARGET_KINDS}
    models = sum(per_model.values())
    total = prof.total_us
    rest = total - feat - models - prof.us(ENSEMBLE)
    journal = sum(prof.us(k) for k in (JOURNAL, JOURNAL_STATE, JOURNAL_PRED, JOURNAL_WAIT, ROWS))
    loop = sum(prof.us(k) for k in (LOOP, YIELD, FEED, ENGINE, HOOKS, AUTOTRAIN))
    labels = [m.label for m in c.models if m.kind in TARGET_KINDS]
    rate1 = c.combined_rows_per_s(labels)
    rate2 = c.combined_rows_per_s(labels, threads=2)
    vec_rate = max(rate1, rate2)
    vec_us = 1e6 / vec_rate
    parity = all(m.parity_ok for m in c.models if m.label in labels)
    vec_parts = sorted(
        [("features", c.features_s / c.history_rows * 1e6)]
        + [(m.kind.upper(), m.batch_s / m.rows * 1e6) for m in c.models if m.label in labels],
        key=lambda kv: -kv[1],
    )
    runs_text = "; ".join(
        f"{x.bars_per_s:,.0f} bars/s on {'the real data' if '(real)' in x.data else x.data} "
        f"({x.us_per_bar:,.0f} µs per bar, {x.loop_wait_us:,.0f} of them waiting for a core)"
        for x in b_runs
    )
    text = (
        f"The kernel runs RF+XGB+MLP at {runs_text}; {TARGET_BARS_PER_S:,.0f} bars/s leaves "
        f"**{TARGET_US_PER_BAR:.0f} µs per bar** for everything, {best.us_per_bar / 20:,.0f}x "
        f"less than the best of these. In the instrumented run ({total:,.0f} µs per bar) the "
        f"features take {feat:,.1f} µs, the three models {models:,.0f} µs ("
        + ", ".join(f"{k.upper()} {v:,.0f}" for k, v in per_model.items())
        + f"), the ensemble {prof.us(ENSEMBLE):,.0f} µs, and the rest of the per-bar kernel "
        f"{rest:,.0f} µs: journal {journal:,.0f} (rows built, writes queued, commits awaited), "
        f"strategy {prof.us(STRATEGY):,.0f}, paper broker {prof.us(BROKER):,.0f}, risk "
        f"{prof.us(RISK):,.0f}, feed + engine + hooks + event loop {loop:,.0f}. "
        f"The single-row models alone are {models / TARGET_US_PER_BAR:,.0f}x the budget and "
        f"the rest of the kernel is {rest / TARGET_US_PER_BAR:,.0f}x: faster models alone, or "
        "batched inference alone, cannot reach the target. "
    )
    text += (
        f"Batched, features + the three models cost {1e6 / rate1:,.1f} µs per row on one "
        f"thread ({rate1:,.0f} rows/s) and {1e6 / rate2:,.1f} µs with the models' sessions on "
        f"two ({rate2:,.0f} rows/s); per row on one thread: "
        + ", ".join(f"{name} {us:,.1f} µs" for name, us in vec_parts)
        + ": "
        + (
            "within the budget"
            if vec_us <= TARGET_US_PER_BAR
            else f"{vec_us / TARGET_US_PER_BAR:.1f}x the budget even so"
        )
        + (
            ", and batched probabilities equal the single-row ones within 1e-6, so "
            "CONVENTIONS allows a backtest to use them. "
            if parity
            else "; and batched and single-row probabilities differ by more than 1e-6 for "
            "some model, so CONVENTIONS does not allow batching it. "
        )
    )
    text += (
        f"With inference free, this event-driven kernel would still top out near "
        f"{1e6 / rest:,.0f} bars/s ({rest:,.0f} µs of Python per bar). So "
        f"{TARGET_BARS_PER_S:,.0f} bars/s needs a different backtest path, not a tuned "
        "kernel: features and probabilities precomputed in batch"
        + (
            " (and, at these model sizes, smaller tree ensembles or both cores for them)"
            if vec_us > TARGET_US_PER_BAR
            else ""
        )
        + ", then the strategy, risk and paper fills simulated in a tight loop over arrays "
        "(or vectorised), with the journal written in bulk at the end; the event-driven "
        "kernel stays the reference that such a path must match trade for trade."
    )
    return text


def render(r: Results) -> str:
    s = r.sizes
    lines = [
        "## Backtest throughput (`bench/backtest.py`)",
        "",
        "Plain backtests through the daemon's own kernel, as `python main.py backtest` runs "
        "them (`plan_backtest`, `_copy_production_models`, `backtest_settings`, "
        "`run_backtest`): paper broker, journal on local disk "
        + (f"({r.journal_fs}) " if r.journal_fs else "")
        + "in a temporary directory, replay as fast as possible, logging at WARNING. "
        f"Models trained once before anything is timed, on the {s.train_bars:,} synthetic "
        "bars before the traded period, "
        + (
            "**at quick sizes** (tiny models): the figures only show the benchmark runs."
            if r.quick
            else "at the settings' default sizes (`config/settings.toml`)."
        )
        + " *Bars/s* counts from the first to the last processed bar; start-up (model load "
        "and warm-up, 500 warm-up bars) and shutdown (journal flush) are shown apart.",
        "",
        "### Targets",
        "",
        "| target | measured | result |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in _targets(r)]

    lines += [
        "",
        "### Throughput",
        "",
        "| data | models | bars | bars/s | µs/bar | loop CPU µs/bar | waiting for a core "
        "µs/bar | start-up s | shutdown s | wall bars/s | CPU cores | trades | peak RSS MB |",
        "| --- | --- |" + " ---: |" * 11,
    ]
    for x in r.runs:
        cores = x.cpu_s / x.wall_s if x.wall_s > 0 else math.nan
        bars = f"{x.bars:,}" + ("" if x.bars == x.planned else f" of {x.planned:,}")
        lines.append(
            f"| {x.data} | {x.config} | {bars} | **{x.bars_per_s:,.0f}** | "
            f"{x.us_per_bar:,.0f} | {x.loop_cpu_us:,.0f} | {x.loop_wait_us:,.0f} | "
            f"{x.startup_s:.2f} | {x.shutdown_s:.2f} | "
            f"{x.bars / x.wall_s:,.0f} | {cores:.2f} | {x.trades:,} | {x.peak_rss_mb:,.0f} |"
        )
    lines += [
        "",
        "*Loop CPU*: CPU time of the event-loop thread (the kernel) per bar; *waiting for a "
        "core*: time that thread was runnable but not running (Linux schedstat; other "
        "tenants of this shared machine). Both over the bars/s period. *Wall bars/s* includes "
        "start-up and shutdown; *CPU cores*: process CPU time (every thread, the journal "
        f"writer included) over wall time; *peak RSS*: {r.rss_method}. "
        f"Training ({r.training_s:.1f} s in the spawned worker, excluded from every figure): "
        + ", ".join(f"{t.label} {t.version} {t.worker_s:.1f} s" for t in r.trained)
        + ".",
    ]
    if r.real_data_skipped:
        lines += ["", f"Real data not measured: {r.real_data_skipped}."]
    for data, notes in r.data_notes.items():
        if notes:
            lines += ["", f"Notes ({data}): " + " ".join(f"{n.rstrip('.')}." for n in notes)]
    last_trained = max((t.trained_to for t in r.trained if t.trained_to), default="?")
    for data, warnings in r.copy_warnings.items():
        if not warnings:
            continue
        lines += [
            "",
            f"`_copy_production_models` warned ({data}): {warnings[0]}"
            + (f" (and {len(warnings) - 1} more like it)" if len(warnings) > 1 else "")
            + f". The models were trained on synthetic bars up to {last_trained}: the check "
            "compares times only.",
        ]

    # -- breakdown
    if r.breakdowns:
        lines += [
            "",
            "### Where a bar's time goes",
            "",
            f"Synthetic data, {r.breakdowns[0].bars:,} bars per run, every kernel call wrapped "
            "by `perf_counter_ns` accumulators in this process (exclusive time: a call's own "
            "time minus the wrapped calls inside it, so the parts add up to "
            "`TradingEngine.run`). The wrappers add roughly 1 µs per call: compare the total "
            "with the uninstrumented runs above. The journal's writer thread runs beside the "
            "loop and holds the GIL for its Python parts, so some of any part's time may be "
            "the loop waiting for the GIL (not measured apart). A backtest's clock is the "
            "market's, so the engine's "
            "5-second heartbeat and the auto-trainer's 5-second status are written on every "
            "(1-minute) bar.",
            "",
            "| part | "
            + " | ".join(f"{b.config} µs/bar | share | calls/bar" for b in r.breakdowns)
            + " |",
            "| --- |" + " ---: | ---: | ---: |" * len(r.breakdowns),
        ]
        for key, text in PARTS:
            if not any(b.parts_ns.get(key) for b in r.breakdowns):
                continue
            cells = []
            for b in r.breakdowns:
                us = b.us(key)
                share = us / b.total_us if b.total_us else math.nan
                calls = b.calls.get(key, 0) / b.bars if b.bars else math.nan
                cells.append(
                    f"{us:,.1f} | {share:.1%} | {calls:.2f}" if b.parts_ns.get(key) else "– | – | –"
                )
            lines.append(f"| {text} | " + " | ".join(cells) + " |")
        lines.append(
            "| **total (wall time of `TradingEngine.run`)** | "
            + " | ".join(f"**{b.total_us:,.0f}** | 100% | " for b in r.breakdowns)
            + " |"
        )
        lines.append(
            "| … instrumented bars/s | "
            + " | ".join(f"{1e6 / b.total_us:,.0f} | | " for b in r.breakdowns)
            + " |"
        )
        lines.append(
            "| … CPU of the event-loop thread, µs/bar | "
            + " | ".join(f"{b.loop_cpu_s * 1e6 / b.bars:,.0f} | | " for b in r.breakdowns)
            + " |"
        )
        lines.append(
            "| … the event-loop thread waiting for a core, µs/bar | "
            + " | ".join(
                (f"{b.loop_wait_s * 1e6 / b.bars:,.0f}" if b.loop_wait_s is not None else "n/a")
                + " | | "
                for b in r.breakdowns
            )
            + " |"
        )
        lines.append(
            "| … CPU of the journal's writer thread (the other core), µs/bar | "
            + " | ".join(
                (f"{b.writer_cpu_s * 1e6 / b.bars:,.0f}" if b.writer_cpu_s is not None else "n/a")
                + " | | "
                for b in r.breakdowns
            )
            + " |"
        )

    # -- ceiling
    c = r.ceiling
    if c is not None:
        lstm = _served_lstm(r)
        lines += [
            "",
            "### Ceiling of a vectorised path",
            "",
            f"Synthetic history of {c.history_rows:,} bars: `compute_features` on `BarColumns` "
            f"in one call, **{c.features_rows_per_s:,.0f} rows/s** (the live "
            f"`FeatureEngine.update` on the same bars: {c.incremental_us:,.1f} µs per bar; max "
            f"|difference| {c.features_max_diff:.2e}, rows finite in one path only: "
            f"{c.features_nan_mismatch}). Then per model one `predict_proba_batch` over every "
            "traded row (plus the rows before them that the longest window needs), on the "
            "daemon's 1-thread session, against the live single-row `predict_proba` on the "
            f"same rows (the first {max(m.parity_rows for m in c.models):,}).",
            "",
            "| model | rows | batched rows/s | batched µs/row | batched rows/s, 2 threads | "
            "single-row µs/row (live) | speed-up | max abs diff (rows compared) | "
            "batch = single within 1e-6 |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
        ]
        for m in c.models:
            batched_us = m.batch_s / m.rows * 1e6
            lines.append(
                f"| {m.label} | {m.rows:,} | {m.rows_per_s:,.0f} | {batched_us:,.2f} | "
                f"{m.rows / m.batch2_s:,.0f} | {m.single_us:,.1f} | "
                f"{m.single_us / batched_us:,.0f}x | "
                f"{m.max_abs_diff:.2e} ({m.parity_rows:,}"
                + (f"; {m.nan_mismatch} answered by one path only" if m.nan_mismatch else "")
                + f") | {'yes' if m.parity_ok else '**no**'} |"
            )
        b_labels = [m.label for m in c.models if m.kind in TARGET_KINDS]
        lines += [
            "",
            "Combined (features + models, batched; models on 1 / 2 threads): RF+XGB+MLP "
            f"**{c.combined_rows_per_s(b_labels):,.0f} / "
            f"{c.combined_rows_per_s(b_labels, threads=2):,.0f} rows/s**",
        ]
        served_lstm = _model(c, "lstm")
        if served_lstm is not None:
            with_lstm = [*b_labels, served_lstm.label]
            lines[-1] += (
                f"; with the served {served_lstm.label} "
                f"**{c.combined_rows_per_s(with_lstm):,.0f} / "
                f"{c.combined_rows_per_s(with_lstm, threads=2):,.0f} rows/s**"
            )
        lines[-1] += "."
        lstm_rows = [m for m in c.models if m.kind == "lstm" and m.mflop is not None]
        if lstm_rows and lstm is not None:
            n_features = len(FeatureSpec().names)
            parts = []
            for m in lstm_rows:
                assert m.mflop is not None
                rate1 = m.rows_per_s
                rate2 = m.rows / m.batch2_s
                bound = LSTM_BOUND_BARS_PER_S * (
                    (_lstm_mflop(lstm.hyperparams, n_features, LSTM_BOUND_SEQ) or m.mflop) / m.mflop
                )
                parts.append(
                    f"{m.label}: {m.mflop:.1f} MFLOP per bar; batched {rate1:,.0f} rows/s on 1 "
                    f"thread ({rate1 * m.mflop / 1e3:.1f} GFLOP/s), {rate2:,.0f} on 2 threads "
                    f"({rate2 * m.mflop / 1e3:.1f} GFLOP/s), against a bound of ~{bound:,.0f}"
                )
            lines += [
                "",
                f"LSTM against CONVENTIONS' bound (~{LSTM_BOUND_BARS_PER_S:,.0f} bars/s at "
                f"sequence {LSTM_BOUND_SEQ} on 2 cores, scaled by FLOPs to other lengths): "
                + "; ".join(parts)
                + ". The served LSTM is the settings' default (sequence "
                f"{lstm.hyperparams.get('seq_len')}); the sequence-60 model exists only to "
                "measure this (10 optimiser steps: same cost per bar, meaningless "
                "predictions)."
                if any("speed only" in m.label for m in lstm_rows)
                else "; ".join(parts) + ".",
            ]

    text = _bounds_text(r)
    if text:
        lines += ["", "### What bounds it", "", text]
    lines += [
        "",
        "1-minute load average of the "
        f"{os.cpu_count()}-CPU machine: "
        + ", ".join(f"{v:.2f} {k}" for k, v in r.load.items())
        + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.backtest", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="small smoke run (CI)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    section = run(args.quick)
    print()
    print(section)
    print(f"bench.backtest: {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
