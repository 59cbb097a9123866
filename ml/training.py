"""Training jobs: one model kind for one symbol, run in a spawned worker process.

The parent writes the bars to an on-disk cache and creates the store's draft
directory; the worker (``run_training``) reads the cache, builds features and
labels itself (``ml.dataset``, the same feature code the daemon serves with),
fits the kind on the training part of an embargoed time split, measures it on
the held-out test part, writes its artifacts into the draft and returns plain
data: paths and numbers, never model objects (unpickling torch in the parent
stalled its event loop for 1.2 s, PERF_NOTES.md).

``TrainingBackend`` is the seam for growing past one machine: submit a job, get
back a future of a ``TrainOutcome`` whose artifacts are on local disk. The
default ``LocalProcessBackend`` is a one-worker ``spawn`` process pool.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import multiprocessing
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ml.validation import holdout_metrics
from strategy.features import BarColumns, FeatureSpec

if TYPE_CHECKING:
    from ml.dataset import Dataset, Split

CACHE_KEYS = ("time_ns", "open", "high", "low", "close", "tick_volume", "spread")


def save_bar_cache(path: Path, cols: BarColumns) -> Path:
    """Write bars for a training worker (numpy ``.npz``: no pickle, no code on load)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **{k: getattr(cols, k) for k in CACHE_KEYS})
    os.replace(tmp, path)
    return path


def load_bar_cache(path: Path) -> BarColumns:
    with np.load(path, allow_pickle=False) as data:
        return BarColumns(**{k: data[k] for k in CACHE_KEYS})


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs; plain, picklable values only (spawn)."""

    symbol: str
    kind: str
    hyperparams: Mapping[str, Any]
    bars_path: str
    draft_dir: str
    point: float
    default_spread_points: int
    horizon: int
    threshold_atr: float
    feature_params: Mapping[str, Any] = field(default_factory=dict)
    max_rows: int | None = None
    train_frac: float = 0.7
    val_frac: float = 0.15
    # Validation gates (``ml.validation``), as plain values: None = no gates (CLI
    # runs without a daemon still measure, but nothing is decided by them).
    validation: Mapping[str, Any] | None = None
    # SimCosts fields for the cost-aware simulated run on the holdout.
    sim_costs: Mapping[str, Any] | None = None
    # The production version this candidate would replace: compared on the same holdout.
    production_dir: str | None = None
    production_version: str | None = None


@dataclass(frozen=True)
class TrainOutcome:
    symbol: str
    kind: str
    draft_dir: str
    manifest: dict[str, Any]  # fields for ModelStore.commit_draft
    metrics: dict[str, float]
    seconds: float
    # The gates' verdict (``ValidationReport.as_dict()``), None when not validated.
    validation: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        """True when validated and every gate passed (no gates: never auto-promoted)."""
        return bool(self.validation is not None and self.validation.get("passed"))


def run_training(job: TrainJob) -> TrainOutcome:
    """Worker entry point: dataset, split, fit, measure, save into the draft."""
    from ml.dataset import build_dataset, time_split
    from ml.drift import save_reference
    from ml.kinds import get_kind

    started = time.monotonic()
    cols = load_bar_cache(Path(job.bars_path))
    if job.max_rows is not None and len(cols.time_ns) > job.max_rows:
        cols = BarColumns(**{k: getattr(cols, k)[-job.max_rows :] for k in CACHE_KEYS})
    spec = FeatureSpec(params=dict(job.feature_params))
    ds = build_dataset(
        cols,
        spec,
        point=job.point,
        default_spread_points=job.default_spread_points,
        horizon=job.horizon,
        threshold_atr=job.threshold_atr,
    )
    split = time_split(ds, train_frac=job.train_frac, val_frac=job.val_frac)
    model = get_kind(job.kind)(**dict(job.hyperparams))
    model.fit(
        ds.X[split.train],
        ds.y[split.train],
        feature_hash=spec.hash,
        feature_names=spec.names,
        X_val=ds.X[split.val],
        y_val=ds.y[split.val],
    )
    # Sequence kinds need the rows before the test part to fill their window.
    seq = model.sequence_length
    test_start = split.test.start or 0
    context = max(0, test_start - seq)
    proba = model.predict_proba(ds.X[context : split.test.stop])[test_start - context :]
    metrics = holdout_metrics(proba, ds.y[split.test])
    draft = Path(job.draft_dir)
    files = list(model.save(draft))
    # The drift checks compare live features with a sample of what the model learnt on.
    files.append(save_reference(draft, ds.X[split.train], spec.names, seed=0))
    validation = None
    if job.validation is not None and job.sim_costs is not None:
        validation = _validate(job, spec, cols, ds, split, draft)

    def iso(ns: int) -> str:
        return datetime.fromtimestamp(ns / 1e9, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    params = model.get_params()
    manifest: dict[str, Any] = {
        "feature_hash": spec.hash,
        "feature_names": list(spec.names),
        "feature_params": dict(spec.params),
        "architecture": str(params.get("architecture", job.kind)),
        "hyperparams": params,
        "seed": params.get("seed", params.get("random_state")),
        "trained": iso(int(cols.time_ns[-1])),
        "training_window": {"first": iso(int(ds.time_ns[0])), "last": iso(int(ds.time_ns[-1]))},
        "samples": {
            "train": int(split.train.stop - split.train.start),
            "val": int(split.val.stop - split.val.start),
            "test": int(split.test.stop - split.test.start),
            "embargo": int(split.embargo),
        },
        "labels": {"horizon": job.horizon, "threshold_atr": job.threshold_atr},
        "dataset_hash": ds.dataset_hash,
        "library_versions": model.library_versions(),
        "metrics": {"holdout": metrics, **({"validation": validation} if validation else {})},
        "artifact_files": files,
    }
    # Plain JSON values only: unpickling a library's own types (torch's TorchVersion)
    # in the parent would import that library into the serving process.
    plain = json.loads(json.dumps(manifest, default=str))
    return TrainOutcome(
        job.symbol,
        job.kind,
        job.draft_dir,
        plain,
        metrics,
        time.monotonic() - started,
        plain["metrics"].get("validation"),
    )


def _validate(
    job: TrainJob, spec: FeatureSpec, cols: BarColumns, ds: Dataset, split: Split, draft: Path
) -> dict[str, Any]:
    """The gates, on the served graph (``model.onnx`` in the draft), in the worker.

    The candidate, the production model it would replace and the baseline answer
    the same holdout rows; the candidate's single-row latency is measured here too.
    """
    from config.settings import ValidationSettings
    from ml.serving import OnnxPredictor
    from ml.validation import SimCosts, evaluate, latency_p99_ms
    from strategy.baseline import MomentumBaseline

    assert job.validation is not None and job.sim_costs is not None
    test_start = split.test.start or 0
    test_stop = split.test.stop
    X_test = ds.X[test_start:test_stop]
    y_test = ds.y[test_start:test_stop]

    def holdout_proba(predictor: OnnxPredictor) -> np.ndarray:
        context = max(0, test_start - predictor.sequence_length)
        out = predictor.predict_proba_batch(ds.X[context:test_stop])
        return np.asarray(out[test_start - context :], dtype=np.float64)

    candidate = OnnxPredictor.load(draft, feature_hash=spec.hash, kind=job.kind, version="draft")
    cand_proba = holdout_proba(candidate)
    production = None
    note = ""
    if job.production_dir is not None:
        try:
            prod = OnnxPredictor.load(
                Path(job.production_dir),
                feature_hash=spec.hash,
                kind=job.kind,
                version=job.production_version or "production",
            )
            production = holdout_proba(prod)
        except Exception as exc:  # noqa: BLE001 - another spec or a broken artifact
            note = f"production not compared: {exc}"
    baseline = MomentumBaseline(spec)
    base_proba = np.full((len(X_test), 3), np.nan)
    for i, row in enumerate(X_test):
        if np.isfinite(row).all():
            base_proba[i] = baseline.predict_proba(row)
    # Sequence models must see a full window before each timed call, as live.
    rows = ds.X[max(0, test_start - candidate.sequence_length) : test_stop]
    for row in rows[: candidate.sequence_length]:
        candidate.observe(row)
    latency = latency_p99_ms(candidate.predict_proba, rows[candidate.sequence_length :])
    bar_index = np.searchsorted(cols.time_ns, ds.time_ns[test_start:test_stop])
    report = evaluate(
        candidate=cand_proba,
        y=y_test,
        close=cols.close[bar_index].astype(np.float64),
        spread_points=cols.spread[bar_index].astype(np.float64),
        costs=SimCosts(**dict(job.sim_costs)),
        settings=ValidationSettings(**dict(job.validation)),
        production=production,
        baseline=base_proba,
        latency_ms=latency,
    )
    result = report.as_dict()
    result["passed"] = report.passed
    result["reasons"] = report.reasons()
    if note:
        result["note"] = note
    return result


class TrainingBackend(Protocol):
    """Where training runs: a local worker pool now, a Ray cluster later."""

    def submit(self, job: TrainJob) -> concurrent.futures.Future[TrainOutcome]: ...

    def reset(self) -> None:
        """Abandon the job in progress (it hung past its timeout); take new jobs after."""
        ...

    def shutdown(self) -> None: ...


def _worker_init(parent_pid: int) -> None:
    # One thread per library: two threads collapse training ~5x next to a live loop.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    _lower_priority()
    # A worker must not outlive a daemon that was killed: it would keep a core busy
    # and write into a draft the restarted daemon has already cleaned up.
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()


def _lower_priority() -> None:
    """Training yields the CPU to the trading loop when both want the same core."""
    if hasattr(os, "nice"):
        with contextlib.suppress(OSError):
            os.nice(10)
        return
    with contextlib.suppress(Exception):  # Windows: BELOW_NORMAL_PRIORITY_CLASS
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        kernel32.SetPriorityClass(kernel32.GetCurrentProcess(), 0x00004000)


def _exit_with_parent(parent_pid: int) -> None:
    # A watchdog in the worker, outside the daemon's clock: it only checks liveness.
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:  # re-parented: the daemon is gone (POSIX)
            os._exit(0)


class LocalProcessBackend:
    """One spawned worker process (the only start method on Windows, used everywhere).

    A worker that died (killed, out of memory) breaks the pool; the next job gets
    a fresh one instead of failing until the daemon restarts.
    """

    def __init__(self, max_workers: int = 1) -> None:
        self._max_workers = max_workers
        self._pool = self._new_pool()

    def _new_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(
            max_workers=self._max_workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
            initargs=(os.getpid(),),
        )

    def submit(self, job: TrainJob) -> concurrent.futures.Future[TrainOutcome]:
        try:
            return self._pool.submit(run_training, job)
        except concurrent.futures.process.BrokenProcessPool:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
            return self._pool.submit(run_training, job)

    def shutdown(self) -> None:
        """Stop now: a run in progress is abandoned (its draft is cleaned at next start)."""
        processes = list(getattr(self._pool, "_processes", {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=10)

    def reset(self) -> None:
        """Kill the worker (a hung job) and start a fresh pool for the next job."""
        self.shutdown()
        self._pool = self._new_pool()


class InlineBackend:
    """Runs the job in the calling thread (CLI without a daemon, tests)."""

    def submit(self, job: TrainJob) -> concurrent.futures.Future[TrainOutcome]:
        future: concurrent.futures.Future[TrainOutcome] = concurrent.futures.Future()
        try:
            future.set_result(run_training(job))
        except Exception as exc:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(exc)
        return future

    def reset(self) -> None:
        """Nothing runs in the background."""

    def shutdown(self) -> None:
        """Nothing to stop."""


def ensemble_weight(manifest: Mapping[str, Any]) -> float:
    """Validation weight: holdout accuracy above the majority-class rate (0 if none)."""
    holdout = manifest.get("metrics", {}).get("holdout", {})
    edge = float(holdout.get("accuracy", 0.0)) - float(holdout.get("majority_rate", 1.0))
    return max(0.0, edge) if math.isfinite(edge) else 0.0
