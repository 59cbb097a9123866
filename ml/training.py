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
from typing import Any, Protocol

import numpy as np

from strategy.features import BarColumns, FeatureSpec

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


@dataclass(frozen=True)
class TrainOutcome:
    symbol: str
    kind: str
    draft_dir: str
    manifest: dict[str, Any]  # fields for ModelStore.commit_draft
    metrics: dict[str, float]
    seconds: float


def _log_loss(proba: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(proba[np.arange(len(y)), y.astype(np.int64)], 1e-12, 1.0)
    return float(-np.mean(np.log(p)))


def holdout_metrics(proba: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy and log-loss on rows with a prediction, beside the majority-class rate."""
    ok = np.isfinite(proba).all(axis=1)
    proba, y = proba[ok], y[ok]
    if len(y) == 0:
        raise ValueError("no holdout row has a prediction (test part shorter than the window?)")
    counts = np.bincount(y.astype(np.int64), minlength=3)
    return {
        "accuracy": float(np.mean(proba.argmax(axis=1) == y)),
        "log_loss": _log_loss(proba, y),
        "majority_rate": float(counts.max() / counts.sum()),
        "holdout_rows": float(len(y)),
    }


def run_training(job: TrainJob) -> TrainOutcome:
    """Worker entry point: dataset, split, fit, measure, save into the draft."""
    from ml.dataset import build_dataset, time_split
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
    files = model.save(Path(job.draft_dir))

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
        "metrics": {"holdout": metrics},
        "artifact_files": files,
    }
    # Plain JSON values only: unpickling a library's own types (torch's TorchVersion)
    # in the parent would import that library into the serving process.
    plain = json.loads(json.dumps(manifest, default=str))
    return TrainOutcome(
        job.symbol, job.kind, job.draft_dir, plain, metrics, time.monotonic() - started
    )


class TrainingBackend(Protocol):
    """Where training runs: a local worker pool now, a Ray cluster later."""

    def submit(self, job: TrainJob) -> concurrent.futures.Future[TrainOutcome]: ...

    def shutdown(self) -> None: ...


def _worker_init(parent_pid: int) -> None:
    # One thread per library: two threads collapse training ~5x next to a live loop.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    # A worker must not outlive a daemon that was killed: it would keep a core busy
    # and write into a draft the restarted daemon has already cleaned up.
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()


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


class InlineBackend:
    """Runs the job in the calling thread (CLI without a daemon, tests)."""

    def submit(self, job: TrainJob) -> concurrent.futures.Future[TrainOutcome]:
        future: concurrent.futures.Future[TrainOutcome] = concurrent.futures.Future()
        try:
            future.set_result(run_training(job))
        except Exception as exc:  # noqa: BLE001 - handed to the caller through the future
            future.set_exception(exc)
        return future

    def shutdown(self) -> None:
        """Nothing to stop."""


def ensemble_weight(manifest: Mapping[str, Any]) -> float:
    """Validation weight: holdout accuracy above the majority-class rate (0 if none)."""
    holdout = manifest.get("metrics", {}).get("holdout", {})
    edge = float(holdout.get("accuracy", 0.0)) - float(holdout.get("majority_rate", 1.0))
    return max(0.0, edge) if math.isfinite(edge) else 0.0
