"""The auto-trainer off the hot path: event-loop lag and decisions during a full retrain, swaps.

Measured in one run, side by side, in this process standing in for the daemon:

1. **Live loop during a full retrain.** An asyncio loop runs (a) a ticker that
   sleeps 10 ms and records its lag (actual wake-up minus scheduled) and (b) one
   decision every 50 ms: ``FeatureEngine.update`` + the four served models
   (``OnnxPredictor``, rf, xgb, lstm, mlp, installed by
   ``ModelManager.load_production``) + ``predict_all`` over one
   ``PredictorMap`` snapshot, timed as ``ScalpingStrategy.on_bar`` times it.
   Meanwhile a scheduler thread (the daemon's APScheduler training thread)
   calls ``ModelManager.train_one`` for each kind in ``TRAINING_ORDER``: the
   jobs are the daemon's own (``ModelManager._job`` + ``_validation_args``),
   with the validation gates on and ``production_dir`` at the served version,
   run by ``LocalProcessBackend`` (one spawned worker, one thread per library)
   and committed to the store with their stage and journal rows. The retrain
   window is the first training window moved on by a day of bars (what a
   scheduled retrain sees). The same loop with nothing training, measured
   before and after the retrain, is the baseline.
2. **Swap time** per kind: ``OnnxPredictor.load`` + ``warmup`` of another
   version from the store in a thread (what ``ModelManager.load`` does off the
   loop), then on the loop the priming with recent feature rows and
   ``PredictorMap.swap`` (what ``ModelManager._install_now`` does), the
   retrained and the production version in turn, while the ticker and the
   decisions keep running.

The served models and the worker are set up first by an initial training of
the four kinds (gates on, nothing to compare with, nothing else running): its
per-kind times are the "alone" column beside the retrain's. The worker's peak
RSS per job comes from ``/proc/<pid>/status`` (``VmHWM``, reset through
``clear_refs`` before each job; Linux only), the CPU shares of each phase
(this process, the worker, everything else on the machine) from ``/proc``.
The machine is shared: to tell core contention from this process's own
stalls, every tick and every decision also records how long the loop thread
was runnable but waiting for a core (``/proc/thread-self/schedstat``).

Nothing is asserted: the rendered text says MET / NOT MET with the figure.
``python -m bench.autotrain [--quick]`` runs this module alone and prints its
section.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

# The same synthetic market and model sizes as bench/models.py, by construction.
from bench.models import KINDS, SYMBOL, _market, _settings
from config.settings import Settings
from market_data.bars import Bar, iter_bars
from ml.model_manager import TRAINING_ORDER, ModelManager, TrainingRequest, TrainResult
from ml.predictor_map import PredictorMap
from ml.serving import OnnxPredictor
from ml.store import ModelStore, VersionInfo, journal_hook
from ml.training import LocalProcessBackend
from strategy.baseline import MomentumBaseline
from strategy.ensemble import EnsembleResult, predict_all
from strategy.features import BarColumns, FeatureEngine, FeatureSpec
from strategy.scalper import RECENT_ROWS
from utils.clock import SystemClock
from utils.logsetup import configure_logging
from utils.trade_journal import Journal

# Targets (issue 4 item 2).
TARGET_RETRAIN_S = 120.0
TARGET_LAG_MAX_MS = 10.0
TARGET_DECISION_P99_MS = 3.0
TARGET_TRAIN_BARS = 50_000

TICK_S = 0.010
DECISION_EVERY_S = 0.050
HEAVY = ("torch", "sklearn", "xgboost")

T = TypeVar("T")


@dataclass(frozen=True)
class Sizes:
    train_bars: int
    shift_bars: int  # the retrain window starts this many bars after the first one
    eval_bars: int  # bars available to the decisions (one per DECISION_EVERY_S)
    baseline_s: float  # each of the two idle phases
    swap_rounds: int  # per kind
    swap_gap_s: float  # between two swaps, so decisions run in between

    @classmethod
    def pick(cls, *, quick: bool, train_bars: int) -> Sizes:
        if quick:
            return cls(3_000, 300, 5_000, 2.0, 2, 0.05)
        # 60,000 bars at one per 50 ms: 50 minutes of decisions, far more than a run takes.
        return cls(train_bars, 1_440, 60_000, 20.0, 5, 0.2)


@dataclass(frozen=True)
class CpuShare:
    """Average CPU use over a phase, in cores (the machine has ``os.cpu_count()``)."""

    machine: float  # everything: /proc/stat busy time (steal included)
    this_process: float  # the loop, the scheduler thread, the journal writer
    worker: float  # the training worker
    others: float  # the rest: other tenants of the machine


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    lag_t: np.ndarray  # perf_counter seconds of each tick
    lag_ms: np.ndarray
    # The loop thread's time runnable but waiting for a CPU (Linux schedstat) since the
    # tick before: the part of the lag that is core contention, not this process.
    lag_wait_ms: np.ndarray | None
    decision_t: np.ndarray
    decision_us: np.ndarray  # features + models + ensemble
    decision_wait_us: np.ndarray | None  # of which waiting for a CPU
    features_us: np.ndarray
    model_us: dict[str, np.ndarray]  # each model's predict_proba, as predict_all times it
    loop_wait_ms: float | None  # the loop thread's whole wait for a CPU over the phase
    cpu: CpuShare | None
    load1: tuple[float, float]  # 1-minute load average at the start and the end


@dataclass(frozen=True)
class KindRun:
    kind: str
    version: str
    stage: str  # "validated" (every gate passed) or "rejected"
    worker_s: float  # inside run_training: dataset, fit, holdout, artifacts, gates
    wall_s: float  # train_one in the scheduler thread: + cache, IPC, commit, journal
    started: float  # perf_counter
    finished: float
    peak_rss_mb: float | None
    reasons: str  # the failed gates, "" when every gate passed
    compared_with_production: bool
    metrics: dict[str, float]
    training: dict[str, Any]  # the kind's training record (model_meta.json)


@dataclass(frozen=True)
class SwapTimes:
    kind: str
    load_warm_ms: list[float]  # OnnxPredictor.load + warmup, in a thread
    prime_us: list[float]  # observe(recent rows) on the loop
    swap_us: list[float]  # PredictorMap.swap on the loop
    release_us: list[float]  # dropping the replaced predictor (its ONNX session) on the loop
    rows: int


@dataclass(frozen=True)
class Results:
    quick: bool
    sizes: Sizes
    initial: list[KindRun]
    initial_wall_s: float
    retrain: list[KindRun]
    retrain_wall_s: float
    phases: list[Phase]  # baseline before, retrain, baseline after, swaps
    swaps: list[SwapTimes]
    heavy_in_parent: list[str]


# ----------------------------------------------------------------------------- helpers


def _pct(values: Sequence[float] | np.ndarray, q: float) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(np.percentile(arr, q)) if arr.size else float("nan")


def _max(values: Sequence[float] | np.ndarray) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.max()) if arr.size else float("nan")


def _load1() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return float("nan")


def _verdict(ok: bool) -> str:
    return "**MET**" if ok else "**NOT MET**"


def _worker_pid() -> int | None:
    """The training worker: the one process multiprocessing started from this one."""
    children = [p.pid for p in multiprocessing.active_children() if p.pid is not None]
    return children[0] if len(children) == 1 else None


def _reset_peak_rss(pid: int | None) -> None:
    # "5" resets the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0).
    if pid is not None:
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5", encoding="ascii")


def _peak_rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return None


_TICKS_PER_S = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0


def _machine_busy_s() -> float | None:
    """CPU seconds the whole machine spent busy since boot (all CPUs)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path("/proc/stat").read_text(encoding="ascii").splitlines()[0].split()
        # user nice system idle iowait irq softirq steal (guest is inside user)
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
        return (user + nice + system + irq + softirq + steal) / _TICKS_PER_S
    return None


def _process_cpu_s(pid: int | None) -> float | None:
    if pid is None:
        return None
    with contextlib.suppress(OSError, ValueError, IndexError):
        after_comm = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1]
        fields = after_comm.split()
        return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S  # utime + stime
    return None


@dataclass(frozen=True)
class _CpuSample:
    wall: float
    machine: float | None
    this_process: float
    worker: float | None


def _cpu_sample(worker: int | None) -> _CpuSample:
    t = os.times()
    return _CpuSample(
        time.perf_counter(), _machine_busy_s(), t.user + t.system, _process_cpu_s(worker)
    )


def _cpu_share(a: _CpuSample, b: _CpuSample) -> CpuShare | None:
    wall = b.wall - a.wall
    if a.machine is None or b.machine is None or wall <= 0:
        return None
    machine = (b.machine - a.machine) / wall
    this = (b.this_process - a.this_process) / wall
    worker = 0.0
    if a.worker is not None and b.worker is not None:
        worker = (b.worker - a.worker) / wall
    return CpuShare(machine, this, worker, max(0.0, machine - this - worker))


# ----------------------------------------------------------------------------- live side


class _Decider:
    """One symbol's decision path as ``ScalpingStrategy.on_bar`` runs it (no orders)."""

    def __init__(
        self,
        spec: FeatureSpec,
        settings: Settings,
        predictors: PredictorMap,
        weights: Mapping[str, float],
        bars: Iterator[Bar],
        kinds: Sequence[str],
    ) -> None:
        sym = settings.symbols[SYMBOL]
        self.spec = spec
        self.engine = FeatureEngine(
            spec, point=sym.point, default_spread_points=sym.default_spread_points
        )
        self.predictors = predictors
        self.weights = weights
        self.bars = bars
        self.kinds = tuple(kinds)
        self.rows: deque[np.ndarray] = deque(maxlen=RECENT_ROWS)
        self.clock = time.perf_counter_ns

    def recent_rows(self, symbol: str) -> list[np.ndarray]:
        return list(self.rows)

    def warm(self, n_bars: int) -> None:
        """``ScalpingStrategy.warm``: features and sequence windows, no predictions."""
        for _ in range(n_bars):
            row = self.engine.update(next(self.bars))
            if row is not None:
                self.rows.append(row)
                for predictor in self.predictors.snapshot(SYMBOL).values():
                    predictor.observe(row)

    def decide(self) -> tuple[float, float, EnsembleResult]:
        """One bar: (total µs, features µs, result). Every served model must answer."""
        bar = next(self.bars)  # the feed's work, not the decision's
        clock = self.clock
        t0 = clock()
        row = self.engine.update(bar)
        t1 = clock()
        if row is None:
            raise RuntimeError("bench: features not warm")
        self.rows.append(row)
        result = predict_all(
            self.predictors.snapshot(SYMBOL), row, self.weights, clock, self.spec.hash
        )
        t2 = clock()
        self._check(result)
        return (t2 - t0) / 1000.0, (t1 - t0) / 1000.0, result

    def _check(self, result: EnsembleResult) -> None:
        if result.failures or sorted(o.kind for o in result.outputs) != sorted(self.kinds):
            raise RuntimeError(
                f"bench: expected {list(self.kinds)} to answer, got "
                f"{sorted(o.kind for o in result.outputs)}, failures {list(result.failures)}"
            )


class _CpuWait:
    """The calling thread's time runnable but not running (waiting for a CPU), in ns.

    Reads ``/proc/thread-self/schedstat`` (Linux, ~1 µs a read); None elsewhere.
    Open it on the thread to be watched: the file is bound to the opening thread.
    """

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self._fd = None

    def ns(self) -> int | None:
        if self._fd is None:
            return None
        try:
            return int(os.pread(self._fd, 128, 0).split()[1])
        except (OSError, ValueError, IndexError):
            return None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _Samples:
    """What the loop records during one phase (appended on the loop thread only)."""

    def __init__(self, kinds: Sequence[str]) -> None:
        self.lag_t: list[float] = []
        self.lag_ms: list[float] = []
        self.lag_wait_ms: list[float] = []
        self.dec_t: list[float] = []
        self.dec_us: list[float] = []
        self.dec_wait_us: list[float] = []
        self.feat_us: list[float] = []
        self.model_us: dict[str, list[float]] = {k: [] for k in kinds}


def _waits(values: list[float], n: int) -> np.ndarray | None:
    return np.array(values) if values and len(values) == n else None


async def _ticker(stop: asyncio.Event, out: _Samples, wait: _CpuWait) -> None:
    loop = asyncio.get_running_loop()
    before = wait.ns()
    while not stop.is_set():
        scheduled = loop.time() + TICK_S
        await asyncio.sleep(TICK_S)
        now = loop.time()
        out.lag_t.append(time.perf_counter())
        out.lag_ms.append((now - scheduled) * 1000.0)
        after = wait.ns()
        if before is not None and after is not None:
            out.lag_wait_ms.append((after - before) / 1e6)
        before = after


async def _deciding(stop: asyncio.Event, decider: _Decider, out: _Samples, wait: _CpuWait) -> None:
    while not stop.is_set():
        await asyncio.sleep(DECISION_EVERY_S)
        w0 = wait.ns()
        total, feats, result = decider.decide()
        w1 = wait.ns()
        out.dec_t.append(time.perf_counter())
        out.dec_us.append(total)
        out.feat_us.append(feats)
        if w0 is not None and w1 is not None:
            out.dec_wait_us.append((w1 - w0) / 1000.0)
        for o in result.outputs:
            out.model_us[o.kind].append(o.latency_us)


async def _measure(
    name: str, decider: _Decider, until: Callable[[], Awaitable[T]], worker: int | None
) -> tuple[Phase, T]:
    """Run the ticker and the decisions until ``until()`` finishes."""
    out = _Samples(decider.kinds)
    stop = asyncio.Event()
    wait = _CpuWait()  # on the loop thread, the one it watches
    load0 = _load1()
    cpu0 = _cpu_sample(worker)
    wait0 = wait.ns()
    tasks = [
        asyncio.create_task(_ticker(stop, out, wait), name=f"bench-ticker-{name}"),
        asyncio.create_task(_deciding(stop, decider, out, wait), name=f"bench-bars-{name}"),
    ]
    try:
        result = await until()
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    cpu1 = _cpu_sample(worker)
    wait1 = wait.ns()
    wait.close()
    phase = Phase(
        name=name,
        seconds=cpu1.wall - cpu0.wall,
        lag_t=np.array(out.lag_t),
        lag_ms=np.array(out.lag_ms),
        lag_wait_ms=_waits(out.lag_wait_ms, len(out.lag_ms)),
        decision_t=np.array(out.dec_t),
        decision_us=np.array(out.dec_us),
        decision_wait_us=_waits(out.dec_wait_us, len(out.dec_us)),
        features_us=np.array(out.feat_us),
        model_us={k: np.array(v) for k, v in out.model_us.items()},
        loop_wait_ms=None if wait0 is None or wait1 is None else (wait1 - wait0) / 1e6,
        cpu=_cpu_share(cpu0, cpu1),
        load1=(load0, _load1()),
    )
    return phase, result


# ----------------------------------------------------------------------------- training


def _train_all(
    manager: ModelManager,
    store: ModelStore,
    settings: Settings,
    cols: BarColumns,
    kinds: Sequence[str],
    reason: str,
) -> list[KindRun]:
    """The scheduler thread's work: ``train_one`` per kind, fastest kinds first."""
    rank = {k: i for i, k in enumerate(TRAINING_ORDER)}
    runs = []
    for kind in sorted(kinds, key=lambda k: rank.get(k, len(rank))):
        request = TrainingRequest(SYMBOL, (kind,), cols, reason, len(cols))
        _reset_peak_rss(_worker_pid())
        t0 = time.perf_counter()
        result = manager.train_one(request, kind, timeout_s=settings.autotrain.job_timeout_s)
        t1 = time.perf_counter()
        if result is None:
            raise RuntimeError(f"bench: training {SYMBOL}/{kind} failed (see the log above)")
        runs.append(_kind_run(store, result, t0, t1, _peak_rss_mb(_worker_pid())))
    return runs


def _kind_run(
    store: ModelStore, result: TrainResult, t0: float, t1: float, peak_rss_mb: float | None
) -> KindRun:
    info, outcome = result.info, result.outcome
    stage = store.stages(SYMBOL, info.kind).get(info.version, info.stage)
    validation = outcome.validation or {}
    gates = validation.get("gates") or []
    meta = json.loads((info.path / "model_meta.json").read_text(encoding="utf-8"))
    return KindRun(
        kind=info.kind,
        version=info.version,
        stage=stage,
        worker_s=outcome.seconds,
        wall_s=t1 - t0,
        started=t0,
        finished=t1,
        peak_rss_mb=peak_rss_mb,
        reasons=str(validation.get("reasons") or ""),
        compared_with_production=any(
            str(g.get("name", "")).startswith("vs_production") for g in gates
        ),
        metrics=dict(outcome.metrics),
        training=dict(meta.get("training") or {}),
    )


# ----------------------------------------------------------------------------- swaps


async def _swaps(
    decider: _Decider,
    spec: FeatureSpec,
    kinds: Sequence[str],
    versions: Mapping[str, Sequence[VersionInfo]],
    rounds: int,
    gap_s: float,
    executor: concurrent.futures.Executor,
) -> list[SwapTimes]:
    """Load + warm in a thread (``ModelManager.load``), then prime + swap on the loop."""
    loop = asyncio.get_running_loop()

    def load_warm(kind: str, info: VersionInfo) -> tuple[OnnxPredictor, float]:
        t0 = time.perf_counter()
        predictor = OnnxPredictor.load(
            info.path, feature_hash=spec.hash, kind=kind, version=info.version
        )
        predictor.stage = info.stage
        predictor.warmup()
        return predictor, (time.perf_counter() - t0) * 1000.0

    out = []
    clock = time.perf_counter_ns
    reaper = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bench-reaper")
    for kind in kinds:
        load_ms: list[float] = []
        prime_us: list[float] = []
        swap_us: list[float] = []
        release_us: list[float] = []
        rows = 0
        for r in range(rounds):
            info = versions[kind][r % len(versions[kind])]
            predictor, ms = await loop.run_in_executor(executor, load_warm, kind, info)
            # Back on the loop thread, as ModelManager._install_now runs.
            t0 = clock()
            # As ModelManager.prime: a sequence model gets its window, a row model nothing.
            seq = predictor.sequence_length
            recent = decider.recent_rows(SYMBOL)[-seq:] if seq else []
            for row in recent:
                predictor.observe(row)
            t1 = clock()
            old = decider.predictors.swap(SYMBOL, kind, predictor)
            t2 = clock()
            # As ModelManager.retire: the replaced session is freed on the reaper thread.
            reaper.submit(_drop, old)
            del old
            t3 = clock()
            load_ms.append(ms)
            prime_us.append((t1 - t0) / 1000.0)
            swap_us.append((t2 - t1) / 1000.0)
            release_us.append((t3 - t2) / 1000.0)
            rows = len(recent)
            await asyncio.sleep(gap_s)
        out.append(SwapTimes(kind, load_ms, prime_us, swap_us, release_us, rows))
    reaper.shutdown(wait=True)
    return out


def _drop(predictor: object) -> None:
    """The reaper's job: the last reference goes with this call's arguments."""


# ----------------------------------------------------------------------------- run


async def run(tmp: Path, *, quick: bool) -> Results:
    os.makedirs(tmp, exist_ok=True)
    settings = _settings(quick)
    configure_logging("WARNING", settings.logging.format)
    kinds = tuple(k for k in KINDS if k in settings.models.enabled_kinds)
    sizes = Sizes.pick(quick=quick, train_bars=settings.models.train_bars)
    spec = FeatureSpec()
    clock = SystemClock()

    # Bars: the first training window, the retrain window a day later, then the live bars.
    seq = max(int(settings.models.lstm.seq_len), 1)
    n_warm = spec.window + seq + 10
    n_train_end = sizes.shift_bars + sizes.train_bars
    frame = _market(settings).generate(n_train_end + n_warm + sizes.eval_bars)
    first_cols = BarColumns.from_frame(frame.iloc[: sizes.train_bars])
    retrain_cols = BarColumns.from_frame(frame.iloc[sizes.shift_bars : n_train_end])
    live_bars = iter_bars(frame.iloc[n_train_end:], SYMBOL)

    journal = Journal(tmp / "journal.sqlite3", clock=clock)
    journal.open()
    store = ModelStore(
        tmp / "models",
        clock=clock,
        retention=settings.models.retention,
        on_event=journal_hook(journal),
    )
    predictors = PredictorMap()
    predictors.swap(SYMBOL, "baseline", MomentumBaseline(spec))
    weights: dict[str, float] = {}
    decider = _Decider(spec, settings, predictors, weights, live_bars, kinds)
    loop = asyncio.get_running_loop()

    def call_in_loop(fn: Callable[[], None]) -> None:
        loop.call_soon_threadsafe(fn)

    manager = ModelManager(
        settings=settings,
        store=store,
        backend=LocalProcessBackend(),
        predictors=predictors,
        journal=journal,
        clock=clock,
        feature_spec=spec,
        cache_dir=tmp / "cache",
        recent_rows=decider.recent_rows,
        call_in_loop=call_in_loop,
        baseline=lambda: MomentumBaseline(spec),
    )
    manager.weights = weights
    # The daemon's training thread (APScheduler's ThreadPoolExecutor(1)).
    scheduler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bench-scheduler")
    try:
        # Setup: first models, alone (spawns the worker), promoted and served.
        t0 = time.perf_counter()
        initial = await loop.run_in_executor(
            scheduler, _train_all, manager, store, settings, first_cols, kinds, "bench: first"
        )
        initial_wall = time.perf_counter() - t0
        for run_ in initial:
            store.promote(SYMBOL, run_.kind, run_.version)
        served = manager.load_production(SYMBOL)
        if sorted(served) != sorted(kinds):
            raise RuntimeError(f"bench: serving {served}, expected {list(kinds)}")
        decider.warm(n_warm)
        worker = _worker_pid()

        async def idle() -> None:
            await asyncio.sleep(sizes.baseline_s)

        async def retrain() -> list[KindRun]:
            return await loop.run_in_executor(
                scheduler,
                _train_all,
                manager,
                store,
                settings,
                retrain_cols,
                kinds,
                "bench: scheduled retrain",
            )

        before, _ = await _measure("idle, before", decider, idle, worker)
        t0 = time.perf_counter()
        during, retrained = await _measure("full retrain", decider, retrain, worker)
        retrain_wall = time.perf_counter() - t0
        after, _ = await _measure("idle, after", decider, idle, worker)

        production = {k: store.resolve(SYMBOL, k) for k in kinds}
        versions: dict[str, list[VersionInfo]] = {}
        for run_ in retrained:
            prod = production[run_.kind]
            assert prod is not None
            versions[run_.kind] = [store.version_info(SYMBOL, run_.kind, run_.version), prod]

        async def swap_all() -> list[SwapTimes]:
            return await _swaps(
                decider, spec, kinds, versions, sizes.swap_rounds, sizes.swap_gap_s, scheduler
            )

        swapping, swaps = await _measure("swaps", decider, swap_all, worker)
    finally:
        manager.stop()  # first: a job still running is abandoned, its thread returns
        scheduler.shutdown(wait=True)
        journal.close()
    return Results(
        quick=quick,
        sizes=sizes,
        initial=initial,
        initial_wall_s=initial_wall,
        retrain=retrained,
        retrain_wall_s=retrain_wall,
        phases=[before, during, after, swapping],
        swaps=swaps,
        heavy_in_parent=[m for m in HEAVY if m in sys.modules],
    )


# ----------------------------------------------------------------------------- report


def _phase(r: Results, name: str) -> Phase:
    return next(p for p in r.phases if p.name == name)


def _idle_lag(r: Results) -> np.ndarray:
    return np.concatenate([_phase(r, "idle, before").lag_ms, _phase(r, "idle, after").lag_ms])


def _idle_decisions(r: Results) -> np.ndarray:
    return np.concatenate(
        [_phase(r, "idle, before").decision_us, _phase(r, "idle, after").decision_us]
    )


def _while(values: np.ndarray, times: np.ndarray, start: float, end: float) -> np.ndarray:
    mask = (times >= start) & (times <= end)
    return values[mask]


def _attribution(r: Results) -> list[str]:
    """How much of the slow ticks and decisions was the loop thread waiting for a core."""
    out = []
    for p in r.phases:
        slow = p.lag_ms > TARGET_LAG_MAX_MS
        text = f"*{p.name}*: ticks late by more than {TARGET_LAG_MAX_MS:g} ms: {int(slow.sum())}"
        if slow.any() and p.lag_wait_ms is not None:
            share = p.lag_wait_ms[slow].sum() / p.lag_ms[slow].sum()
            text += f" ({share:.0%} of their lag spent waiting for a core)"
        slow_d = p.decision_us > TARGET_DECISION_P99_MS * 1000.0
        text += f"; decisions over {TARGET_DECISION_P99_MS:g} ms: {int(slow_d.sum())}"
        if p.decision_wait_us is not None and p.decision_us.size:
            if slow_d.any():
                share = p.decision_wait_us[slow_d].sum() / p.decision_us[slow_d].sum()
                text += f" ({share:.0%} of their time waiting for a core)"
            on_cpu = p.decision_us - p.decision_wait_us
            text += f"; decision p99 without the waits for a core {_pct(on_cpu, 99) / 1000:.2f} ms"
        out.append(text + ".")
    return out


def _targets(r: Results) -> list[tuple[str, str, str]]:
    during = _phase(r, "full retrain")
    lag_max = _max(during.lag_ms)
    dec_p99_ms = _pct(during.decision_us, 99) / 1000.0
    small = r.quick or r.sizes.train_bars < TARGET_TRAIN_BARS
    total = r.retrain_wall_s
    return [
        (
            f"event-loop lag max ≤ {TARGET_LAG_MAX_MS:g} ms during the full retrain",
            f"{lag_max:.1f} ms (p99 {_pct(during.lag_ms, 99):.1f} ms; idle max "
            f"{_max(_idle_lag(r)):.1f} ms)",
            _verdict(lag_max <= TARGET_LAG_MAX_MS),
        ),
        (
            f"decision p99 ≤ {TARGET_DECISION_P99_MS:g} ms during the full retrain",
            f"{dec_p99_ms:.2f} ms (idle p99 {_pct(_idle_decisions(r), 99) / 1000.0:.2f} ms)",
            _verdict(dec_p99_ms <= TARGET_DECISION_P99_MS),
        ),
        (
            f"full retrain RF+XGB+LSTM+MLP on {TARGET_TRAIN_BARS:,} bars ≤ "
            f"{TARGET_RETRAIN_S:.0f} s beside the live loop",
            f"{total:.1f} s on {r.sizes.train_bars:,} bars" + (" at quick sizes" if small else ""),
            "not checked (quick sizes)" if small else _verdict(total <= TARGET_RETRAIN_S),
        ),
    ]


def _cpu_text(c: CpuShare | None) -> str:
    if c is None:
        return "n/a"
    return f"{c.machine:.2f} ({c.this_process:.2f} / {c.worker:.2f} / {c.others:.2f})"


def _lstm_text(r: Results) -> str | None:
    lstm = next((k for k in r.retrain if k.kind == "lstm"), None)
    alone = next((k for k in r.initial if k.kind == "lstm"), None)
    if lstm is None:
        return None
    tr = lstm.training
    steps = int(tr.get("max_steps") or 0)
    batch = int(tr.get("batch_size") or 0)
    n = int(tr.get("n_samples") or 0)
    val = tr.get("val_loss")
    if steps <= 0:
        return None
    others = sum(k.wall_s for k in r.retrain if k.kind != "lstm")
    per_step = lstm.worker_s / steps  # fixed costs included: an upper bound
    fit = max(0.0, (TARGET_RETRAIN_S - others) / per_step)
    epochs = steps * batch / n if n else float("nan")
    text = (
        f"LSTM beside the loop: **{steps} steps x batch {batch}** ({epochs:.2f} epochs over "
        f"{n:,} windows) in {lstm.worker_s:.1f} s"
        + (f" (alone: {alone.worker_s:.1f} s)" if alone is not None else "")
        + ", best validation loss "
        + (f"**{val:.4f}**" if isinstance(val, int | float) else "n/a")
        + f" at step {tr.get('best_step')} (ln 3 = 1.0986). At {per_step:.3f} s per step "
        f"(fixed costs included, so an upper bound), the {TARGET_RETRAIN_S:.0f} s budget minus "
        f"the other kinds' {others:.1f} s leaves room for at least **{fit:,.0f} steps** beside "
        "the loop."
    )
    return text


def summary_lines(r: Results) -> list[str]:
    lines = []
    for p in r.phases:
        lines.append(
            f"autotrain: {p.name:<13} {p.seconds:6.1f} s  lag p50 {_pct(p.lag_ms, 50):5.2f} "
            f"p99 {_pct(p.lag_ms, 99):6.2f} max {_max(p.lag_ms):7.2f} ms  decision p50 "
            f"{_pct(p.decision_us, 50) / 1000:5.2f} p99 {_pct(p.decision_us, 99) / 1000:5.2f} "
            f"max {_max(p.decision_us) / 1000:6.2f} ms (n={p.decision_us.size})  cpu "
            f"{_cpu_text(p.cpu)}"
        )
    lines.append(
        f"autotrain: retrain {r.retrain_wall_s:.1f} s beside the loop ("
        + ", ".join(f"{k.kind} {k.wall_s:.1f} s" for k in r.retrain)
        + f"); alone {r.initial_wall_s:.1f} s ("
        + ", ".join(f"{k.kind} {k.wall_s:.1f} s" for k in r.initial)
        + ")"
    )
    rss = [f"{k.kind} {k.peak_rss_mb:.0f}" for k in r.retrain if k.peak_rss_mb is not None]
    if rss:
        lines.append(f"autotrain: worker peak RSS MB: {', '.join(rss)}")
    for s in r.swaps:
        lines.append(
            f"autotrain: swap {s.kind:<4} load+warm p50 {_pct(s.load_warm_ms, 50):7.1f} max "
            f"{_max(s.load_warm_ms):7.1f} ms (thread); on the loop prime p50 "
            f"{_pct(s.prime_us, 50):7.1f} us, swap p50 {_pct(s.swap_us, 50):5.1f} max "
            f"{_max(s.swap_us):5.1f} us, release old p50 {_pct(s.release_us, 50):7.1f} max "
            f"{_max(s.release_us):7.1f} us"
        )
    for name, measured, verdict in _targets(r):
        lines.append(f"autotrain: target {name}: {measured}: {verdict.replace('**', '')}")
    return lines


def render(r: Results) -> str:
    s = r.sizes
    ncpu = os.cpu_count()
    lines = [
        "## Auto-trainer: the live loop during a full retrain, and swaps (`bench/autotrain.py`)",
        "",
        "One process stands in for the daemon: an asyncio loop with a 10 ms ticker (lag = "
        "actual wake-up minus scheduled) and a decision every "
        f"{DECISION_EVERY_S * 1000:g} ms (features + the {len(KINDS)} served ONNX models + "
        "`predict_all`, through one `PredictorMap` snapshot). A scheduler thread runs "
        "`ModelManager.train_one` for each kind (the daemon's jobs: gates on, `production_dir` "
        "at the served version) through `LocalProcessBackend` (one spawned worker, one thread "
        "per library), commits and journals each. "
        f"The daemon's synthetic EURUSD market: {s.train_bars:,} bars per training window, the "
        f"retrain window {s.shift_bars:,} bars later than the first, decisions on the bars "
        "after both. "
        + (
            "**Quick sizes** (tiny models): the figures only show the benchmark runs."
            if r.quick
            else "Model sizes are the settings' defaults (`config/settings.toml`)."
        ),
        "",
        "### Targets",
        "",
        "| target | measured | result |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in _targets(r)]

    lines += [
        "",
        "### Event-loop lag and decision latency",
        "",
        f"*CPU, cores of {ncpu}*: the machine's busy time over the phase (this process / the "
        "training worker / everything else, i.e. other tenants), from `/proc`. "
        "*Loop waits*: time the loop thread was runnable but not running (no free core), ms "
        "per second of the phase (Linux schedstat). *Idle* phases: the same loop, the worker "
        "alive but idle.",
        "",
        "| phase | s | ticks | lag p50 ms | lag p99 ms | lag max ms | decisions | "
        "decision p50 ms | decision p99 ms | decision max ms | CPU, cores | loop waits ms/s | "
        "load1 start → end |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for p in r.phases:
        waits = f"{p.loop_wait_ms / p.seconds:.1f}" if p.loop_wait_ms is not None else "n/a"
        lines.append(
            f"| {p.name} | {p.seconds:.1f} | {p.lag_ms.size:,} | {_pct(p.lag_ms, 50):.2f} | "
            f"{_pct(p.lag_ms, 99):.2f} | {_max(p.lag_ms):.2f} | {p.decision_us.size:,} | "
            f"{_pct(p.decision_us, 50) / 1000:.2f} | {_pct(p.decision_us, 99) / 1000:.2f} | "
            f"{_max(p.decision_us) / 1000:.2f} | {_cpu_text(p.cpu)} | {waits} | "
            f"{p.load1[0]:.2f} → {p.load1[1]:.2f} |"
        )
    lines += ["", *(f"- {line}" for line in _attribution(r))]

    # -- decision parts
    lines += [
        "",
        "Decision parts (µs), idle phases together against the retrain, each model's "
        "`predict_proba` as `predict_all` times it:",
        "",
        "| part | idle p50 | idle p99 | retrain p50 | retrain p99 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    during = _phase(r, "full retrain")
    idle = [_phase(r, "idle, before"), _phase(r, "idle, after")]
    parts: list[tuple[str, np.ndarray, np.ndarray]] = [
        ("features", np.concatenate([p.features_us for p in idle]), during.features_us)
    ]
    for kind in KINDS:
        if kind in during.model_us:
            idle_kind = np.concatenate([p.model_us[kind] for p in idle])
            parts.append((kind, idle_kind, during.model_us[kind]))
    parts.append(("whole decision", _idle_decisions(r), during.decision_us))
    for name, idle_us, busy_us in parts:
        lines.append(
            f"| {name} | {_pct(idle_us, 50):,.0f} | {_pct(idle_us, 99):,.0f} | "
            f"{_pct(busy_us, 50):,.0f} | {_pct(busy_us, 99):,.0f} |"
        )

    # -- retrain per kind
    lines += [
        "",
        "### Retrain duration per kind",
        "",
        "*Worker s*: `run_training` (features, labels, split, fit, holdout, artifacts incl. "
        "ONNX, drift reference, gates incl. the comparison with production). *Wall s*: "
        "`train_one` in the scheduler thread (adds the bar cache, IPC, `commit_draft`, stage, "
        "journal, retention). *Alone*: the first training of the same kinds before the loop "
        "ran (no loop, no production to compare with); its first job's wall time includes "
        "spawning the worker and the worker's imports. Lag and decisions: while that kind "
        "trained.",
        "",
        "| kind | alone worker / wall s | beside the loop worker / wall s | worker peak RSS MB | "
        "lag p99 / max ms (max at s into the job) | decision p99 / max ms | gates |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    alone = {k.kind: k for k in r.initial}
    for k in r.retrain:
        a = alone.get(k.kind)
        lag = _while(during.lag_ms, during.lag_t, k.started, k.finished)
        lag_at = _while(during.lag_t, during.lag_t, k.started, k.finished)
        at = f" (at {lag_at[int(lag.argmax())] - k.started:.1f})" if lag.size else ""
        dec = _while(during.decision_us, during.decision_t, k.started, k.finished)
        gates = (
            "passed" if k.stage == "validated" else f"{k.stage}: {k.reasons or '(no reason given)'}"
        )
        if not k.compared_with_production:
            gates += " (production not compared)"
        rss = f"{k.peak_rss_mb:,.0f}" if k.peak_rss_mb is not None else "n/a"
        lines.append(
            f"| {k.kind} {k.version} | "
            + (f"{a.worker_s:.1f} / {a.wall_s:.1f}" if a else "n/a")
            + f" | {k.worker_s:.1f} / {k.wall_s:.1f} | {rss} | {_pct(lag, 99):.2f} / "
            f"{_max(lag):.2f}{at} | {_pct(dec, 99) / 1000:.2f} / {_max(dec) / 1000:.2f} | "
            f"{gates} |"
        )
    lines.append(f"| **total** | **{r.initial_wall_s:.1f}** | **{r.retrain_wall_s:.1f}** | | | | |")
    lstm = _lstm_text(r)
    if lstm:
        lines += ["", lstm]

    # -- swaps
    lines += [
        "",
        "### Swap time",
        "",
        f"Per kind, {s.swap_rounds} swaps alternating the retrained and the production "
        "version, with the ticker and the decisions running (phase *swaps* above). "
        "*Load + warm*: `OnnxPredictor.load` + `warmup` in the scheduler thread (what "
        "`ModelManager.load` does off the loop). On the loop: *prime* feeds a sequence "
        "model its window of recent feature rows (row models need none), *swap* is "
        "`PredictorMap.swap`, *release* hands the replaced predictor to the reaper thread "
        "(`ModelManager.retire`: its ONNX Runtime session is freed there, off the loop).",
        "",
        "| kind | load + warm ms p50 / max | prime µs p50 / max (rows) | swap µs p50 / max | "
        "release µs p50 / max |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for sw in r.swaps:
        lines.append(
            f"| {sw.kind} | {_pct(sw.load_warm_ms, 50):.1f} / {_max(sw.load_warm_ms):.1f} | "
            f"{_pct(sw.prime_us, 50):,.1f} / {_max(sw.prime_us):,.1f} ({sw.rows}) | "
            f"{_pct(sw.swap_us, 50):.1f} / {_max(sw.swap_us):.1f} | "
            f"{_pct(sw.release_us, 50):,.1f} / {_max(sw.release_us):,.1f} |"
        )
    heavy = ", ".join(r.heavy_in_parent) or "none"
    lines += [
        "",
        f"Heavy libraries in this (serving) process at the end: **{heavy}** (torch, "
        "scikit-learn and xgboost must never load here: unpickling one stalls the loop).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    import tempfile

    np.seterr(all="ignore")
    with tempfile.TemporaryDirectory() as tmp_dir:
        results = asyncio.run(run(Path(tmp_dir), quick="--quick" in sys.argv[1:]))
    for line in summary_lines(results):
        print(line)
    print(render(results))
