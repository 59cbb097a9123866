"""Fault injection, long form: SIGKILL a model saver and the paper daemon at random instants.

Two drills, each a loop of kill, check, restart:

1. **Model store.** A child (``tests/fault_children.py store``, which imports only
   the store) saves small versions through the real store API without end: draft,
   commit, validate, promote every other one, retention. It is killed at a random
   instant (seeded; one in ten during its start-up). After every kill the store is
   opened the way the daemon opens it (``cleanup_leftovers``) and must: have no
   leftovers, show only complete versions (every file re-hashed against its
   manifest), still hold every version the child saw committed (retention aside),
   name by ``production`` the version the child last promoted (or the one it was
   promoting), load it (``resolve``), and pass ``python main.py models verify``.
2. **Paper daemon.** ``python main.py run`` trades the embedded market at full
   replay speed on a configuration that trades on most bars; it is killed at a
   random instant after it processed its first bar (one in ten during start-up),
   or by a deterministic crash point of ``SCALPER_CRASH_AT``, and restarted on the
   same journal. After every kill: ``PRAGMA integrity_check`` passes; no trade the
   journal ever held is gone or changed (a closed trade stays closed with the same
   P&L); no client order id or paper position id was filled twice; every filled
   entry order has its trade. A last clean run must stop with exit 0, and its
   final balance must equal the initial balance plus every closed trade's net P&L
   plus the open positions' opening commissions.

``python -m bench.faults`` runs 200 store kills and 25 daemon kills and prints a
markdown section for BENCHMARKS.md; ``--quick`` runs 20 and 6;
``--journal-batch-max 1`` makes every journal write its own commit (the most
commit boundaries for a kill to fall between).
``tests/test_fault_injection.py`` runs the same drills, shorter, in CI.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SYMBOL = "EURUSD"
STORE_KIND = "rf"
KILLED_RC = 137 if sys.platform == "win32" else -getattr(signal, "SIGKILL", 9)
POLL_S = 0.01  # how often the parent looks for a child's progress
PROGRESS_TIMEOUT_S = 120.0


def _child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SCALPER")}
    env.pop("STORE_CRASH_AT", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=60)


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# --------------------------------------------------------------------------- model store


@dataclass
class StoreKillReport:
    kills: int = 0
    during_startup: int = 0
    versions_committed: int = 0  # versions the children logged as committed
    promotions: int = 0
    leftovers_removed: int = 0  # drafts and temporary files cleaned after kills
    versions_checked: int = 0  # version directories re-hashed after kills (all of them)
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


def _read_log(path: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by the kill
    return records


def check_store(
    root: Path, log: Path, expected_production: str | None, report: StoreKillReport
) -> str | None:
    """Open the store as the daemon does and check every promise; returns production."""
    from config.settings import load_settings
    from ml.cli_models import models_verify
    from ml.store import ModelStore
    from utils.clock import SystemClock

    problems = report.failures
    label = f"kill {report.kills}"
    records = _read_log(log)
    store = ModelStore(root, clock=SystemClock(), retention=3)
    removed = store.cleanup_leftovers()
    report.leftovers_removed += len(removed)
    kdir = root / SYMBOL / STORE_KIND
    if kdir.exists():
        left = [
            p.name for p in kdir.iterdir() if p.name.startswith(".tmp-") or p.name.endswith(".tmp")
        ]
        if left:
            problems.append(f"{label}: leftovers after cleanup: {left}")
    bad = store.verify(SYMBOL, STORE_KIND)
    if bad:
        problems.append(f"{label}: verify: {bad}")
    infos = store.versions(SYMBOL, STORE_KIND)
    report.versions_checked += len(infos)
    live = {i.version for i in infos}
    committed = [r["version"] for r in records if r["op"] == "committed"]
    report.versions_committed += len(committed)
    report.promotions += sum(1 for r in records if r["op"] == "promoted")
    deleted = {v for r in records if r["op"] == "retention" for v in r["deleted"]}
    if committed and committed[-1] not in live:
        problems.append(f"{label}: the last committed version {committed[-1]} is gone")
    # Retention keeps the newest three, so a kill can only ever race it for older ones.
    lost = [v for v in committed[-3:] if v not in live and v not in deleted]
    if lost:
        problems.append(f"{label}: committed versions missing: {lost}")
    production = store.aliases(SYMBOL, STORE_KIND)["production"]
    allowed = {expected_production}
    for r in records:
        if r["op"] == "promoted":
            allowed = {r["version"]}
        elif r["op"] == "promoting":
            allowed = allowed | {r["version"]}
    if production not in allowed:
        problems.append(
            f"{label}: production is {production}, expected one of {sorted(map(str, allowed))}"
        )
    resolved = store.resolve(SYMBOL, STORE_KIND)
    if (resolved.version if resolved else None) != production:
        problems.append(f"{label}: production {production} does not load ({resolved})")
    settings = load_settings(environ={"SCALPER__STORAGE__MODELS_DIR": str(root)})
    out = io.StringIO()
    if models_verify(settings, out=out, clock=SystemClock()) != 0 or "FAILED" in out.getvalue():
        problems.append(f"{label}: models verify failed:\n{out.getvalue()}")
    return production


def store_kills(
    workdir: Path, *, kills: int, seed: int, max_delay_s: float = 0.3
) -> StoreKillReport:
    """Kill a model-saving child ``kills`` times at seeded random instants; check each time."""
    rng = random.Random(seed)
    report = StoreKillReport()
    root = workdir / "models"
    env = _child_env()
    production: str | None = None
    started = time.perf_counter()
    for run in range(kills):
        log = workdir / f"store-{run}.log"
        cmd = [sys.executable, "-m", "tests.fault_children", "store", str(root), str(log)]
        proc = subprocess.Popen([*cmd, str(run * 1000)], cwd=ROOT, env=env, stderr=subprocess.PIPE)
        try:
            if rng.random() < 0.1:
                report.during_startup += 1
                time.sleep(rng.uniform(0.0, 0.3))
            else:
                deadline = time.monotonic() + PROGRESS_TIMEOUT_S
                while not (log.exists() and log.stat().st_size) and proc.poll() is None:
                    if time.monotonic() > deadline:
                        report.failures.append(f"kill {run}: the child never got ready")
                        break
                    time.sleep(POLL_S)
                time.sleep(rng.uniform(0.0, max_delay_s))
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                report.failures.append(f"kill {run}: the child died by itself: {err[-2000:]}")
            _kill(proc)
        finally:
            if proc.poll() is None:
                _kill(proc)
            if proc.stderr:
                proc.stderr.close()
        report.kills += 1
        production = check_store(root, log, production, report)
    report.seconds = time.perf_counter() - started
    return report


# --------------------------------------------------------------------------- paper daemon

# A configuration that trades on most bars, on the baseline predictor, at full speed.
DAEMON_SETTINGS: Mapping[str, str] = {
    "SCALPER__PAPER__HISTORY_BARS": "100",
    "SCALPER__PAPER__REPLAY_BARS_PER_S": "0",
    "SCALPER__LOGGING__LEVEL": "WARNING",
    "SCALPER__LOGGING__FORMAT": "json",
    **{f"SCALPER__MODELS__{k}__ENABLED": "false" for k in ("RF", "XGB", "LSTM", "MLP")},
    "SCALPER__RISK__DAILY_LOSS_LIMIT_PCT": "100",
    "SCALPER__RISK__MAX_POSITIONS_PER_SYMBOL": "3",
    "SCALPER__STRATEGY__MIN_CONFIDENCE": "0.34",
    "SCALPER__STRATEGY__MAX_HOLDING_BARS": "5",
    "SCALPER__STORAGE__EQUITY_SNAPSHOT_EVERY_BARS": "20",
}
INITIAL_BALANCE = 10_000.0  # paper.initial_balance's default
ENTRY_FILLED = 10009  # TRADE_RETCODE_DONE


@dataclass
class DaemonKillReport:
    kills: int = 0
    random_kills: int = 0
    during_startup: int = 0
    crash_points: list[str] = field(default_factory=list)
    finished_before_kill: int = 0
    restart_to_first_bar_s: list[float] = field(default_factory=list)
    trades: int = 0
    closed: int = 0
    open_at_end: int = 0
    entry_fills: int = 0
    balance: float = float("nan")
    expected_balance: float = float("nan")
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)  # beyond DAEMON_SETTINGS


def daemon_env(workdir: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return _child_env(
        {
            "SCALPER__STORAGE__JOURNAL_PATH": str(workdir / "journal.sqlite3"),
            "SCALPER__STORAGE__MODELS_DIR": str(workdir / "models"),
            "SCALPER__RISK__KILL_SWITCH_PATH": str(workdir / "KILL"),
            **DAEMON_SETTINGS,
            **(extra or {}),
        }
    )


def _query(path: Path, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, tuple(params)).fetchall()
    finally:
        conn.close()


def _last_bar(journal: Path) -> str | None:
    if not journal.exists():
        return None
    try:
        rows = _query(
            journal, "SELECT value FROM state WHERE key = ?", (f"feed.last_bar_time.{SYMBOL}",)
        )
    except sqlite3.Error:
        return None  # not created yet
    return str(rows[0][0]) if rows else None


TRADE_COLUMNS = (
    "client_order_id, status, symbol, side, volume, open_time, open_price, sl, tp, "
    "broker_position_id, close_time, close_price, close_reason, profit, commission, swap, "
    "net_profit"
)
OPEN_FIELDS = slice(2, 10)  # symbol .. broker_position_id: fixed once the trade is open


class TradeLedger:
    """Every trade the journal ever showed, checked against what it shows after each kill."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[Any, ...]] = {}

    def check(self, journal: Path, label: str) -> list[str]:
        problems: list[str] = []
        rows = {r[0]: r for r in _query(journal, f"SELECT {TRADE_COLUMNS} FROM trades")}  # noqa: S608
        for coid, before in self.seen.items():
            now = rows.get(coid)
            if now is None:
                problems.append(f"{label}: trade {coid} was in the journal and is gone")
                continue
            if now[OPEN_FIELDS] != before[OPEN_FIELDS]:
                problems.append(f"{label}: trade {coid} changed: {before} -> {now}")
            if before[1] == "closed" and now != before:
                problems.append(f"{label}: closed trade {coid} changed: {before} -> {now}")
        position_ids = [r[9] for r in rows.values() if r[9] is not None]
        if len(position_ids) != len(set(position_ids)):
            problems.append(f"{label}: a paper position id was used by two trades")
        twice = _query(
            journal,
            "SELECT client_order_id, count(*) FROM orders WHERE action = 'open' AND retcode = ? "
            "GROUP BY client_order_id HAVING count(*) > 1",
            (ENTRY_FILLED,),
        )
        if twice:
            problems.append(f"{label}: entries filled twice: {twice}")
        orphans = _query(
            journal,
            "SELECT client_order_id FROM orders WHERE action = 'open' AND retcode = ? AND "
            "client_order_id NOT IN (SELECT client_order_id FROM trades)",
            (ENTRY_FILLED,),
        )
        if orphans:
            problems.append(f"{label}: filled entries without a trade: {[o[0] for o in orphans]}")
        self.seen = dict(rows)
        return problems


def _wait_for_progress(
    proc: subprocess.Popen[bytes], journal: Path, before: str | None
) -> float | None:
    """Seconds until the daemon processed a bar past ``before``; None if it exited first."""
    started = time.monotonic()
    while proc.poll() is None:
        if _last_bar(journal) not in (None, before):
            return time.monotonic() - started
        if time.monotonic() - started > PROGRESS_TIMEOUT_S:
            raise TimeoutError(f"the daemon processed no bar in {PROGRESS_TIMEOUT_S:g} s")
        time.sleep(POLL_S)
    return None


def daemon_kills(
    workdir: Path,
    *,
    kills: int,
    seed: int,
    crash_points: Sequence[str] = ("order:3", "trade:2", "bar:150"),
    max_delay_s: float = 1.5,
    final_bars: int = 300,
    settings: Mapping[str, str] | None = None,
) -> DaemonKillReport:
    """Kill the paper daemon ``kills`` times (random instants and crash points), then stop it
    cleanly; check the journal after every kill and the account at the end.

    ``settings``: extra ``SCALPER__...`` variables for every run (e.g.
    ``SCALPER__STORAGE__JOURNAL_BATCH_MAX=1``: every write its own commit, the most
    commit boundaries a kill can fall between).
    """
    rng = random.Random(seed)
    report = DaemonKillReport(settings=dict(settings or {}))
    journal = workdir / "journal.sqlite3"
    ledger = TradeLedger()
    cmd = [sys.executable, str(ROOT / "main.py"), "run"]
    # Crash points spread evenly among the random kills.
    plan: list[str | None] = [None] * kills
    for n, crash in enumerate(crash_points[:kills]):
        plan[(n + 1) * kills // (len(crash_points) + 1)] = crash
    started = time.perf_counter()
    for run, point in enumerate(plan):
        label = f"kill {run} ({point or 'random'})"
        extra = {**(settings or {}), **({"SCALPER_CRASH_AT": point} if point else {})}
        err_path = workdir / f"daemon-{run}.err"
        before = _last_bar(journal)
        with open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [*cmd, "--max-bars", "1000000"],
                cwd=ROOT,
                env=daemon_env(workdir, extra),
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
            try:
                if point is not None:
                    proc.wait(timeout=PROGRESS_TIMEOUT_S)
                    report.crash_points.append(point)
                elif rng.random() < 0.1:
                    report.during_startup += 1
                    time.sleep(rng.uniform(0.0, 1.5))
                else:
                    ready_s = _wait_for_progress(proc, journal, before)
                    if ready_s is not None:
                        report.restart_to_first_bar_s.append(ready_s)
                    time.sleep(rng.uniform(0.0, max_delay_s))
                if point is None:
                    report.random_kills += 1
                    if proc.poll() is not None:
                        report.finished_before_kill += 1
                _kill(proc)
            finally:
                if proc.poll() is None:
                    _kill(proc)
        report.kills += 1
        if proc.returncode != KILLED_RC:
            tail = err_path.read_text(encoding="utf-8", errors="replace")[-2000:]
            report.failures.append(f"{label}: exit code {proc.returncode}, not killed: {tail}")
        if journal.exists():
            check = _query(journal, "PRAGMA integrity_check")
            if check != [("ok",)]:
                report.failures.append(f"{label}: integrity_check {check}")
            report.failures.extend(ledger.check(journal, label))
        text = err_path.read_text(encoding="utf-8", errors="replace")
        for bad in ("Traceback", "journal_write_failing", "database is locked"):
            if bad in text:
                report.failures.append(f"{label}: {bad!r} in the daemon's output: {text[-2000:]}")
    # A clean run to the end: exit 0, and the account adds up.
    proc_done = subprocess.run(
        [*cmd, "--max-bars", str(final_bars)],
        cwd=ROOT,
        env=daemon_env(workdir, settings),
        capture_output=True,
        text=True,
        timeout=PROGRESS_TIMEOUT_S,
        check=False,
    )
    if proc_done.returncode != 0:
        report.failures.append(
            f"final run: exit {proc_done.returncode}: {proc_done.stderr[-2000:]}"
        )
    report.failures.extend(ledger.check(journal, "final run"))
    report.failures.extend(_account_identity(journal, report))
    report.seconds = time.perf_counter() - started
    return report


def _account_identity(journal: Path, report: DaemonKillReport) -> list[str]:
    (balance, open_positions), *_ = _query(
        journal, "SELECT balance, open_positions FROM equity ORDER BY id DESC LIMIT 1"
    )
    (closed, net, n, open_commission, n_open), *_ = _query(
        journal,
        "SELECT sum(status = 'closed'), COALESCE(SUM(CASE WHEN status = 'closed' THEN net_profit "
        "END), 0), count(*), COALESCE(SUM(CASE WHEN status = 'open' THEN commission END), 0), "
        "sum(status = 'open') FROM trades",
    )
    report.trades, report.closed, report.open_at_end = int(n), int(closed or 0), int(n_open or 0)
    report.entry_fills = int(
        _query(
            journal,
            "SELECT count(*) FROM orders WHERE action = 'open' AND retcode = ?",
            (ENTRY_FILLED,),
        )[0][0]
    )
    report.balance = float(balance)
    report.expected_balance = round(INITIAL_BALANCE + float(net) + float(open_commission), 2)
    problems = []
    if abs(report.balance - report.expected_balance) > 0.005:
        problems.append(
            f"final balance {report.balance:.2f} != initial + closed net P&L + open commissions "
            f"{report.expected_balance:.2f}"
        )
    if int(open_positions) != report.open_at_end:
        problems.append(
            f"the broker holds {open_positions} positions, the journal "
            f"{report.open_at_end} open trades"
        )
    return problems


# --------------------------------------------------------------------------- report


def summary_lines(store: StoreKillReport, daemon: DaemonKillReport) -> list[str]:
    lines = [
        f"faults: store: {store.kills} SIGKILLs ({store.during_startup} during start-up) in "
        f"{store.seconds:.1f} s; {store.versions_committed} versions committed, "
        f"{store.promotions} promotions, {store.leftovers_removed} leftovers cleaned, "
        f"{store.versions_checked} version directories re-hashed; "
        f"{'PASS' if not store.failures else f'FAIL ({len(store.failures)})'}",
        f"faults: daemon: {daemon.kills} kills ({daemon.random_kills} SIGKILL at random instants, "
        f"{daemon.during_startup} of them during start-up, crash points "
        f"{', '.join(daemon.crash_points) or 'none'}) in {daemon.seconds:.1f} s; "
        f"{daemon.trades} trades ({daemon.closed} closed), {daemon.entry_fills} entry fills; "
        f"final balance {daemon.balance:,.2f} vs expected {daemon.expected_balance:,.2f}; "
        f"{'PASS' if not daemon.failures else f'FAIL ({len(daemon.failures)})'}",
    ]
    lines += [f"faults: FAILURE {f}" for f in store.failures + daemon.failures]
    return lines


def render(store: StoreKillReport, daemon: DaemonKillReport, *, seed: int) -> str:
    restart = daemon.restart_to_first_bar_s
    verdict = {True: "**PASS**", False: "**FAIL**"}
    lines = [
        "## Fault injection: SIGKILL at random instants (`bench/faults.py`)",
        "",
        f"`python -m bench.faults` (seed {seed}). Each kill is followed by the checks a "
        "restart relies on; a failure lists what broke. The CI form "
        "(`tests/test_fault_injection.py`) runs the same drills with fewer kills.",
        "",
        "| drill | kills | what was checked after every kill | result |",
        "| --- | ---: | --- | --- |",
        f"| model store: a child saving versions (draft, commit, validate, promote, retention) "
        f"| {store.kills} ({store.during_startup} in start-up) | no leftovers after "
        "`cleanup_leftovers`; every version complete (re-hashed); the last committed version "
        "present; production = the last promoted (or the one being promoted) and loads; "
        f"`models verify` passes | {verdict[not store.failures]} |",
        "| paper daemon trading at full replay speed"
        + "".join(f", {k}={v}" for k, v in daemon.settings.items())
        + f" | {daemon.kills} ({daemon.random_kills} "
        f"random, {daemon.during_startup} in start-up; crash points "
        f"{', '.join(daemon.crash_points) or 'none'}) | `integrity_check`; no journaled trade lost "
        "or changed (closed ones keep their P&L); no entry filled twice, no position id reused, "
        "no filled entry without its trade; final clean run: exit 0, balance = initial + closed "
        f"net P&L + open commissions | {verdict[not daemon.failures]} |",
        "",
        f"- Store: {store.versions_committed} versions committed and {store.promotions} "
        f"promotions across the children; {store.leftovers_removed} leftovers (dead drafts, "
        f"temporary files) removed at the restarts; {store.versions_checked} version "
        f"directories re-hashed; {store.seconds:.1f} s.",
        f"- Daemon: {daemon.trades} trades ({daemon.closed} closed, {daemon.open_at_end} open at "
        f"the end), {daemon.entry_fills} entry fills; final balance {daemon.balance:,.2f} = "
        f"expected {daemon.expected_balance:,.2f}; restart to first processed bar p50 "
        f"{_pct(restart, 50):.2f} s, max {max(restart, default=float('nan')):.2f} s (process "
        f"start, imports, journal `quick_check`, paper account rebuilt from the journal, "
        f"warm-up); {daemon.seconds:.1f} s.",
    ]
    failures = store.failures + daemon.failures
    if failures:
        lines += ["", "Failures:", ""] + [f"- {f}" for f in failures[:20]]
    return "\n".join(lines) + "\n"


def run(
    workdir: Path,
    *,
    store_n: int,
    daemon_n: int,
    seed: int,
    daemon_settings: Mapping[str, str] | None = None,
) -> tuple[StoreKillReport, DaemonKillReport]:
    (workdir / "store").mkdir(parents=True, exist_ok=True)
    (workdir / "daemon").mkdir(parents=True, exist_ok=True)
    store = store_kills(workdir / "store", kills=store_n, seed=seed)
    daemon = daemon_kills(workdir / "daemon", kills=daemon_n, seed=seed, settings=daemon_settings)
    return store, daemon


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.faults", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="20 store kills, 6 daemon kills")
    parser.add_argument("--store-kills", type=int, default=None)
    parser.add_argument("--daemon-kills", type=int, default=None)
    parser.add_argument("--seed", type=int, default=20240607)
    parser.add_argument(
        "--journal-batch-max",
        type=int,
        default=None,
        help="the daemon's storage.journal_batch_max (1: a commit per write, the harshest)",
    )
    args = parser.parse_args(argv)
    extra = (
        {"SCALPER__STORAGE__JOURNAL_BATCH_MAX": str(args.journal_batch_max)}
        if args.journal_batch_max
        else None
    )
    store_n = args.store_kills or (20 if args.quick else 200)
    daemon_n = args.daemon_kills or (6 if args.quick else 25)
    with tempfile.TemporaryDirectory() as tmp:
        store, daemon = run(
            Path(tmp), store_n=store_n, daemon_n=daemon_n, seed=args.seed, daemon_settings=extra
        )
    for line in summary_lines(store, daemon):
        print(line)
    print()
    print(render(store, daemon, seed=args.seed))
    return 0 if not (store.failures or daemon.failures) else 1


if __name__ == "__main__":
    sys.exit(main())
