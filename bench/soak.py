"""Soak: a simulated trading week through the real daemon, watching for leaks and loop lag.

The paper daemon (``main.start_daemon`` + ``main.serve``, in this process, on the
system clock) replays 5 x 1440 M1 bars of the embedded synthetic market at high
speed with all four model kinds enabled but small, and scheduled retrains every
``RETRAIN_EVERY_S`` market seconds, so several retrains, shadow trials,
promotions and swaps happen while it trades. Beside it, on the same loop:

- a ticker sleeps 10 ms and records how late it wakes (event-loop lag);
- a sampler records, every half second, this process's RSS, open file
  descriptors (``psutil`` ``num_fds``; ``num_handles`` on Windows), OS threads,
  Python threads and asyncio tasks, the training worker's RSS, and the bars,
  trades and training runs so far.

"Start" is the first sample after warm-up (the first training round finished
and a fifth of the bars replayed) at which every module the run ever loads is
loaded (the first drift check imports ``scipy.stats`` once, about 10 MB: a cost,
not a leak; the section says how much that moved the start); "end" is the last
sample while trading. The
verdicts: RSS growth start -> end within 5 %, and no growth of file
descriptors, threads or tasks. ``python -m bench.soak [--quick]`` prints the
section; ``--quick`` (one market day, CI smoke) runs in well under a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import sys
import tempfile
import threading
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

BARS_PER_DAY = 1440
TARGET_RSS_GROWTH_PCT = 5.0
TICK_S = 0.010
SAMPLE_S = 0.5
STALL_MS = 50.0  # loop lags at least this long are listed with when they happened

# Small models, short schedules, easy gates: the week is about the process around them.
SOAK_ENV: Mapping[str, str] = {
    "SCALPER__LOGGING__LEVEL": "WARNING",
    "SCALPER__LOGGING__FORMAT": "json",
    "SCALPER__PAPER__HISTORY_BARS": "200",
    "SCALPER__MODELS__INITIAL_TRAIN_BARS": "3000",
    "SCALPER__MODELS__TRAIN_BARS": "3000",
    "SCALPER__MODELS__RF__N_ESTIMATORS": "10",
    "SCALPER__MODELS__RF__MAX_DEPTH": "4",
    "SCALPER__MODELS__XGB__N_ESTIMATORS": "20",
    "SCALPER__MODELS__XGB__MAX_DEPTH": "3",
    "SCALPER__MODELS__LSTM__SEQ_LEN": "10",
    "SCALPER__MODELS__LSTM__HIDDEN_SIZE_1": "8",
    "SCALPER__MODELS__LSTM__HIDDEN_SIZE_2": "4",
    "SCALPER__MODELS__LSTM__MAX_STEPS": "20",
    "SCALPER__MODELS__LSTM__BATCH_SIZE": "64",
    "SCALPER__MODELS__MLP__HIDDEN_1": "8",
    "SCALPER__MODELS__MLP__HIDDEN_2": "8",
    "SCALPER__MODELS__MLP__HIDDEN_3": "4",
    "SCALPER__MODELS__MLP__MAX_STEPS": "50",
    "SCALPER__MODELS__MLP__BATCH_SIZE": "64",
    "SCALPER__VALIDATION__MIN_TRADES": "0",
    "SCALPER__VALIDATION__MIN_ACCURACY_EDGE": "-1",
    "SCALPER__VALIDATION__MAX_LOG_LOSS": "10",
    "SCALPER__VALIDATION__MAX_ACCURACY_DROP": "1",
    "SCALPER__VALIDATION__MAX_LOG_LOSS_INCREASE": "10",
    "SCALPER__VALIDATION__MIN_SHARPE": "-1000",
    "SCALPER__VALIDATION__MAX_DRAWDOWN_PCT": "100",
    "SCALPER__VALIDATION__BEAT_BASELINE": "false",
    "SCALPER__VALIDATION__MAX_LATENCY_P99_MS": "100",
    "SCALPER__AUTOTRAIN__SHADOW_MIN_BARS": "60",
    "SCALPER__AUTOTRAIN__SHADOW_MAX_BARS": "240",
    "SCALPER__AUTOTRAIN__ROLLBACK_MIN_BARS": "60",
    "SCALPER__AUTOTRAIN__ROLLBACK_MAX_BARS": "240",
    "SCALPER__RISK__DAILY_LOSS_LIMIT_PCT": "100",
    # Trade more often than the default, so the order path runs all week too.
    "SCALPER__STRATEGY__MIN_CONFIDENCE": "0.38",
}


@dataclass(frozen=True)
class Sizes:
    days: int
    bars_per_s: float
    retrain_every_s: int  # market seconds, every kind

    @classmethod
    def pick(cls, *, quick: bool) -> Sizes:
        # Full: a week in about four minutes, each kind retrained every 12 market hours.
        return cls(1, 80.0, 4 * 3600) if quick else cls(5, 30.0, 12 * 3600)

    @property
    def bars(self) -> int:
        return self.days * BARS_PER_DAY


@dataclass(frozen=True)
class Sample:
    t_s: float  # since the replay began
    bars: int
    rss_mb: float
    fds: int
    os_threads: int
    py_threads: int
    tasks: int
    worker_rss_mb: float | None
    training_runs: int
    modules: int  # len(sys.modules): a lazy import is a one-time cost, not a leak


@dataclass
class SoakResults:
    quick: bool
    sizes: Sizes
    seconds: float = 0.0
    exit_code: int = -1
    samples: list[Sample] = field(default_factory=list)
    # 8 bytes a tick (a list of floats would itself grow the RSS being measured).
    lag_ms: array[float] = field(default_factory=lambda: array("d"))
    stalls: list[tuple[float, float, int]] = field(default_factory=list)  # (t s, lag ms, bars)
    warm_index: int = 0
    warm_first: int = 0  # the first sample past warm-up, before the lazy imports settled
    trades: int = 0
    training_runs: int = 0
    training_outcomes: dict[str, int] = field(default_factory=dict)
    promotions: int = 0
    journal_mb: float = 0.0

    @property
    def start(self) -> Sample:
        return self.samples[self.warm_index]

    @property
    def end(self) -> Sample:
        return self.samples[-1]

    def figures(self) -> dict[str, Any]:
        """The numbers of the run, for BENCHMARKS.md or a comparison."""
        s, e = self.start, self.end
        return {
            "bars": e.bars,
            "seconds": round(self.seconds, 1),
            "exit_code": self.exit_code,
            "rss_start_mb": round(s.rss_mb, 1),
            "rss_end_mb": round(e.rss_mb, 1),
            "rss_peak_mb": round(max(x.rss_mb for x in self.samples), 1),
            "rss_growth_pct": round(self.rss_growth_pct, 2),
            "rss_slope_mb_per_day": round(self.rss_slope_mb_per_day, 2),
            "fds_start": s.fds,
            "fds_end": e.fds,
            "fds_max": max(x.fds for x in self.samples[self.warm_index :]),
            "os_threads_start": s.os_threads,
            "os_threads_end": e.os_threads,
            "py_threads_start": s.py_threads,
            "py_threads_end": e.py_threads,
            "tasks_start": s.tasks,
            "tasks_end": e.tasks,
            "lag_p50_ms": round(_pct(self.lag_ms, 50), 2),
            "lag_p99_ms": round(_pct(self.lag_ms, 99), 2),
            "lag_p999_ms": round(_pct(self.lag_ms, 99.9), 2),
            "lag_max_ms": round(max(self.lag_ms, default=float("nan")), 2),
            "ticks": len(self.lag_ms),
            "trades": self.trades,
            "training_runs": self.training_runs,
            "training_outcomes": dict(self.training_outcomes),
            "promotions": self.promotions,
            "worker_rss_mb_max": max(
                (x.worker_rss_mb for x in self.samples if x.worker_rss_mb is not None),
                default=None,
            ),
            "journal_mb": round(self.journal_mb, 1),
            "modules_loaded_after_warm_up": s.modules - self.samples[self.warm_first].modules,
            "rss_warm_up_mb": round(self.samples[self.warm_first].rss_mb, 1),
        }

    @property
    def rss_growth_pct(self) -> float:
        return (self.end.rss_mb / self.start.rss_mb - 1.0) * 100.0

    @property
    def rss_slope_mb_per_day(self) -> float:
        """Least-squares slope of RSS over bars after warm-up, per market day."""
        pts = [(x.bars, x.rss_mb) for x in self.samples[self.warm_index :]]
        if len(pts) < 3:
            return float("nan")
        n = len(pts)
        mx = sum(b for b, _ in pts) / n
        my = sum(r for _, r in pts) / n
        var = sum((b - mx) ** 2 for b, _ in pts)
        if var == 0:
            return float("nan")
        slope = sum((b - mx) * (r - my) for b, r in pts) / var
        return slope * BARS_PER_DAY


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _fds(proc: psutil.Process) -> int:
    if sys.platform == "win32":
        return int(proc.num_handles())
    return int(proc.num_fds())


def _worker_rss_mb(proc: psutil.Process) -> float | None:
    total = 0.0
    found = False
    with contextlib.suppress(psutil.Error):
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                total += child.memory_info().rss / 2**20
                found = True
    return total if found else None


def _count(journal: Path, sql: str) -> int:
    conn = sqlite3.connect(f"{journal.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        return int(conn.execute(sql).fetchone()[0])
    except sqlite3.Error:
        return 0
    finally:
        conn.close()


def soak_env(tmp: Path, sizes: Sizes) -> dict[str, str]:
    env = {
        **SOAK_ENV,
        "SCALPER__STORAGE__JOURNAL_PATH": str(tmp / "journal.sqlite3"),
        "SCALPER__STORAGE__MODELS_DIR": str(tmp / "models"),
        "SCALPER__RISK__KILL_SWITCH_PATH": str(tmp / "KILL"),
        "SCALPER__PAPER__REPLAY_BARS_PER_S": f"{sizes.bars_per_s:g}",
    }
    for kind in ("RF", "XGB", "LSTM", "MLP"):
        env[f"SCALPER__MODELS__{kind}__RETRAIN_EVERY_S"] = str(sizes.retrain_every_s)
    return env


async def _run(tmp: Path, sizes: Sizes, results: SoakResults) -> None:
    from config.settings import load_settings
    from main import serve, start_daemon
    from utils.logsetup import configure_logging

    settings = load_settings(environ=soak_env(tmp, sizes))
    configure_logging(settings.logging.level, settings.logging.format)
    journal = Path(settings.storage.journal_path)
    proc = psutil.Process()
    daemon = await start_daemon(settings, max_bars=sizes.bars)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    warm_bars = sizes.bars // 5

    async def ticker() -> None:
        while not stop.is_set():
            due = loop.time() + TICK_S
            await asyncio.sleep(TICK_S)
            lag = max(0.0, loop.time() - due) * 1000.0
            results.lag_ms.append(lag)
            if lag >= STALL_MS:
                results.stalls.append((due - t0, lag, daemon.engine.stats.bars))

    def measure(t_s: float, bars: int, tasks: int) -> tuple[Sample, int]:
        # Off the loop (a thread): /proc reads and journal queries must not add lag.
        sample = Sample(
            t_s=t_s,
            bars=bars,
            rss_mb=proc.memory_info().rss / 2**20,
            fds=_fds(proc),
            os_threads=proc.num_threads(),
            py_threads=threading.active_count(),
            tasks=tasks,
            worker_rss_mb=_worker_rss_mb(proc),
            training_runs=_count(journal, "SELECT count(*) FROM training_runs"),
            modules=len(sys.modules),
        )
        finished = _count(journal, "SELECT count(*) FROM training_runs WHERE finished IS NOT NULL")
        return sample, finished

    warm_ok: list[bool] = []

    async def sampler() -> None:
        kinds = len(settings.models.enabled_kinds)
        while not stop.is_set():
            s, finished = await asyncio.to_thread(
                measure, loop.time() - t0, daemon.engine.stats.bars, len(asyncio.all_tasks())
            )
            results.samples.append(s)
            warm_ok.append(s.bars >= warm_bars and finished >= kinds)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SAMPLE_S)

    side = [
        asyncio.create_task(ticker(), name="soak-ticker"),
        asyncio.create_task(sampler(), name="soak-sampler"),
    ]
    try:
        results.exit_code = await serve(daemon, install_signals=False, command_poll_s=1.0)
    finally:
        stop.set()
        await asyncio.gather(*side, return_exceptions=True)
        daemon.journal.close()
    results.seconds = loop.time() - t0
    # The end is the last sample taken while the daemon still traded (not its shutdown).
    while len(results.samples) > 2 and results.samples[-1].bars >= sizes.bars:
        results.samples.pop()
        warm_ok.pop()
    # Start: warm-up done and every module the run will ever load loaded (the first
    # drift check imports scipy.stats, ~10 MB, once: a cost, not a leak).
    warm = [i for i, ok in enumerate(warm_ok) if ok] or [0]
    final = results.samples[-1].modules
    settled = [i for i in warm if results.samples[i].modules >= final]
    results.warm_first = warm[0]
    results.warm_index = settled[0] if settled else warm[0]
    results.trades = _count(journal, "SELECT count(*) FROM trades")
    results.training_runs = _count(journal, "SELECT count(*) FROM training_runs")
    results.promotions = _count(
        journal, "SELECT count(*) FROM model_events WHERE event = 'promoted'"
    )
    results.training_outcomes = _outcomes(journal)
    size = sum(p.stat().st_size for p in journal.parent.glob("journal.sqlite3*"))
    results.journal_mb = size / 2**20


def _outcomes(journal: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"{journal.resolve().as_uri()}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT status, count(*) FROM training_runs GROUP BY status")
        return {str(status): int(n) for status, n in rows}
    finally:
        conn.close()


def run(tmp: Path, *, quick: bool) -> SoakResults:
    sizes = Sizes.pick(quick=quick)
    results = SoakResults(quick=quick, sizes=sizes)
    asyncio.run(_run(tmp, sizes, results))
    return results


def _verdict(ok: bool) -> str:
    return "**MET**" if ok else "**NOT MET**"


def _halves(r: SoakResults, attr: str) -> tuple[int, int]:
    """Highest value in the first and in the second half of the run after warm-up.

    Pools (the default executor, ONNX Runtime, the reaper) start threads lazily and
    let them go again: a leak is a ceiling that keeps rising, not one sample above
    another, so the halves' maxima are compared.
    """
    after = r.samples[r.warm_index :]
    mid = max(1, len(after) // 2)
    first = max(int(getattr(x, attr)) for x in after[:mid])
    second = max((int(getattr(x, attr)) for x in after[mid:]), default=first)
    return first, second


def _targets(r: SoakResults) -> list[tuple[str, str, str]]:
    f = r.figures()
    rows = [
        (
            f"RSS growth start → end ≤ {TARGET_RSS_GROWTH_PCT:g} %",
            f"{f['rss_start_mb']:.1f} → {f['rss_end_mb']:.1f} MB ({f['rss_growth_pct']:+.2f} %; "
            f"trend {f['rss_slope_mb_per_day']:+.2f} MB per market day, peak "
            f"{f['rss_peak_mb']:.1f} MB)",
            _verdict(f["rss_growth_pct"] <= TARGET_RSS_GROWTH_PCT),
        )
    ]
    for name, attrs in (
        ("open file descriptors", ("fds",)),
        ("threads (OS, Python)", ("os_threads", "py_threads")),
        ("asyncio tasks", ("tasks",)),
    ):
        parts, ok = [], True
        for attr in attrs:
            first, second = _halves(r, attr)
            start, end = getattr(r.start, attr), getattr(r.end, attr)
            parts.append(f"{start} → {end} (max {first} in the first half, {second} in the second)")
            ok = ok and second <= first
        rows.append((f"{name}: no growth", "; ".join(parts), _verdict(ok)))
    return rows


def summary_lines(r: SoakResults) -> list[str]:
    f = r.figures()
    lines = [
        f"soak: {f['bars']:,} bars in {f['seconds']:.1f} s (exit {f['exit_code']}), "
        f"{f['trades']} trades, {f['training_runs']} training runs {f['training_outcomes']}, "
        f"{f['promotions']} promotions",
        f"soak: loop lag p50 {f['lag_p50_ms']:.2f} p99 {f['lag_p99_ms']:.2f} p99.9 "
        f"{f['lag_p999_ms']:.2f} max {f['lag_max_ms']:.2f} ms ({f['ticks']:,} ticks)",
    ]
    for name, measured, verdict in _targets(r):
        lines.append(f"soak: target {name}: {measured}: {verdict.replace('**', '')}")
    return lines


def render(r: SoakResults) -> str:
    f = r.figures()
    s = r.sizes
    lines = [
        "## Soak: a trading week through the daemon (`bench/soak.py`)",
        "",
        f"`python -m bench.soak{' --quick' if r.quick else ''}`: the paper daemon "
        "(`start_daemon` + `serve`, system clock, in this process) replays "
        f"{s.days} × {BARS_PER_DAY} M1 bars of the synthetic market at {s.bars_per_s:g} "
        f"bars/s with rf, xgb, lstm and mlp enabled (small sizes) and each retrained every "
        f"{s.retrain_every_s / 3600:g} market hours in the spawned worker; easy gates and short "
        "shadow and rollback trials, so candidates get promoted and swapped while it trades. "
        f"A 10 ms ticker measures loop lag; a sampler reads RSS, file descriptors, threads and "
        f"tasks every {SAMPLE_S:g} s. Start = the first sample after warm-up (first training "
        "round done, a fifth of the bars replayed) with every module the run loads loaded; "
        "end = the last sample while trading."
        + (" **Quick run (one day): too short for the figures to mean much.**" if r.quick else ""),
        "",
        "| target | measured | result |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in _targets(r)]
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(f["training_outcomes"].items()))
    worker = f["worker_rss_mb_max"]
    lines += [
        "",
        f"- Run: {f['bars']:,} bars in {f['seconds']:.1f} s, exit code {f['exit_code']}; "
        f"{f['trades']:,} trades; {f['training_runs']} training runs ({outcomes or 'none'}), "
        f"{f['promotions']} promotions; journal {f['journal_mb']:.1f} MB at the end.",
        f"- Event-loop lag (10 ms ticker, {f['ticks']:,} ticks): p50 {f['lag_p50_ms']:.2f} ms, "
        f"p99 {f['lag_p99_ms']:.2f} ms, p99.9 {f['lag_p999_ms']:.2f} ms, max "
        f"{f['lag_max_ms']:.2f} ms; {len(r.stalls)} lags of {STALL_MS:g} ms or more"
        + (
            " (s into the run, ms: "
            + ", ".join(f"{t:.0f} s {lag:.0f} ms" for t, lag, _ in sorted(r.stalls)[:10])
            + ")"
            if r.stalls
            else ""
        )
        + ".",
        f"- Start moved past lazy imports: {f['modules_loaded_after_warm_up']} modules were "
        f"first imported after warm-up (RSS {f['rss_warm_up_mb']:.1f} MB at warm-up, "
        f"{f['rss_start_mb']:.1f} MB at the start sample).",
        "- Training worker RSS, highest sample: "
        + (f"{worker:.0f} MB" if worker is not None else "n/a (no worker seen)")
        + ".",
        "",
        "| s | bars | RSS MB | fds | OS threads | Python threads | tasks | training runs |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    picks = sorted({0, r.warm_index, *range(0, len(r.samples), max(1, len(r.samples) // 8))})
    picks.append(len(r.samples) - 1)
    for i in sorted(set(picks)):
        x = r.samples[i]
        mark = " (start)" if i == r.warm_index else (" (end)" if i == len(r.samples) - 1 else "")
        lines.append(
            f"| {x.t_s:.0f}{mark} | {x.bars:,} | {x.rss_mb:.1f} | {x.fds} | {x.os_threads} | "
            f"{x.py_threads} | {x.tasks} | {x.training_runs} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    quick = "--quick" in args
    with tempfile.TemporaryDirectory() as tmp:
        results = run(Path(tmp), quick=quick)
    for line in summary_lines(results):
        print(line)
    print()
    print(render(results))
    if os.environ.get("SOAK_FIGURES"):
        print(asdict(results.sizes), results.figures())
    return 0 if results.exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
