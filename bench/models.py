"""The four model kinds end to end: training, serving latency, cold start, store operations.

Everything below is measured in one run, side by side, on the same bars:

1. **Training.** RF, XGB, LSTM and MLP are trained once from synthetic bars
   (the daemon's own synthetic EURUSD market) with ``ml.training.run_training``
   in the daemon's training worker (``LocalProcessBackend``: one spawned
   process, one thread per library), in the daemon's order, and committed to a
   ``ModelStore`` in the temporary directory. Reported: each kind's time in the
   worker (features + labels + fit + holdout + artifacts incl. ONNX) and in the
   parent (plus the spawn and the imports of the first job), the holdout
   metrics, and the LSTM's step budget with the validation loss it reaches.
2. **Decision latency for one bar** = ``FeatureEngine.update`` + every enabled
   model (``OnnxPredictor.predict_proba``) + ``predict_all``, timed like
   ``ScalpingStrategy.on_bar`` times it: (a) in a tight loop over pre-generated
   bars, (b) once per bar from a running asyncio loop that sleeps 10 ms between
   bars (caches go cold), (c) the naive variant (the kinds' native
   scikit-learn / XGBoost / torch ``predict_proba`` per row, loaded with
   ``ml.kinds``) for a few hundred bars, in the same process after (a)-(b).
3. **Cold start**, each in a fresh ``python`` process, timed from just before
   the parent spawns it (wall clock) to the moment it is ready:
   ``serving path`` imports what serving needs (numpy, onnxruntime, the store,
   features, ensemble), resolves each production version (re-hashing every
   file), loads and warms the four ``OnnxPredictor``; ``daemon`` runs
   ``python main.py --max-bars 1`` against the store and takes its own
   ``daemon_ready`` log timestamp (settings, journal, synthetic history,
   feature warm-up, model load + warm-up, everything ``start_daemon`` does).
   The interpreter alone (``python -c pass``) is the floor.
4. **First decision vs steady**: the first decision of the fresh serving
   process (after its warm-up bars) against that process's own steady p99,
   and the first decision after reloading the models in this process (a
   model swap) against this process's tight p99.
5. **Store**: ``commit_draft`` (hash + fsync + rename), ``promote``,
   ``verify`` (re-hash a version), ``diff`` (compare two manifests) and
   ``resolve`` (what a load does: aliases + re-hash) per kind.

Nothing is asserted: the rendered text says MET / NOT MET with the figure.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from config.settings import Settings, load_settings
from market_data.bars import Bar, iter_bars
from market_data.synthetic import SyntheticMarket, paper_market
from ml.model_manager import TRAINING_ORDER, seed_param
from ml.predictor_map import PredictorMap
from ml.serving import OnnxPredictor
from ml.store import MANIFEST_NAME, ModelStore, VersionInfo
from ml.training import LocalProcessBackend, TrainJob, TrainOutcome, save_bar_cache
from strategy.baseline import PredictorNotReady
from strategy.ensemble import predict_all
from strategy.features import BarColumns, FeatureEngine, FeatureSpec
from utils.clock import SystemClock, parse_iso_utc

ROOT = Path(__file__).resolve().parent.parent
SYMBOL = "EURUSD"
KINDS = ("rf", "xgb", "lstm", "mlp")

# Targets (issue 3 items 4 and 8, CONVENTIONS.md "Targets, made precise").
TARGET_TIGHT_P99_US = 1_000.0
TARGET_CADENCE_P99_US = 3_000.0
TARGET_READY_S = 1.5
TARGET_FIRST_VS_P99 = 2.0
TARGET_TRAIN_S = 120.0
TARGET_TRAIN_BARS = 50_000
CADENCE_S = 0.010

# Quick (CI smoke) sizes: tiny models, few bars. Full sizes are the settings' defaults.
QUICK_ENV = {
    "SCALPER__MODELS__RF__N_ESTIMATORS": "20",
    "SCALPER__MODELS__RF__MAX_DEPTH": "6",
    "SCALPER__MODELS__XGB__N_ESTIMATORS": "20",
    "SCALPER__MODELS__XGB__MAX_DEPTH": "4",
    "SCALPER__MODELS__LSTM__SEQ_LEN": "20",
    "SCALPER__MODELS__LSTM__HIDDEN_SIZE_1": "16",
    "SCALPER__MODELS__LSTM__HIDDEN_SIZE_2": "8",
    "SCALPER__MODELS__LSTM__MAX_STEPS": "20",
    "SCALPER__MODELS__LSTM__BATCH_SIZE": "64",
    "SCALPER__MODELS__MLP__HIDDEN_1": "16",
    "SCALPER__MODELS__MLP__HIDDEN_2": "16",
    "SCALPER__MODELS__MLP__HIDDEN_3": "16",
    "SCALPER__MODELS__MLP__MAX_STEPS": "100",
    "SCALPER__MODELS__MLP__BATCH_SIZE": "64",
}


@dataclass(frozen=True)
class Sizes:
    train_bars: int
    tight_bars: int
    cadence_bars: int
    naive_bars: int
    child_steady_bars: int
    swap_rounds: int
    cold_runs: int  # daemon and import processes
    serving_runs: int  # serving-path processes (cheap)
    store_reps: int

    @classmethod
    def pick(cls, *, quick: bool, train_bars: int) -> Sizes:
        if quick:
            return cls(3_000, 1_000, 200, 100, 300, 3, 1, 2, 2)
        return cls(train_bars, 10_000, 2_000, 300, 2_000, 5, 3, 5, 5)


@dataclass(frozen=True)
class KindTraining:
    kind: str
    version: str
    hyperparams: dict[str, Any]
    worker_s: float  # inside run_training: dataset, fit, holdout, artifacts
    wall_s: float  # submit to result in the parent (spawn + imports for the first job)
    metrics: dict[str, float]
    samples: dict[str, int]
    training: dict[str, Any]  # the kind's training record (model_meta.json)
    artifact_bytes: int
    onnx_bytes: int


@dataclass(frozen=True)
class StoreTimes:
    kind: str
    commit_ms: list[float]
    promote_ms: float
    verify_ms: list[float]
    diff_ms: list[float]
    resolve_ms: list[float]
    diff_keys: int


@dataclass(frozen=True)
class ColdRuns:
    name: str
    what: str
    seconds: list[float]
    detail: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class FirstCall:
    """The first decision of a fresh serving process and its steady figures after it."""

    first_us: float
    steady_p50_us: float
    steady_p99_us: float
    steady_n: int
    per_model_us: dict[str, float]

    @property
    def ratio(self) -> float:
        return self.first_us / self.steady_p99_us


@dataclass(frozen=True)
class Results:
    quick: bool
    train_bars: int
    sizes: Sizes
    training: list[KindTraining]
    training_wall_s: float
    lstm_calibration: LstmCalibration | None
    store: list[StoreTimes]
    tight: dict[str, np.ndarray]  # "decision", "features", "model:<kind>"
    cadence: np.ndarray
    naive: dict[str, np.ndarray]
    naive_error: str | None
    swap_first_us: list[float]
    fresh_first: list[FirstCall]  # one per fresh serving process
    load: dict[str, float]  # 1-minute load average at points of the run
    n_warm: int
    cold: list[ColdRuns]
    reload_ms: dict[str, list[float]]  # in-process resolve + load + warm-up per kind
    heavy_in_daemon: list[str]
    heavy_in_serving: list[str]
    heavy_after_training: list[str]  # in this (parent) process, after receiving the outcomes


# ----------------------------------------------------------------------------- helpers


def _pct(values: Sequence[float] | np.ndarray, q: float) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(np.percentile(arr, q)) if arr.size else float("nan")


def _max(values: Sequence[float] | np.ndarray) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.max()) if arr.size else float("nan")


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _load1() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return float("nan")


def _verdict(ok: bool) -> str:
    return "**MET**" if ok else "**NOT MET**"


def _settings(quick: bool) -> Settings:
    return load_settings(environ=QUICK_ENV if quick else {})


def _market(settings: Settings) -> SyntheticMarket:
    """The daemon's own synthetic market for the first symbol (same seed, price, spread)."""
    spec = settings.symbols[SYMBOL]
    return paper_market(
        SYMBOL,
        index=0,
        seed=settings.paper.synthetic_seed,
        start=parse_iso_utc(settings.paper.synthetic_start),
        timeframe_s=settings.trading.timeframe_s,
        point=spec.point,
        default_spread_points=spec.default_spread_points,
    )


def _dir_bytes(path: Path, suffix: str | None = None) -> int:
    return sum(
        p.stat().st_size
        for p in path.rglob("*")
        if p.is_file() and (suffix is None or p.name.endswith(suffix))
    )


def _timed_ms(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return (time.perf_counter() - t0) * 1000.0, out


# ----------------------------------------------------------------------------- 1. training


@dataclass(frozen=True)
class LstmCalibration:
    """A second, short LSTM run: two budgets give the per-step cost apart from fixed costs."""

    steps: int
    worker_s: float
    val_loss: float | None
    best_step: int | None


async def _train_all(
    settings: Settings, store: ModelStore, cols: BarColumns, cache_dir: Path, spec: FeatureSpec
) -> tuple[
    list[KindTraining],
    dict[str, tuple[VersionInfo, TrainOutcome, float, float]],
    float,
    LstmCalibration | None,
]:
    sym = settings.symbols[SYMBOL]
    cache = save_bar_cache(cache_dir / f"{SYMBOL}.npz", cols)
    backend = LocalProcessBackend()
    trained: list[KindTraining] = []
    committed: dict[str, tuple[VersionInfo, TrainOutcome, float, float]] = {}

    def job_for(kind: str, draft: Path, **override: Any) -> TrainJob:
        return TrainJob(
            symbol=SYMBOL,
            kind=kind,
            hyperparams={
                **settings.models.kind(kind).hyperparams(),
                **seed_param(kind, settings.models.seed),
                **override,
            },
            bars_path=str(cache),
            draft_dir=str(draft),
            point=sym.point,
            default_spread_points=sym.default_spread_points,
            horizon=settings.models.horizon_bars,
            threshold_atr=settings.models.label_threshold_atr,
            feature_params=dict(spec.params),
            max_rows=len(cols),
        )

    t_all = time.perf_counter()
    calibration: LstmCalibration | None = None
    try:
        for kind in (k for k in TRAINING_ORDER if k in settings.models.enabled_kinds):
            draft = store.new_draft_dir(SYMBOL, kind)
            job = job_for(kind, draft)
            t0 = time.perf_counter()
            outcome = await asyncio.wrap_future(backend.submit(job))
            wall = time.perf_counter() - t0
            commit_ms, info = _timed_ms(
                store.commit_draft, draft, symbol=SYMBOL, kind=kind, manifest=outcome.manifest
            )
            promote_ms, info = _timed_ms(store.promote, SYMBOL, kind, info.version)
            meta = json.loads((info.path / "model_meta.json").read_text(encoding="utf-8"))
            trained.append(
                KindTraining(
                    kind=kind,
                    version=info.version,
                    hyperparams=dict(outcome.manifest["hyperparams"]),
                    worker_s=outcome.seconds,
                    wall_s=wall,
                    metrics=dict(outcome.metrics),
                    samples=dict(outcome.manifest["samples"]),
                    training=dict(meta.get("training") or {}),
                    artifact_bytes=_dir_bytes(info.path),
                    onnx_bytes=_dir_bytes(info.path, ".onnx"),
                )
            )
            committed[kind] = (info, outcome, commit_ms, promote_ms)
        training_wall = time.perf_counter() - t_all
        if "lstm" in committed:
            # Same seed, same batches: the short run is the first steps of the long one.
            steps = max(2, settings.models.lstm.max_steps // 10)
            draft = store.new_draft_dir(SYMBOL, "lstm")
            try:
                short = await asyncio.wrap_future(
                    backend.submit(job_for("lstm", draft, max_steps=steps))
                )
                record = json.loads((draft / "model_meta.json").read_text(encoding="utf-8"))
            finally:
                store.discard_draft(draft)
            tr = record.get("training") or {}
            calibration = LstmCalibration(
                steps, short.seconds, tr.get("val_loss"), tr.get("best_step")
            )
    finally:
        backend.shutdown()
    return trained, committed, training_wall, calibration


# ----------------------------------------------------------------------------- 5. store


def _store_times(
    store: ModelStore,
    committed: Mapping[str, tuple[VersionInfo, TrainOutcome, float, float]],
    reps: int,
) -> list[StoreTimes]:
    """Register copies of each trained version (real artifact sizes), then compare them."""
    out = []
    for kind, (info, outcome, first_commit_ms, promote_ms) in committed.items():
        commits = [first_commit_ms]
        newest = info.version
        for rep in range(reps):
            draft = store.new_draft_dir(SYMBOL, kind)
            for src in info.path.rglob("*"):
                if src.is_file() and src.name != MANIFEST_NAME:
                    dst = draft / src.relative_to(info.path)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, dst)
            # A retrain of the same configuration one bar later: a PATCH version.
            manifest = dict(outcome.manifest)
            manifest["training_window"] = dict(
                manifest["training_window"], note=f"bench copy {rep + 1}"
            )
            ms, new = _timed_ms(
                store.commit_draft, draft, symbol=SYMBOL, kind=kind, manifest=manifest
            )
            commits.append(ms)
            newest = new.version
        verify, diff, resolve = [], [], []
        diff_keys = 0
        for _ in range(max(reps, 3)):
            ms, problems = _timed_ms(store.verify, SYMBOL, kind, info.version)
            if problems:
                raise RuntimeError(f"bench: {SYMBOL}/{kind} {info.version}: {problems}")
            verify.append(ms)
            ms, changed = _timed_ms(store.diff, SYMBOL, kind, info.version, newest)
            diff.append(ms)
            diff_keys = len(changed)
            ms, _ = _timed_ms(store.resolve, SYMBOL, kind)
            resolve.append(ms)
        out.append(StoreTimes(kind, commits, promote_ms, verify, diff, resolve, diff_keys))
    return out


# ----------------------------------------------------------------------------- 2. latency


def _load_onnx(
    store: ModelStore, spec: FeatureSpec, kinds: Sequence[str]
) -> tuple[dict[str, OnnxPredictor], dict[str, float]]:
    """What ``ModelManager.load_production`` does per kind: resolve (re-hash), load, warm up."""
    predictors: dict[str, OnnxPredictor] = {}
    ms: dict[str, float] = {}
    for kind in kinds:
        t0 = time.perf_counter()
        info = store.resolve(SYMBOL, kind)
        if info is None:
            raise RuntimeError(f"bench: no production {SYMBOL}/{kind} in {store.root}")
        predictor = OnnxPredictor.load(
            info.path, feature_hash=spec.hash, kind=kind, version=info.version
        )
        predictor.warmup()
        ms[kind] = (time.perf_counter() - t0) * 1000.0
        predictors[kind] = predictor
    return predictors, ms


class _Decider:
    """One symbol's decision path as ``ScalpingStrategy`` runs it (features + ensemble)."""

    def __init__(self, spec: FeatureSpec, settings: Settings, predictors: Mapping[str, Any]):
        sym = settings.symbols[SYMBOL]
        self.spec = spec
        self.engine = FeatureEngine(
            spec, point=sym.point, default_spread_points=sym.default_spread_points
        )
        self.map = PredictorMap()
        for kind, predictor in predictors.items():
            self.map.swap(SYMBOL, kind, predictor)
        self.rows: deque[np.ndarray] = deque(maxlen=1_000)
        self.clock = time.perf_counter_ns

    def warm(self, bars: Sequence[Bar]) -> None:
        """``ScalpingStrategy.warm``: features and sequence windows, no predictions."""
        for bar in bars:
            row = self.engine.update(bar)
            if row is not None:
                self.rows.append(row)
                for predictor in self.map.snapshot(SYMBOL).values():
                    predictor.observe(row)

    def decide(self, bar: Bar) -> tuple[float, float, Any]:
        """(total µs, features µs, ensemble result) for one bar."""
        clock = self.clock
        t0 = clock()
        row = self.engine.update(bar)
        t1 = clock()
        if row is None:
            raise RuntimeError("bench: features not warm")
        self.rows.append(row)
        result = predict_all(self.map.snapshot(SYMBOL), row, {}, clock, self.spec.hash)
        t2 = clock()
        return (t2 - t0) / 1000.0, (t1 - t0) / 1000.0, result


def _check_result(result: Any, kinds: Sequence[str], variant: str) -> None:
    answered = sorted(o.kind for o in result.outputs)
    if result.failures or answered != sorted(kinds):
        raise RuntimeError(
            f"bench ({variant}): expected every model to answer, got {answered}, "
            f"failures {list(result.failures)}"
        )


def _tight(decider: _Decider, bars: Sequence[Bar], kinds: Sequence[str]) -> dict[str, np.ndarray]:
    n = len(bars)
    total = np.empty(n)
    feats = np.empty(n)
    per_model = {k: np.empty(n) for k in kinds}
    for i, bar in enumerate(bars):
        total[i], feats[i], result = decider.decide(bar)
        for o in result.outputs:
            per_model[o.kind][i] = o.latency_us
        if i == 0:
            _check_result(result, kinds, "tight")
    out = {"decision": total, "features": feats}
    out.update({f"model:{k}": v for k, v in per_model.items()})
    return out


async def _at_cadence(decider: _Decider, bars: Sequence[Bar], kinds: Sequence[str]) -> np.ndarray:
    out = np.empty(len(bars))
    for i, bar in enumerate(bars):
        await asyncio.sleep(CADENCE_S)
        out[i], _, result = decider.decide(bar)
        if i == 0:
            _check_result(result, kinds, "cadence")
    return out


class _NativePredictor:
    """The naive path: a kind's native ``predict_proba`` on one row (or the last window)."""

    def __init__(self, model: Any, kind: str, version: str, feature_hash: str) -> None:
        self.model = model
        self.kind = kind
        self.version = version
        self.feature_hash = feature_hash
        self.stage = "production"
        self.seq = int(model.sequence_length)
        self.window: deque[np.ndarray] = deque(maxlen=max(self.seq, 1))

    def observe(self, row: np.ndarray) -> None:
        if self.seq:
            self.window.append(row)

    def predict_proba(self, row: np.ndarray) -> np.ndarray:
        if not self.seq:
            return np.asarray(self.model.predict_proba(row[np.newaxis, :])[0])
        self.window.append(row)
        if len(self.window) < self.seq:
            raise PredictorNotReady(f"{len(self.window)}/{self.seq}")
        return np.asarray(self.model.predict_proba(np.stack(self.window))[-1])


def _naive(
    store: ModelStore,
    spec: FeatureSpec,
    settings: Settings,
    kinds: Sequence[str],
    warm_bars: Sequence[Bar],
    bars: Sequence[Bar],
) -> dict[str, np.ndarray]:
    from ml.kinds import get_kind  # imports scikit-learn, xgboost and torch in this process

    natives = {}
    for kind in kinds:
        info = store.resolve(SYMBOL, kind)
        assert info is not None
        model = get_kind(kind).load(info.path, feature_hash=spec.hash)
        model.warmup()
        natives[kind] = _NativePredictor(model, kind, info.version, spec.hash)
    decider = _Decider(spec, settings, natives)
    decider.warm(warm_bars)
    n = len(bars)
    total = np.empty(n)
    per_model = {k: np.empty(n) for k in kinds}
    for i, bar in enumerate(bars):
        total[i], _, result = decider.decide(bar)
        if i == 0:
            _check_result(result, kinds, "naive")
        for o in result.outputs:
            per_model[o.kind][i] = o.latency_us
    out = {"decision": total}
    out.update({f"model:{k}": v for k, v in per_model.items()})
    return out


# ----------------------------------------------------------------------------- 3./4. cold


HEAVY = ("torch", "sklearn", "xgboost", "pandas", "scipy")

_SERVING_CHILD = r"""
import sys, time
t_start = time.time()
HEAVY = {heavy!r}
import json
from datetime import UTC, datetime
from pathlib import Path
import numpy as np
from ml.serving import OnnxPredictor
from ml.store import ModelStore
from strategy.ensemble import predict_all
from strategy.features import FeatureEngine, FeatureSpec
from utils.clock import SystemClock
t_imported = time.time()
root, symbol, kinds = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
point, spread = float(sys.argv[4]), int(sys.argv[5])
spec = FeatureSpec()
store = ModelStore(Path(root), clock=SystemClock())
predictors = {}
for kind in kinds:
    info = store.resolve(symbol, kind)
    p = OnnxPredictor.load(info.path, feature_hash=spec.hash, kind=kind, version=info.version)
    p.warmup()
    predictors[kind] = p
t_ready = time.time()
heavy = sorted(m for m in HEAVY if m in sys.modules)
out = {"t_start": t_start, "t_imported": t_imported, "t_ready": t_ready, "heavy": heavy}
if len(sys.argv) > 6:
    from market_data.bars import Bar
    with np.load(sys.argv[6], allow_pickle=False) as data:
        cols = {k: data[k] for k in data.files}
    n_warm = int(sys.argv[7])
    bars = [
        Bar(symbol, datetime.fromtimestamp(int(t) // 1_000_000_000, tz=UTC), float(o), float(h),
            float(lo), float(c), int(v), int(s))
        for t, o, h, lo, c, v, s in zip(cols["time_ns"], cols["open"], cols["high"], cols["low"],
                                        cols["close"], cols["tick_volume"], cols["spread"])
    ]
    engine = FeatureEngine(spec, point=point, default_spread_points=spread)
    for bar in bars[:n_warm]:
        row = engine.update(bar)
        if row is not None:
            for p in predictors.values():
                p.observe(row)
    clock = time.perf_counter_ns
    times = []
    answered = []
    for bar in bars[n_warm:]:
        t0 = clock()
        row = engine.update(bar)
        result = predict_all(predictors, row, {}, clock, spec.hash)
        times.append((clock() - t0) / 1000.0)
        if not answered:
            answered = sorted(o.kind for o in result.outputs)
            answered += [f"FAILED {k}" for k, _ in result.failures]
            first_models = {o.kind: o.latency_us for o in result.outputs}
    out.update(times_us=times, answered=answered, first_models=first_models)
print(json.dumps(out))
""".replace("{heavy!r}", repr(HEAVY))


def _child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SCALPER__")}
    env.update(extra or {})
    return env


def _run_serving_child(
    models_dir: Path, kinds: Sequence[str], point: float, spread: int, extra: Sequence[str] = ()
) -> tuple[float, dict[str, Any]]:
    args = [sys.executable, "-c", _SERVING_CHILD, str(models_dir), SYMBOL, ",".join(kinds)]
    args += [repr(point), str(spread), *extra]
    t_spawn = time.time()
    proc = subprocess.run(
        args, cwd=ROOT, env=_child_env(), capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench: serving child failed ({proc.returncode}):\n{proc.stderr}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    return t_spawn, data


def _cold_serving(
    models_dir: Path,
    kinds: Sequence[str],
    point: float,
    spread: int,
    runs: int,
    bars_path: Path,
    n_warm: int,
) -> tuple[ColdRuns, list[str], list[FirstCall]]:
    """Fresh serving processes: time to ready, then (after it) first vs steady decisions."""
    seconds, imports, loads, heavy = [], [], [], []
    firsts: list[FirstCall] = []
    for _ in range(runs):
        t_spawn, d = _run_serving_child(
            models_dir, kinds, point, spread, [str(bars_path), str(n_warm)]
        )
        if d.get("answered") != sorted(kinds):
            raise RuntimeError(f"bench: fresh serving process answered with {d.get('answered')}")
        seconds.append(d["t_ready"] - t_spawn)
        imports.append(d["t_imported"] - t_spawn)
        loads.append(d["t_ready"] - d["t_imported"])
        heavy = d["heavy"]
        times = d["times_us"]
        firsts.append(
            FirstCall(
                float(times[0]),
                _pct(times[1:], 50),
                _pct(times[1:], 99),
                len(times) - 1,
                d["first_models"],
            )
        )
    return (
        ColdRuns(
            "serving path",
            "fresh `python -c`: imports (numpy, onnxruntime, store, features, ensemble), "
            "then per kind `store.resolve` (re-hash) + `OnnxPredictor.load` + `warmup`",
            seconds,
            {"spawn + imports": imports, "resolve + load + warm-up (4 kinds)": loads},
        ),
        heavy,
        firsts,
    )


def _cold_floor(runs: int) -> ColdRuns:
    seconds = []
    for _ in range(runs):
        t0 = time.time()
        subprocess.run([sys.executable, "-c", "pass"], cwd=ROOT, env=_child_env(), check=True)
        seconds.append(time.time() - t0)
    return ColdRuns("interpreter floor", "`python -c pass`, spawn to exit", seconds)


def _cold_daemon(tmp: Path, models_dir: Path, kinds: Sequence[str], runs: int) -> ColdRuns:
    """``python main.py --max-bars 1``: spawn to the daemon's own ``daemon_ready`` log line."""
    seconds, total, first_served, after_served = [], [], [], []
    notes: list[str] = []
    for i in range(runs):
        run_dir = tmp / f"daemon-{i}"
        run_dir.mkdir()
        env = _child_env(
            {
                "SCALPER__STORAGE__MODELS_DIR": str(models_dir),
                "SCALPER__STORAGE__JOURNAL_PATH": str(run_dir / "journal.sqlite3"),
                "SCALPER__RISK__KILL_SWITCH_PATH": str(run_dir / "KILL"),
                "SCALPER__PAPER__REPLAY_BARS_PER_S": "0",
                "SCALPER__LOGGING__FORMAT": "json",
                "SCALPER__LOGGING__LEVEL": "INFO",
                # The quick models are trained on 3k bars, older than the daemon's 20k-bar
                # history: without this they would be stale and queued for retraining.
                "SCALPER__MODELS__MAX_MODEL_AGE_S": str(10**9),
            }
        )
        t_spawn = time.time()
        proc = subprocess.run(
            [sys.executable, "main.py", "--max-bars", "1"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        t_exit = time.time()
        records: list[dict[str, Any]] = []
        for line in proc.stderr.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "event" in record and "timestamp" in record:
                records.append(record)
        events: dict[str, dict[str, Any]] = {}
        for record in records:
            events.setdefault(str(record["event"]), record)
        ready = events.get("daemon_ready")
        if proc.returncode != 0 or ready is None:
            raise RuntimeError(
                f"bench: daemon run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
            )
        serving = sorted(ready.get("predictors", {}).get(SYMBOL, {}))
        if serving != sorted(kinds):
            raise RuntimeError(f"bench: daemon ready with {serving}, expected {sorted(kinds)}")
        if "training_started" in events:
            notes.append(f"run {i + 1}: the daemon started a training run (stale model?)")
        served = [_stamp(r) for r in records if r.get("event") == "model_serving"]
        t_ready = _stamp(ready)
        seconds.append(t_ready - t_spawn)
        if served:
            first_served.append(min(served) - t_spawn)
            after_served.append(t_ready - max(served))
        total.append(t_exit - t_spawn)
    detail = {"spawn to first model served": first_served}
    detail["last model served to ready (history, feature warm-up)"] = after_served
    detail["spawn to exit after 1 bar"] = total
    return ColdRuns(
        "daemon",
        "`python main.py --max-bars 1` (paper, replay 0, store with the 4 models): spawn to "
        "its own `daemon_ready` log timestamp: imports, settings, journal, store clean-up, "
        "model resolve + load + warm-up, synthetic history and feature warm-up",
        seconds,
        detail,
        notes,
    )


def _stamp(record: Mapping[str, Any]) -> float:
    """A structlog ISO timestamp as epoch seconds."""
    return datetime.fromisoformat(str(record["timestamp"]).replace("Z", "+00:00")).timestamp()


def _daemon_imports(runs: int) -> tuple[ColdRuns, list[str]]:
    """``import main`` in a fresh process: the daemon's import floor, and what it pulls in."""
    code = (
        "import sys, time, json, main; print(json.dumps([time.time(), sorted(m for m in "
        f"{HEAVY!r} if m in sys.modules)]))"
    )
    seconds: list[float] = []
    heavy: list[str] = []
    for _ in range(runs):
        t_spawn = time.time()
        proc = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            env=_child_env(),
            capture_output=True,
            text=True,
            check=True,
        )
        t_done, heavy = json.loads(proc.stdout.strip().splitlines()[-1])
        seconds.append(t_done - t_spawn)
    return ColdRuns("daemon imports", "`import main` in a fresh process", seconds), heavy


# ----------------------------------------------------------------------------- run


async def run(tmp: Path, *, quick: bool) -> Results:
    os.makedirs(tmp, exist_ok=True)
    load_start = _load1()
    settings = _settings(quick)
    kinds = tuple(k for k in KINDS if k in settings.models.enabled_kinds)
    sizes = Sizes.pick(quick=quick, train_bars=settings.models.train_bars)
    spec = FeatureSpec()
    sym = settings.symbols[SYMBOL]
    models_dir = tmp / "models"
    store = ModelStore(models_dir, clock=SystemClock(), retention=settings.models.retention)

    # Bars: training history first, then the bars the decisions are measured on.
    seq = max(int(settings.models.lstm.seq_len), 1)
    n_warm = spec.window + seq + 10
    # One feature engine walks forward: tight bars, then cadence bars, then swap bars.
    n_eval = max(
        sizes.tight_bars + sizes.cadence_bars + sizes.swap_rounds,
        sizes.naive_bars,
        sizes.child_steady_bars + 1,
    )
    frame = _market(settings).generate(sizes.train_bars + n_warm + n_eval)
    train_cols = BarColumns.from_frame(frame.iloc[: sizes.train_bars])
    bars = list(iter_bars(frame.iloc[sizes.train_bars :], SYMBOL))
    warm_bars, eval_bars = bars[:n_warm], bars[n_warm:]

    # 1. Training (spawned worker) and 5. store operations.
    training, committed, training_wall, calibration = await _train_all(
        settings, store, train_cols, tmp / "cache", spec
    )
    heavy_after_training: list[str] = [
        m for m in ("sklearn", "torch", "xgboost") if m in sys.modules
    ]
    store_times = _store_times(store, committed, sizes.store_reps)

    # 3. Cold start (fresh processes; nothing heavy runs here meanwhile).
    # 4a. Each fresh serving process then decides warm-up + steady bars after "ready".
    floor = _cold_floor(sizes.cold_runs)
    child_bars = tmp / "child_bars.npz"
    save_bar_cache(child_bars, BarColumns.from_bars(bars[: n_warm + sizes.child_steady_bars + 1]))
    serving, heavy_serving, fresh_first = _cold_serving(
        models_dir,
        kinds,
        sym.point,
        sym.default_spread_points,
        sizes.serving_runs,
        child_bars,
        n_warm,
    )
    daemon_imports, heavy_daemon = _daemon_imports(sizes.cold_runs)
    daemon = _cold_daemon(tmp, models_dir, kinds, sizes.cold_runs)

    # 2. Decision latency in this process: tight loop, then at bar cadence.
    load = {"before the training": load_start, "before the latency runs": _load1()}
    predictors, _ = _load_onnx(store, spec, kinds)
    decider = _Decider(spec, settings, predictors)
    decider.warm(warm_bars)
    tight = _tight(decider, eval_bars[: sizes.tight_bars], kinds)
    cadence_bars = eval_bars[sizes.tight_bars : sizes.tight_bars + sizes.cadence_bars]
    cadence = await _at_cadence(decider, cadence_bars, kinds)
    load["after the latency runs"] = _load1()

    # 4b. First decision after a model swap: reload from the store, prime, decide.
    swap_first: list[float] = []
    reload_ms: dict[str, list[float]] = {k: [] for k in kinds}
    extra = eval_bars[sizes.tight_bars + sizes.cadence_bars :]
    for r in range(sizes.swap_rounds):
        fresh, ms = _load_onnx(store, spec, kinds)
        for kind, value in ms.items():
            reload_ms[kind].append(value)
        for predictor in fresh.values():
            for row in decider.rows:
                predictor.observe(row)
        for kind, predictor in fresh.items():
            decider.map.swap(SYMBOL, kind, predictor)
        first, _, result = decider.decide(extra[r])
        _check_result(result, kinds, "after swap")
        swap_first.append(first)

    # 2c. Naive variant last: it imports scikit-learn, xgboost and torch into this process.
    naive: dict[str, np.ndarray] = {}
    naive_error = None
    try:
        naive = _naive(store, spec, settings, kinds, warm_bars, eval_bars[: sizes.naive_bars])
    except Exception as exc:  # noqa: BLE001 - the comparison is optional; say why it is missing
        naive_error = f"{type(exc).__name__}: {exc}"

    return Results(
        quick=quick,
        train_bars=sizes.train_bars,
        sizes=sizes,
        training=training,
        training_wall_s=training_wall,
        lstm_calibration=calibration,
        store=store_times,
        tight=tight,
        cadence=cadence,
        naive=naive,
        naive_error=naive_error,
        swap_first_us=swap_first,
        fresh_first=fresh_first,
        load=load,
        n_warm=n_warm,
        cold=[floor, serving, daemon_imports, daemon],
        reload_ms=reload_ms,
        heavy_in_daemon=heavy_daemon,
        heavy_in_serving=heavy_serving,
        heavy_after_training=heavy_after_training,
    )


# ----------------------------------------------------------------------------- report


def _training_total(r: Results) -> float:
    return sum(t.worker_s for t in r.training)


def _fresh_first(r: Results) -> tuple[float, float, float, float]:
    """Medians over fresh processes: (first µs, steady p99 µs, ratio), and the worst ratio."""
    f = r.fresh_first
    if not f:
        return (float("nan"),) * 4
    return (
        _median([x.first_us for x in f]),
        _median([x.steady_p99_us for x in f]),
        _median([x.ratio for x in f]),
        max(x.ratio for x in f),
    )


def _cold(r: Results, name: str) -> ColdRuns:
    return next(c for c in r.cold if c.name == name)


def _lstm(r: Results) -> KindTraining | None:
    return next((t for t in r.training if t.kind == "lstm"), None)


@dataclass(frozen=True)
class LstmBudget:
    per_step_s: float
    fixed_s: float  # dataset, holdout prediction, artifacts: what does not scale with steps
    fit_steps: float  # steps that fit the retrain budget next to the other three kinds
    calibrated: bool  # False: fixed costs unknown, per-step figure is an upper bound


def _lstm_budget(r: Results) -> LstmBudget | None:
    lstm = _lstm(r)
    if lstm is None:
        return None
    steps = int(lstm.training.get("max_steps") or lstm.hyperparams.get("max_steps") or 0)
    if steps <= 0:
        return None
    others = _training_total(r) - lstm.worker_s
    cal = r.lstm_calibration
    if cal is not None and cal.steps < steps:
        per_step = (lstm.worker_s - cal.worker_s) / (steps - cal.steps)
        if per_step > 0:
            fixed = max(0.0, lstm.worker_s - per_step * steps)
            fit = max(0.0, (TARGET_TRAIN_S - others - fixed) / per_step)
            return LstmBudget(per_step, fixed, fit, True)
    per_step = lstm.worker_s / steps
    return LstmBudget(per_step, 0.0, max(0.0, (TARGET_TRAIN_S - others) / per_step), False)


def _fmt_loss(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "n/a"


def _budget_text(
    r: Results,
    budget: LstmBudget,
    steps: int,
    batch: int,
    n_samples: int,
    val_loss: Any,
    tr: Mapping[str, Any],
) -> str:
    lstm = _lstm(r)
    others = _training_total(r) - (lstm.worker_s if lstm is not None else 0.0)
    fit = budget.fit_steps
    epochs = fit * batch / n_samples if n_samples else float("nan")
    cal = r.lstm_calibration
    if not budget.calibrated or cal is None:
        return (
            f"At {budget.per_step_s:.3f} s per step (the LSTM job's time over its steps, fixed "
            f"costs included: an upper bound), the {TARGET_TRAIN_S:.0f} s budget minus the other "
            f"three kinds ({others:.1f} s) leaves room for at least **{fit:,.0f} steps** "
            f"({epochs:.2f} epochs), measured alone."
        )
    best = tr.get("best_step")
    text = (
        f"Step budget that fits: a second LSTM run of {cal.steps} steps (same seed, so the first "
        f"steps of the same trajectory) took {cal.worker_s:.1f} s, so one step costs "
        f"{budget.per_step_s:.3f} s and the job's fixed costs (dataset, holdout prediction, ONNX "
        f"export) {budget.fixed_s:.1f} s. The {TARGET_TRAIN_S:.0f} s budget minus the other three "
        f"kinds ({others:.1f} s) and those fixed costs leaves **{fit:,.0f} steps** "
        f"({epochs:.2f} epochs at batch {batch}), measured alone; beside the live loop a "
        "one-thread LSTM runs slower (PERF_NOTES.md), so keep a margin. "
    )
    if isinstance(best, int) and fit >= best:
        text += (
            f"That budget passes the best checkpoint (step {best}), so on the same trajectory it "
            f"reaches a validation loss of at most **{_fmt_loss(val_loss)}** (the "
            f"{cal.steps}-step run: {_fmt_loss(cal.val_loss)})."
        )
    else:
        text += (
            f"That budget stops before the best checkpoint (step {best}); its validation loss is "
            f"not measured here (the {cal.steps}-step run reached {_fmt_loss(cal.val_loss)}, the "
            f"{steps}-step budget {_fmt_loss(val_loss)})."
        )
    return text


def _targets(r: Results) -> list[tuple[str, str, str]]:
    tight_p99 = _pct(r.tight["decision"], 99)
    cad_p99 = _pct(r.cadence, 99)
    daemon_ready = _median(_cold(r, "daemon").seconds)
    serving_ready = _median(_cold(r, "serving path").seconds)
    first, steady, ratio, worst = _fresh_first(r)
    swap_med = _median(r.swap_first_us)
    swap_worst = _max(r.swap_first_us)
    total = _training_total(r)
    rows = [
        (
            f"decision p99, tight loop ≤ {TARGET_TIGHT_P99_US:,.0f} µs",
            f"{tight_p99:,.0f} µs",
            _verdict(tight_p99 <= TARGET_TIGHT_P99_US),
        ),
        (
            f"decision p99, once per bar in the event loop ≤ {TARGET_CADENCE_P99_US:,.0f} µs",
            f"{cad_p99:,.0f} µs",
            _verdict(cad_p99 <= TARGET_CADENCE_P99_US),
        ),
        (
            f"process start to ready with models on disk ≤ {TARGET_READY_S} s (daemon, median)",
            f"{daemon_ready:.2f} s",
            _verdict(daemon_ready <= TARGET_READY_S),
        ),
        (
            f"… serving path alone (imports + load + warm-up), median ≤ {TARGET_READY_S} s",
            f"{serving_ready:.2f} s",
            _verdict(serving_ready <= TARGET_READY_S),
        ),
        (
            f"first decision of a fresh process ≤ {TARGET_FIRST_VS_P99:g}x its steady p99 "
            f"(median of {len(r.fresh_first)} processes)",
            f"{first:,.0f} µs vs p99 {steady:,.0f} µs ({ratio:.2f}x; worst process {worst:.2f}x)",
            _verdict(ratio <= TARGET_FIRST_VS_P99),
        ),
        (
            f"first decision after a model swap ≤ {TARGET_FIRST_VS_P99:g}x tight p99 "
            f"(median of {len(r.swap_first_us)} swaps)",
            f"{swap_med:,.0f} µs vs p99 {tight_p99:,.0f} µs ({swap_med / tight_p99:.2f}x; "
            f"worst {swap_worst / tight_p99:.2f}x)",
            _verdict(swap_med <= TARGET_FIRST_VS_P99 * tight_p99),
        ),
    ]
    if r.quick or r.train_bars < TARGET_TRAIN_BARS:
        rows.append(
            (
                f"RF+XGB+LSTM+MLP on {TARGET_TRAIN_BARS:,} bars ≤ {TARGET_TRAIN_S:.0f} s",
                f"{total:.1f} s on {r.train_bars:,} bars at quick sizes",
                "not checked (quick sizes)",
            )
        )
    else:
        rows.append(
            (
                f"RF+XGB+LSTM+MLP on {TARGET_TRAIN_BARS:,} bars ≤ {TARGET_TRAIN_S:.0f} s "
                "(measured alone here, not beside the live loop)",
                f"{total:.1f} s",
                _verdict(total <= TARGET_TRAIN_S),
            )
        )
    return rows


def _short_params(kind: str, p: Mapping[str, Any]) -> str:
    keys = {
        "rf": ("n_estimators", "max_depth", "min_samples_leaf"),
        "xgb": ("n_estimators", "max_depth", "learning_rate"),
        "lstm": ("architecture", "seq_len", "hidden_size_1", "hidden_size_2", "batch_size"),
        "mlp": ("hidden_1", "hidden_2", "hidden_3", "max_steps", "batch_size"),
    }.get(kind, ())
    return ", ".join(f"{k}={p[k]}" for k in keys if k in p)


def summary_lines(r: Results) -> list[str]:
    lines = [
        f"models: training {_training_total(r):6.1f} s on {r.train_bars:,} bars ("
        + ", ".join(f"{t.kind} {t.worker_s:.1f} s" for t in r.training)
        + ")",
        f"models: decision tight    p50 {_pct(r.tight['decision'], 50):8.1f} us  "
        f"p99 {_pct(r.tight['decision'], 99):8.1f} us  max {_max(r.tight['decision']):8.1f} us",
        f"models: decision cadence  p50 {_pct(r.cadence, 50):8.1f} us  "
        f"p99 {_pct(r.cadence, 99):8.1f} us  max {_max(r.cadence):8.1f} us",
    ]
    if r.naive:
        lines.append(
            f"models: decision naive    p50 {_pct(r.naive['decision'], 50):8.1f} us  "
            f"p99 {_pct(r.naive['decision'], 99):8.1f} us  max {_max(r.naive['decision']):8.1f} us"
        )
    budget = _lstm_budget(r)
    if budget is not None:
        lines.append(
            f"models: lstm {budget.per_step_s:.3f} s/step, fixed {budget.fixed_s:.1f} s: "
            f"{budget.fit_steps:,.0f} steps fit the {TARGET_TRAIN_S:.0f} s retrain budget"
            + ("" if budget.calibrated else " (upper-bound per-step cost)")
        )
    for c in r.cold:
        lines.append(
            f"models: cold start {c.name:<18} median {_median(c.seconds):6.2f} s "
            f"(runs: {', '.join(f'{s:.2f}' for s in c.seconds)})"
        )
    first, steady, ratio, _ = _fresh_first(r)
    lines.append(
        f"models: first decision {first:,.0f} us vs steady p99 {steady:,.0f} us ({ratio:.2f}x, "
        f"fresh process, median); after swap median {_median(r.swap_first_us):,.0f} us"
    )
    for s in r.store:
        lines.append(
            f"models: store {s.kind:<4} commit {_median(s.commit_ms):7.1f} ms  verify "
            f"{_median(s.verify_ms):6.1f} ms  diff {_median(s.diff_ms):5.2f} ms  resolve "
            f"{_median(s.resolve_ms):6.1f} ms"
        )
    for name, _measured, verdict in _targets(r):
        lines.append(f"models: target {name}: {verdict.replace('**', '')}")
    return lines


def render(r: Results) -> str:
    s = r.sizes
    lines = [
        "## Models: training, decision latency, cold start and store (`bench/models.py`)",
        "",
        f"The daemon's synthetic EURUSD market: {r.train_bars:,} bars to train on, then the "
        "next bars (out of sample) for the decisions. "
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

    # -- training
    lines += [
        "",
        "### Training (once, alone: nothing else running)",
        "",
        "One spawned worker (`LocalProcessBackend`, one thread per library), kinds in the "
        "daemon's order; *worker s* is `run_training` (features, labels, embargoed split, fit, "
        "holdout, artifacts incl. ONNX conversion), *wall s* adds the spawn and, for the first "
        "job, the worker's imports. Holdout = the time-ordered test part after the embargo.",
        "",
        "| kind | hyperparameters | train / val / test rows | worker s | wall s | "
        "holdout acc. | majority rate | holdout log-loss | artifacts MB |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for t in r.training:
        sm = t.samples
        lines.append(
            f"| {t.kind} | {_short_params(t.kind, t.hyperparams)} | "
            f"{sm.get('train', 0):,} / {sm.get('val', 0):,} / {sm.get('test', 0):,} | "
            f"{t.worker_s:.1f} | {t.wall_s:.1f} | {t.metrics.get('accuracy', float('nan')):.3f} | "
            f"{t.metrics.get('majority_rate', float('nan')):.3f} | "
            f"{t.metrics.get('log_loss', float('nan')):.3f} | {t.artifact_bytes / 1e6:.2f} |"
        )
    lines.append(
        f"| **total** | | | **{_training_total(r):.1f}** | **{r.training_wall_s:.1f}** | | | | |"
    )
    lstm = _lstm(r)
    budget = _lstm_budget(r)
    if lstm is not None:
        tr = lstm.training
        steps = int(tr.get("max_steps") or lstm.hyperparams.get("max_steps") or 0)
        batch = int(tr.get("batch_size") or lstm.hyperparams.get("batch_size") or 0)
        n_samples = tr.get("n_samples") or lstm.samples.get("train") or 0
        epochs = (steps * batch / n_samples) if n_samples else float("nan")
        val_loss = tr.get("val_loss")
        lines += [
            "",
            f"LSTM budget: **{steps} optimiser steps x batch {batch}** = {epochs:.2f} epochs over "
            f"{n_samples:,} training windows; best validation loss **"
            + (f"{val_loss:.4f}" if isinstance(val_loss, int | float) else "n/a")
            + f"** at step {tr.get('best_step')} (final training loss "
            + (
                f"{tr['final_train_loss']:.4f}"
                if isinstance(tr.get("final_train_loss"), int | float)
                else "n/a"
            )
            + "; a uniform guess is ln 3 = 1.0986).",
        ]
        if budget is not None:
            lines.append("")
            lines.append(_budget_text(r, budget, steps, batch, n_samples, val_loss, tr))

    heavy = ", ".join(r.heavy_after_training) or "none"
    gaps = ", ".join(f"{t.kind} {t.wall_s - t.worker_s:.1f} s" for t in r.training)
    lines += [
        "",
        f"Wall minus worker time per job: {gaps}. Heavy libraries this parent process had "
        f"imported after receiving the results (it imports none of them itself): **{heavy}**"
        + (
            " — unpickling a result imported it, on the thread that waits for the job "
            "(the 1.2 s event-loop stall of PERF_NOTES.md)."
            if r.heavy_after_training
            else "."
        ),
    ]

    # -- latency
    def row(name: str, values: np.ndarray | Sequence[float], bars: str) -> str:
        return (
            f"| {name} | {bars} | {_pct(values, 50):,.1f} | {_pct(values, 99):,.1f} | "
            f"{_max(values):,.1f} |"
        )

    lines += [
        "",
        "### Decision latency for one bar",
        "",
        "Features (`FeatureEngine.update`) + every enabled model + `predict_all`, through a "
        "`PredictorMap` snapshot, timed like `ScalpingStrategy.on_bar` times it. ONNX Runtime "
        "predictors are loaded and warmed as the daemon does (`OnnxPredictor.load` + "
        "`warmup`), windows primed on the preceding bars. *At cadence*: one decision per bar "
        f"from a running asyncio loop that awaits `asyncio.sleep({CADENCE_S})` between bars. "
        "*Naive*: the same features and ensemble with each kind's native `predict_proba` "
        "(scikit-learn, XGBoost Booster, torch eager) on one row / the last window.",
        "",
        "| variant | bars | p50 µs | p99 µs | max µs |",
        "| --- | ---: | ---: | ---: | ---: |",
        row("ONNX Runtime, tight loop", r.tight["decision"], f"{s.tight_bars:,}"),
        row(
            f"ONNX Runtime, once per bar at {CADENCE_S * 1000:g} ms cadence",
            r.cadence,
            f"{s.cadence_bars:,}",
        ),
    ]
    if r.naive:
        lines.append(
            row("naive native models, tight loop", r.naive["decision"], f"{s.naive_bars:,}")
        )
    lines.append(row("… of which features (tight)", r.tight["features"], f"{s.tight_bars:,}"))
    for kind in KINDS:
        key = f"model:{kind}"
        if key in r.tight:
            lines.append(row(f"… of which {kind}, ONNX (tight)", r.tight[key], f"{s.tight_bars:,}"))
    if r.naive:
        for kind in KINDS:
            key = f"model:{kind}"
            if key in r.naive:
                lines.append(row(f"… {kind}, native (naive)", r.naive[key], f"{s.naive_bars:,}"))
    lines += [
        "",
        f"1-minute load average of the {os.cpu_count()}-CPU machine (this run included): "
        + ", ".join(f"{v:.2f} {k}" for k, v in r.load.items())
        + ". Other tenants' work shows up in the p99 and max columns.",
    ]
    if r.naive_error:
        lines += ["", f"Naive variant not measured: {r.naive_error}"]
    elif r.naive:
        ratio = _pct(r.naive["decision"], 50) / _pct(r.tight["decision"], 50)
        lines += [
            "",
            f"ONNX Runtime is **{ratio:,.0f}x** faster than the naive path at the median.",
        ]

    # -- cold start and first call
    lines += [
        "",
        "### Cold start to ready, and the first decision",
        "",
        "Each run is a new process; time from just before the parent spawns it (wall clock) "
        "to its ready timestamp. The page cache is warm after the first run.",
        "",
        "| what | measures | runs s | median s |",
        "| --- | --- | --- | ---: |",
    ]
    for c in r.cold:
        lines.append(
            f"| {c.name} | {c.what} | {', '.join(f'{x:.2f}' for x in c.seconds)} | "
            f"{_median(c.seconds):.2f} |"
        )
        for part, values in c.detail.items():
            lines.append(
                f"| … {part} | | {', '.join(f'{x:.2f}' for x in values)} | {_median(values):.2f} |"
            )
    for c in r.cold:
        lines += [f"- {n}" for n in c.notes]
    heavy_d = ", ".join(r.heavy_in_daemon) or "none"
    heavy_s = ", ".join(r.heavy_in_serving) or "none"
    lines += [
        "",
        f"Heavy libraries imported at start: daemon (`import main`): {heavy_d}; serving path: "
        f"{heavy_s} (torch, scikit-learn and xgboost must never be among them).",
    ]
    tight_p99 = _pct(r.tight["decision"], 99)
    tight_p50 = _pct(r.tight["decision"], 50)
    lines += [
        "",
        f"First decision: each fresh serving process above, once ready, feeds {r.n_warm} "
        "warm-up bars (features + window priming, no prediction) and then decides "
        f"{s.child_steady_bars + 1:,} bars; its first decision is compared with the p99 of the "
        "rest. A swap reloads all four models in this process (resolve + load + warm-up), "
        "primes them with the recent rows and decides the next bar.",
        "",
        "| first decision | first µs | per model µs | steady p50 µs | steady p99 µs | "
        "first / p99 |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for i, f in enumerate(r.fresh_first):
        per = ", ".join(f"{k} {v:,.0f}" for k, v in f.per_model_us.items())
        lines.append(
            f"| fresh process {i + 1} | {f.first_us:,.1f} | {per} | {f.steady_p50_us:,.1f} | "
            f"{f.steady_p99_us:,.1f} | {f.ratio:.2f}x |"
        )
    for i, value in enumerate(r.swap_first_us):
        lines.append(
            f"| swap {i + 1} (vs the tight loop) | {value:,.1f} | | {tight_p50:,.1f} | "
            f"{tight_p99:,.1f} | {value / tight_p99:.2f}x |"
        )
    lines += [
        "",
        "Resolve + load + warm-up per kind in a warm process (ms, median): "
        + ", ".join(f"{k} {_median(v):.1f}" for k, v in r.reload_ms.items())
        + ".",
    ]

    # -- store
    lines += [
        "",
        "### Model store",
        "",
        f"Per kind: the trained version plus {s.store_reps} copies registered as PATCH "
        "versions (same artifact files). `commit_draft` hashes and fsyncs every file, writes "
        "the manifest and renames the draft; `verify` re-hashes one version; `diff` compares "
        "two manifests; `resolve` is what a load does (aliases + re-hash of production).",
        "",
        "| kind | artifacts MB (ONNX MB) | commit_draft ms (median / max) | promote ms | "
        "verify ms | diff ms (fields changed) | resolve ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    sizes_by_kind = {t.kind: t for t in r.training}
    for st in r.store:
        t = sizes_by_kind[st.kind]
        lines.append(
            f"| {st.kind} | {t.artifact_bytes / 1e6:.2f} ({t.onnx_bytes / 1e6:.2f}) | "
            f"{_median(st.commit_ms):.1f} / {_max(st.commit_ms):.1f} | {st.promote_ms:.1f} | "
            f"{_median(st.verify_ms):.1f} | {_median(st.diff_ms):.2f} ({st.diff_keys}) | "
            f"{_median(st.resolve_ms):.1f} |"
        )
    lines.append("")
    return "\n".join(lines)
