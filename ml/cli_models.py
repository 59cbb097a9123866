"""``python main.py models ...`` and ``python main.py train``: the operator's view of the store.

Read-only commands (``list``, ``show``, ``diff``, ``verify``, ``events``) read the
store and the journal directly, also while the daemon runs. Store-writing
commands (``promote``, ``rollback``, ``delete``, ``train``) follow CONVENTIONS.md:
while a daemon runs on the journal (fresh heartbeat, :func:`utils.commands.daemon_alive`)
the request goes into the journal's ``commands`` table and the daemon answers it
(:func:`handle_command`, which also makes the daemon serve a new production
model from its next bar); with no daemon the CLI acts itself, under the
store's per-``<SYMBOL>/<kind>`` OS-level lock, and journals the store's events
as ``model_events``.

Every command returns an exit code: 0 done, 1 a runtime failure (or ``verify``
finding a mismatch), 2 a request that cannot be honoured as given (unknown
symbol, kind or version, deleting an aliased version, rollback with nothing to
roll back to): one line on ``err`` naming the thing and the fix.

**Ages.** A model's age is ``now - trained``, where ``trained`` is the MARKET
time of the last bar of its training data (manifest ``trained``) and ``now`` is
the symbol's latest processed bar in the journal (state
``feed.last_bar_time.<SYMBOL>``: in a replay, market time is the bar time) or,
when the journal has none, the wall clock. ``STALE`` marks an age above
``models.max_model_age_s``, the rule the daemon retrains by.

Heavy libraries (onnxruntime, torch, xgboost, scikit-learn) load only for
``train``; the other commands import the store, the journal and ``rich``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sqlite3
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, TextIO

from config.settings import Settings
from ml.kinds import KINDS
from ml.store import (
    ALIASES,
    IntegrityError,
    ModelStore,
    StoreError,
    StoreEvent,
    StoreLockedError,
    VersionInfo,
    is_version,
    journal_hook,
    parse_version,
)
from strategy.features import BarColumns, FeatureSpec
from utils.clock import Clock, iso_utc
from utils.commands import (
    CommandQueueError,
    CommandRow,
    cancel,
    daemon_alive,
    enqueue,
    wait_for,
)
from utils.trade_journal import Journal, JournalError, fetch_market_times

if TYPE_CHECKING:
    from market_data.feeds import FrameSource
    from ml.training import TrainingBackend

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_INVALID: Final = 2

COMMAND_TIMEOUT_S: Final = 120.0
TRAIN_TIMEOUT_S: Final = 3600.0
DEFAULT_EVENTS: Final = 20
STORE_COMMANDS: Final = ("promote", "rollback", "delete", "train")
# Failure types (exception class names in a failed command's result) that mean the
# request itself was wrong: exit 2. Everything else is a runtime failure: exit 1.
_INVALID_TYPES: Final = frozenset({"CommandError", "StoreError"})
_FINISHED_RUNS: Final = ("done", "failed", "cancelled")


class CommandError(Exception):
    """A request that cannot be honoured as given; the message names the thing and the fix."""


class CommandManager(Protocol):
    """What :func:`handle_command` needs of the daemon's ``ModelManager``."""

    def reload(self, symbol: str, kind: str) -> None: ...

    def request_training(
        self, symbol: str, kinds: Sequence[str], cols: BarColumns | None, *, reason: str, rows: int
    ) -> object: ...


# --------------------------------------------------------------------------- small helpers


def _say(stream: TextIO, text: str = "") -> None:
    stream.write(text + "\n")
    stream.flush()


def _is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (OSError, ValueError):
        return False


def _err(err: TextIO | None) -> TextIO:
    import sys

    return err if err is not None else sys.stderr


def open_store(
    settings: Settings, clock: Clock, on_event: Callable[[StoreEvent], None] | None = None
) -> ModelStore:
    return ModelStore(
        Path(settings.storage.models_dir),
        clock=clock,
        retention=settings.models.retention,
        on_event=on_event,
    )


def _fmt_time(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M")


def _fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    sign = "-" if seconds < 0 else ""
    s = int(abs(seconds))
    if s < 60:
        text = f"{s}s"
    elif s < 3600:
        text = f"{s // 60}m"
    elif s < 86_400:
        text = f"{s // 3600}h{(s % 3600) // 60:02d}m"
    else:
        text = f"{s // 86_400}d{(s % 86_400) // 3600:02d}h"
    return sign + text


def _fmt_num(value: object, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return f"{value:.{digits}f}"


def _holdout(manifest: Mapping[str, Any]) -> Mapping[str, Any]:
    metrics = manifest.get("metrics")
    holdout = metrics.get("holdout") if isinstance(metrics, Mapping) else None
    return holdout if isinstance(holdout, Mapping) else {}


def _list_cmd(symbol: str, kind: str | None = None) -> str:
    return f"python main.py models list --symbol {symbol}" + (f" --kind {kind}" if kind else "")


def _render_table(
    out: TextIO, headers: Sequence[str], rows: Sequence[Sequence[str]], *, title: str = ""
) -> None:
    """A ``rich`` table on a terminal, plain aligned columns otherwise."""
    if _is_tty(out):
        from rich import box
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title or None, box=box.SIMPLE_HEAD)
        for header in headers:
            table.add_column(header)
        for row in rows:
            table.add_row(*row)
        Console(file=out).print(table)
        return
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    if title:
        _say(out, title)
    _say(out, "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in rows:
        _say(out, "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


# --------------------------------------------------------------------------- validation


def _check_name(store: ModelStore, symbol: str, kind: str) -> None:
    try:
        store.kind_dir(symbol, kind)
    except StoreError as exc:
        raise CommandError(str(exc).removeprefix("model store: ")) from None


def _stored_pairs(store: ModelStore) -> list[tuple[str, str]]:
    return store.symbols_kinds()


def check_symbol(settings: Settings, store: ModelStore, symbol: str) -> None:
    """Known: traded, configured, or with models in the store."""
    known = set(settings.trading.symbols) | set(settings.symbols)
    known |= {s for s, _ in _stored_pairs(store)}
    if symbol not in known:
        raise CommandError(
            f"unknown symbol {symbol!r}: not in trading.symbols "
            f"({', '.join(settings.trading.symbols)}) and no models stored for it under "
            f"{store.root}; check the spelling (symbols are case-sensitive)"
        )


def check_kind(store: ModelStore, kind: str) -> None:
    known = set(KINDS) | {k for _, k in _stored_pairs(store)}
    if kind not in known:
        raise CommandError(f"unknown model kind {kind!r}; use one of {', '.join(sorted(known))}")


def check_version_text(version: str, symbol: str | None = None, kind: str | None = None) -> None:
    if not is_version(version):
        hint = f"; see {_list_cmd(symbol, kind)}" if symbol else ""
        raise CommandError(
            f"{version!r} is not a version: use MAJOR.MINOR.PATCH such as 1.0.2{hint}"
        )


def _live_versions(store: ModelStore, symbol: str, kind: str) -> list[str]:
    return [info.version for info in store.versions(symbol, kind)]


def check_version(store: ModelStore, symbol: str, kind: str, version: str) -> None:
    check_version_text(version, symbol, kind)
    live = _live_versions(store, symbol, kind)
    if version not in live:
        has = f"it has {', '.join(live)}" if live else "it has no versions yet"
        raise CommandError(
            f"{symbol}/{kind} has no version {version} ({has}); see {_list_cmd(symbol, kind)}"
        )


def _require(value: str | None, flag: str, command: str) -> str:
    if not value:
        raise CommandError(f"models {command} needs {flag}; e.g. {flag} {_EXAMPLES[flag]}")
    return value


_EXAMPLES: Final = {"--symbol": "EURUSD", "--kind": "xgb", "--version": "1.0.0"}


def _selection(
    settings: Settings, store: ModelStore, symbol: str | None, kind: str | None
) -> list[tuple[str, str]]:
    if symbol is not None:
        check_symbol(settings, store, symbol)
    if kind is not None:
        check_kind(store, kind)
    if symbol is not None and kind is not None:
        _check_name(store, symbol, kind)
    return [
        (s, k)
        for s, k in _stored_pairs(store)
        if (symbol is None or s == symbol) and (kind is None or k == kind)
    ]


def train_selection(
    settings: Settings, symbol: str | None, kind: str | None
) -> tuple[list[str], list[str]]:
    """The symbols and kinds ``train`` covers: defaults every traded symbol, every enabled kind."""
    enabled = list(settings.models.enabled_kinds)
    if symbol is not None and symbol not in settings.trading.symbols:
        raise CommandError(
            f"symbol {symbol!r} is not traded (trading.symbols = "
            f"{', '.join(settings.trading.symbols)}); add it there to train models for it"
        )
    if kind is not None:
        if kind not in KINDS:
            raise CommandError(f"unknown model kind {kind!r}; use one of {', '.join(KINDS)}")
        if kind not in enabled:
            raise CommandError(
                f"model kind {kind!r} is disabled (models.{kind}.enabled = false); enable it "
                f"in the settings or pick one of: {', '.join(enabled) or 'none enabled'}"
            )
    elif not enabled:
        raise CommandError(
            "no model kind is enabled; set models.<kind>.enabled = true for rf, xgb, lstm or mlp"
        )
    symbols = [symbol] if symbol is not None else list(settings.trading.symbols)
    return symbols, [kind] if kind is not None else enabled


# --------------------------------------------------------------------------- journal reads


def market_times(journal_path: Path | str) -> dict[str, datetime]:
    """Each symbol's latest processed bar time from journal state (empty without a journal)."""
    try:
        conn = Journal.open_reader(journal_path)
    except JournalError:
        return {}
    try:
        return fetch_market_times(conn)
    except sqlite3.Error:
        return {}
    finally:
        conn.close()


def _now_for(symbol: str, market: Mapping[str, datetime], wall: datetime) -> tuple[datetime, str]:
    if symbol in market:
        return market[symbol], "market"
    return wall, "wall"


# --------------------------------------------------------------------------- models list


def models_list(
    settings: Settings,
    symbol: str | None = None,
    kind: str | None = None,
    *,
    out: TextIO,
    clock: Clock,
    err: TextIO | None = None,
) -> int:
    """``models list [--symbol S] [--kind K]``: every version with stage, ages and metrics."""
    store = open_store(settings, clock)
    try:
        pairs = _selection(settings, store, symbol, kind)
    except CommandError as exc:
        _say(_err(err), str(exc))
        return EXIT_INVALID
    if not pairs:
        what = "/".join(x for x in (symbol, kind) if x) or "any symbol"
        _say(
            out,
            f"no models for {what} under {store.root} yet; "
            "train some with python main.py train (or start the daemon)",
        )
        return EXIT_OK
    market = market_times(settings.storage.journal_path)
    wall = clock.now()
    max_age = settings.models.max_model_age_s
    headers = (
        "SYMBOL", "KIND", "VERSION", "STAGE", "CREATED", "TRAINED", "AGE",
        "ACC", "LOGLOSS", "MAJORITY", "",
    )  # fmt: skip
    rows: list[list[str]] = []
    problems: list[str] = []
    sources: dict[str, str] = {}
    for s, k in pairs:
        try:
            infos = store.versions(s, k)
            aliases = store.aliases(s, k)
        except IntegrityError as exc:
            problems.append(str(exc))
            continue
        now, source = _now_for(s, market, wall)
        sources[s] = f"{iso_utc(now)} (last processed bar)" if source == "market" else "wall clock"
        aliased = {v for v in aliases.values() if v}
        for info in infos:
            age = ModelStore.age_s(info, now) if info.manifest else None
            holdout = _holdout(info.manifest)
            stale = age is not None and age > max_age
            rows.append(
                [
                    s,
                    k,
                    info.version,
                    info.stage + (" *" if info.version in aliased else ""),
                    _fmt_time(info.created),
                    _fmt_time(ModelStore.trained_at(info)) if info.manifest else "-",
                    _fmt_age(age),
                    _fmt_num(holdout.get("accuracy")),
                    _fmt_num(holdout.get("log_loss")),
                    _fmt_num(holdout.get("majority_rate")),
                    "STALE" if stale else ("unreadable" if not info.manifest else ""),
                ]
            )
    _render_table(out, headers, rows)
    _say(out, "* = named by an alias (production, previous, shadow)")
    _say(
        out,
        f"AGE = now - TRAINED (market time of the training data's last bar); STALE when over "
        f"models.max_model_age_s = {max_age} s; now = "
        + "; ".join(f"{s}: {src}" for s, src in sorted(sources.items())),
    )
    for problem in problems:
        _say(_err(err), problem)
    return EXIT_FAILURE if problems else EXIT_OK


# --------------------------------------------------------------------------- models show


def models_show(
    settings: Settings,
    symbol: str | None,
    kind: str | None,
    version: str | None = None,
    *,
    out: TextIO,
    clock: Clock,
    err: TextIO | None = None,
) -> int:
    """``models show --symbol S --kind K [--version V]`` (default: production)."""
    store = open_store(settings, clock)
    try:
        symbol = _require(symbol, "--symbol", "show")
        kind = _require(kind, "--kind", "show")
        _selection(settings, store, symbol, kind)
        aliases = store.aliases(symbol, kind)
        if version is None:
            version = aliases["production"]
            if version is None:
                live = _live_versions(store, symbol, kind)
                has = f"versions: {', '.join(live)}" if live else "no versions yet"
                raise CommandError(
                    f"{symbol}/{kind} has no production version ({has}); pass --version V"
                )
        check_version(store, symbol, kind, version)
        info = store.version_info(symbol, kind, version)
    except CommandError as exc:
        _say(_err(err), str(exc))
        return EXIT_INVALID
    except IntegrityError as exc:
        _say(_err(err), str(exc))
        return EXIT_FAILURE
    problems = store.verify(symbol, kind, version)
    roles = [role for role in ALIASES if aliases.get(role) == version]
    market = market_times(settings.storage.journal_path)
    now, source = _now_for(symbol, market, clock.now())
    age = ModelStore.age_s(info, now) if info.manifest else None
    stale = age is not None and age > settings.models.max_model_age_s
    _say(out, f"{symbol}/{kind} {version}")
    _say(out, f"stage:    {info.stage}" + (f" (alias: {', '.join(roles)})" if roles else ""))
    _say(
        out,
        "aliases:  " + "  ".join(f"{role}={aliases.get(role) or '-'}" for role in ALIASES),
    )
    _say(out, f"path:     {info.path}")
    _say(
        out,
        f"trained:  {_fmt_time(ModelStore.trained_at(info))} (market time), age {_fmt_age(age)} "
        f"against the {'last processed bar' if source == 'market' else 'wall clock'}"
        + (" - STALE" if stale else ""),
    )
    files = info.manifest.get("files")
    n_files = len(files) if isinstance(files, Mapping) else 0
    if problems:
        _say(out, "verify:   FAILED")
        for problem in problems:
            _say(out, f"  - {problem}")
    else:
        _say(out, f"verify:   ok ({n_files} files re-hashed against the manifest)")
    _say(out, "manifest.json:")
    if _is_tty(out):
        from rich.console import Console

        Console(file=out).print_json(data=info.manifest, sort_keys=True)
    else:
        _say(out, json.dumps(info.manifest, indent=2, sort_keys=True))
    return EXIT_OK


# --------------------------------------------------------------------------- models diff

_DIFF_GROUPS: Final = (
    ("params", ("architecture", "hyperparams", "seed", "labels", "library_versions")),
    ("features", ("feature_hash", "feature_names", "feature_params")),
    ("metrics", ("metrics",)),
    ("data window", ("training_window", "trained", "samples", "dataset_hash")),
)


def _group_of(key: str) -> str:
    head = key.split(".", 1)[0]
    for name, heads in _DIFF_GROUPS:
        if head in heads:
            return name
    return "other"


def _short(value: object, limit: int = 90) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe_change(key: str, old: object, new: object) -> str:
    if isinstance(old, list) and isinstance(new, list):
        added = [x for x in new if x not in old]
        removed = [x for x in old if x not in new]
        parts = []
        if added:
            parts.append(f"+{len(added)} {_short(added, 60)}")
        if removed:
            parts.append(f"-{len(removed)} {_short(removed, 60)}")
        if not parts:
            parts.append("same items, new order")
        return f"{key}: " + "; ".join(parts) + f" ({len(old)} -> {len(new)})"
    numeric = (int, float)
    if (
        isinstance(old, numeric)
        and isinstance(new, numeric)
        and not isinstance(old, bool)
        and not isinstance(new, bool)
    ):
        return f"{key}: {old:g} -> {new:g} ({new - old:+.4g})"
    return f"{key}: {_short(old)} -> {_short(new)}"


def models_diff(
    settings: Settings,
    symbol: str | None,
    kind: str | None,
    v1: str,
    v2: str,
    *,
    out: TextIO,
    clock: Clock,
    err: TextIO | None = None,
) -> int:
    """``models diff --symbol S --kind K V1 V2``: params, features, metrics, data window."""
    store = open_store(settings, clock)
    try:
        symbol = _require(symbol, "--symbol", "diff")
        kind = _require(kind, "--kind", "diff")
        _selection(settings, store, symbol, kind)
        check_version(store, symbol, kind, v1)
        check_version(store, symbol, kind, v2)
        changes = store.diff(symbol, kind, v1, v2)
        m1 = store.manifest(symbol, kind, v1)
        m2 = store.manifest(symbol, kind, v2)
        stages = store.stages(symbol, kind)
    except CommandError as exc:
        _say(_err(err), str(exc))
        return EXIT_INVALID
    except IntegrityError as exc:
        _say(_err(err), str(exc))
        return EXIT_FAILURE
    _say(
        out,
        f"{symbol}/{kind} {v1} ({stages.get(v1, '?')}) -> {v2} ({stages.get(v2, '?')})",
    )
    grouped: dict[str, list[str]] = {}
    for key, change in changes.items():
        line = _describe_change(key, change["old"], change["new"])
        grouped.setdefault(_group_of(key), []).append(line)
    f1, f2 = m1.get("files"), m2.get("files")
    if isinstance(f1, Mapping) and isinstance(f2, Mapping):
        differ = sorted(n for n in set(f1) | set(f2) if f1.get(n) != f2.get(n))
        if differ:
            grouped.setdefault("artifacts", []).append(
                f"{len(differ)} of {len(set(f1) | set(f2))} files differ: {', '.join(differ)}"
            )
        else:
            grouped.setdefault("artifacts", []).append("identical files (same SHA-256)")
    if not changes:
        _say(out, "no differences in configuration, features, metrics or data window")
    for name in [g for g, _ in _DIFF_GROUPS] + ["other", "artifacts"]:
        lines = grouped.get(name)
        if not lines:
            continue
        _say(out, f"{name}:")
        for line in lines:
            _say(out, f"  {line}")
    return EXIT_OK


# --------------------------------------------------------------------------- models verify


def models_verify(
    settings: Settings,
    symbol: str | None = None,
    kind: str | None = None,
    version: str | None = None,
    *,
    out: TextIO,
    clock: Clock,
    err: TextIO | None = None,
) -> int:
    """``models verify``: re-hash every artifact of the selection; 1 on any mismatch."""
    store = open_store(settings, clock)
    try:
        pairs = _selection(settings, store, symbol, kind)
        if version is not None:
            check_version_text(version, symbol, kind)
            if symbol is not None and kind is not None:
                check_version(store, symbol, kind, version)
    except CommandError as exc:
        _say(_err(err), str(exc))
        return EXIT_INVALID
    checked = bad = 0
    problems_total = 0
    for s, k in pairs:
        try:
            infos = store.versions(s, k)
            aliases = store.aliases(s, k)
        except IntegrityError as exc:
            _say(out, f"FAILED  {s}/{k}: {exc}")
            problems_total += 1
            continue
        live = {info.version for info in infos}
        for info in infos:
            if version is not None and info.version != version:
                continue
            checked += 1
            problems = store.verify(s, k, info.version)
            if problems:
                bad += 1
                problems_total += len(problems)
                _say(out, f"FAILED  {s}/{k} {info.version} ({info.stage})")
                for problem in problems:
                    _say(out, f"  - {problem}")
            else:
                files = info.manifest.get("files")
                n = len(files) if isinstance(files, Mapping) else 0
                _say(out, f"ok      {s}/{k} {info.version} ({info.stage}, {n} files)")
        if version is None:
            for role, named in aliases.items():
                if named is not None and named not in live:
                    problems_total += 1
                    _say(out, f"FAILED  {s}/{k}: alias {role} names {named}, which does not exist")
    if version is not None and checked == 0:
        _say(_err(err), f"no version {version} in the selection; see python main.py models list")
        return EXIT_INVALID
    if checked == 0 and problems_total == 0:
        _say(out, f"no models under {store.root} to verify")
        return EXIT_OK
    _say(
        out,
        f"{checked} version(s) verified: {checked - bad} ok, {bad} with problems"
        + (f" ({problems_total} problem(s))" if problems_total else ""),
    )
    return EXIT_FAILURE if problems_total else EXIT_OK


# --------------------------------------------------------------------------- models events


def _details(text: str | None, limit: int = 110) -> str:
    """``key=value`` pairs of an event's details, empty values left out."""
    if not text:
        return ""
    try:
        value = json.loads(text)
    except ValueError:
        return text[:limit]
    if not isinstance(value, dict):
        return _short(value, limit)
    parts = [
        f"{k}={v if isinstance(v, str) else _short(v, 60)}"
        for k, v in value.items()
        if v not in (None, False, "", [], {})
    ]
    line = " ".join(parts)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def models_events(
    settings: Settings,
    symbol: str | None = None,
    kind: str | None = None,
    limit: int = DEFAULT_EVENTS,
    *,
    out: TextIO,
    clock: Clock,
    err: TextIO | None = None,
    journal_path: Path | str | None = None,
) -> int:
    """``models events [--symbol S] [--kind K]``: the last ``limit`` rows of ``model_events``."""
    del clock  # the events carry their own times
    path = Path(journal_path or settings.storage.journal_path)
    if limit < 1:
        _say(_err(err), f"--limit must be at least 1 (got {limit})")
        return EXIT_INVALID
    if not path.exists():
        _say(
            _err(err),
            f"{path}: no journal here yet; the daemon (or a store-writing command) records "
            "model events there; set storage.journal_path if it lives elsewhere",
        )
        return EXIT_INVALID
    try:
        conn = Journal.open_reader(path)
    except JournalError as exc:
        _say(_err(err), str(exc))
        return EXIT_INVALID
    try:
        rows = conn.execute(
            "SELECT id, time, symbol, kind, version, event, details_json FROM model_events "
            "WHERE (? IS NULL OR symbol = ?) AND (? IS NULL OR kind = ?) "
            "ORDER BY id DESC LIMIT ?",
            (symbol, symbol, kind, kind, int(limit)),
        ).fetchall()
    except sqlite3.Error as exc:
        _say(_err(err), f"{path}: cannot read model_events ({exc})")
        return EXIT_FAILURE
    finally:
        conn.close()
    if not rows:
        what = "/".join(x for x in (symbol, kind) if x)
        _say(out, f"no model events{' for ' + what if what else ''} in {path} yet")
        return EXIT_OK
    table = [
        [
            str(r[0]),
            str(r[1]),
            r[2] or "-",
            r[3] or "-",
            r[4] or "-",
            r[5],
            _details(r[6]),
        ]
        for r in reversed(rows)
    ]
    _render_table(out, ("ID", "TIME", "SYMBOL", "KIND", "VERSION", "EVENT", "DETAILS"), table)
    return EXIT_OK


# --------------------------------------------------------------------------- store writes


def _arg(args: Mapping[str, Any], name: str, command: str) -> str:
    value = args.get(name)
    if not isinstance(value, str) or not value:
        raise CommandError(f"command {command!r} needs {name!r} (a non-empty string)")
    return value


def apply_store_command(store: ModelStore, command: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """Run ``promote``, ``rollback`` or ``delete`` on the store (it takes the lock itself)."""
    if command not in ("promote", "rollback", "delete"):
        raise CommandError(
            f"unknown command {command!r}; this version answers {', '.join(STORE_COMMANDS)}"
        )
    symbol = _arg(args, "symbol", command)
    kind = _arg(args, "kind", command)
    _check_name(store, symbol, kind)
    before = store.aliases(symbol, kind)
    result: dict[str, Any] = {"command": command, "symbol": symbol, "kind": kind}
    if command == "promote":
        version = _arg(args, "version", command)
        parse_version_or_fail(version)
        info = store.promote(symbol, kind, version)
        result.update(version=info.version, replaced=before["production"])
    elif command == "rollback":
        info = store.rollback(symbol, kind)
        result.update(version=info.version, rolled_back=before["production"])
    else:
        version = _arg(args, "version", command)
        parse_version_or_fail(version)
        store.delete(symbol, kind, version)
        result.update(version=version, deleted=True)
    result["aliases"] = store.aliases(symbol, kind)
    return result


def parse_version_or_fail(version: str) -> None:
    try:
        parse_version(version)
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def describe(result: Mapping[str, Any]) -> str:
    """One line for the operator from a store command's result dict."""
    command = result.get("command")
    label = f"{result.get('symbol')}/{result.get('kind')}"
    aliases = result.get("aliases")
    previous = aliases.get("previous") if isinstance(aliases, Mapping) else None
    version = result.get("version")
    if command == "promote":
        if result.get("replaced") == version:
            return f"{label} {version} was already production; nothing changed"
        return f"{label} {version} is production now (previous: {previous or 'none'})"
    if command == "rollback":
        return (
            f"{label} rolled back: production is {version} again; "
            f"{result.get('rolled_back') or 'the old production'} is rejected "
            f"(previous: {previous or 'none'})"
        )
    if command == "delete":
        return f"{label} {version} deleted"
    return json.dumps(dict(result), sort_keys=True, default=str)


def _precheck_write(
    settings: Settings, store: ModelStore, command: str, args: Mapping[str, Any]
) -> None:
    """Refuse an operator mistake before anything is queued or written."""
    symbol = _require(args.get("symbol"), "--symbol", command)
    kind = _require(args.get("kind"), "--kind", command)
    _selection(settings, store, symbol, kind)
    aliases = store.aliases(symbol, kind)
    if command in ("promote", "delete"):
        version = _require(args.get("version"), "--version", command)
        check_version(store, symbol, kind, version)
        if command == "delete":
            for role, named in aliases.items():
                if named == version:
                    fix = (
                        "promote another version or roll back first"
                        if role in ("production", "previous")
                        else "clear the shadow first"
                    )
                    raise CommandError(
                        f"{symbol}/{kind} {version} is the {role} alias and cannot be deleted; "
                        f"{fix}, then delete it"
                    )
    elif command == "rollback" and aliases["previous"] is None:
        raise CommandError(
            f"{symbol}/{kind} has no previous version to roll back to (production: "
            f"{aliases['production'] or 'none'}); promote a specific version instead: "
            f"python main.py models promote --symbol {symbol} --kind {kind} --version V"
        )


@contextlib.contextmanager
def _writer_journal(settings: Settings, clock: Clock) -> Iterator[Journal]:
    journal = Journal(
        settings.storage.journal_path, clock=clock, batch_max=settings.storage.journal_batch_max
    )
    journal.open()
    try:
        yield journal
    finally:
        journal.close()


def _exit_for_failure(error_type: str | None) -> int:
    return EXIT_INVALID if error_type in _INVALID_TYPES else EXIT_FAILURE


def _ask_daemon(
    settings: Settings,
    command: str,
    args: Mapping[str, Any],
    *,
    out: TextIO,
    err: TextIO,
    clock: Clock,
    timeout_s: float,
    poll_s: float,
    sleep: Callable[[float], None],
) -> CommandRow | int | None:
    """Queue and wait. The answered row, an exit code, or None: act directly after all."""
    journal_path = Path(settings.storage.journal_path)
    try:
        cid = enqueue(journal_path, command, args, now=clock.now())
        _say(
            out,
            f"the daemon is running: sent {command} as command {cid}, "
            f"waiting up to {timeout_s:g} s for its answer",
        )
        row = wait_for(journal_path, cid, timeout_s, clock, poll_s=poll_s, sleep=sleep)
        if row.finished:
            return row
        if not cancel(
            journal_path, cid, f"the CLI stopped waiting after {timeout_s:g} s", now=clock.now()
        ):
            _say(
                err,
                f"command {cid} is still running in the daemon after {timeout_s:g} s; "
                "its outcome will show in python main.py models events",
            )
            return EXIT_FAILURE
    except CommandQueueError as exc:
        _say(err, str(exc))
        return EXIT_FAILURE
    if daemon_alive(journal_path, clock.now()):
        _say(
            err,
            f"the daemon did not pick up command {cid} within {timeout_s:g} s (cancelled it); "
            "check it with python main.py status and try again",
        )
        return EXIT_FAILURE
    _say(out, f"the daemon stopped meanwhile (command {cid} cancelled); acting directly")
    return None


def _store_write(
    settings: Settings,
    command: str,
    args: dict[str, Any],
    *,
    out: TextIO,
    clock: Clock,
    err: TextIO | None,
    timeout_s: float,
    poll_s: float,
    sleep: Callable[[float], None],
) -> int:
    errs = _err(err)
    store = open_store(settings, clock)
    try:
        _precheck_write(settings, store, command, args)
    except CommandError as exc:
        _say(errs, str(exc))
        return EXIT_INVALID
    except IntegrityError as exc:
        _say(errs, str(exc))
        return EXIT_FAILURE
    if daemon_alive(settings.storage.journal_path, clock.now()):
        answer = _ask_daemon(
            settings,
            command,
            args,
            out=out,
            err=errs,
            clock=clock,
            timeout_s=timeout_s,
            poll_s=poll_s,
            sleep=sleep,
        )
        if isinstance(answer, int):
            return answer
        if answer is not None:
            if answer.status == "failed":
                _say(errs, f"the daemon refused command {answer.id}: {answer.error}")
                return _exit_for_failure(answer.error_type)
            _say(out, describe(answer.result or {}))
            if command in ("promote", "rollback"):
                _say(out, "the running daemon serves the new production model from its next bar")
            return EXIT_OK
    try:
        with _writer_journal(settings, clock) as journal:
            store = open_store(settings, clock, on_event=journal_hook(journal))
            result = apply_store_command(store, command, args)
    except JournalError as exc:
        _say(errs, str(exc))
        return EXIT_INVALID
    except (IntegrityError, StoreLockedError) as exc:
        _say(errs, str(exc))
        return EXIT_FAILURE
    except (CommandError, StoreError) as exc:
        _say(errs, str(exc).removeprefix("model store: "))
        return EXIT_INVALID
    _say(out, describe(result))
    return EXIT_OK


def models_promote(
    settings: Settings,
    symbol: str | None,
    kind: str | None,
    version: str | None,
    *,
    out: TextIO,
    clock: Clock,
    err: TextIO | None = None,
    timeout_s: float = COMMAND_TIMEOUT_S,
    poll_s: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """``models promote --symbol S --kind K --version V``."""
    args = {"symbol": symbol, "kind": kind, "version": version}
    return _store_write(
        settings, "promote", args, out=out, clock=clock, err=err,
        timeout_s=timeout_s, poll_s=poll_s, sleep=sleep,
    )  # fmt: skip


def models_rollback(
    settings: Settings,
    symbol: str | None,
    kind: str | None,
    *,
    out: TextIO,
    clock: Clock,
    err: TextIO | None = None,
    timeout_s: float = COMMAND_TIMEOUT_S,
    poll_s: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """``models rollback --symbol S --kind K``: production <- previous, atomically."""
    args = {"symbol": symbol, "kind": kind}
    return _store_write(
        settings, "rollback", args, out=out, clock=clock, err=err,
        timeout_s=timeout_s, poll_s=poll_s, sleep=sleep,
    )  # fmt: skip


def models_delete(
    settings: Settings,
    symbol: str | None,
    kind: str | None,
    version: str | None,
    *,
    out: TextIO,
    clock: Clock,
    err: TextIO | None = None,
    timeout_s: float = COMMAND_TIMEOUT_S,
    poll_s: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """``models delete --symbol S --kind K --version V`` (refused for an aliased version)."""
    args = {"symbol": symbol, "kind": kind, "version": version}
    return _store_write(
        settings, "delete", args, out=out, clock=clock, err=err,
        timeout_s=timeout_s, poll_s=poll_s, sleep=sleep,
    )  # fmt: skip


# --------------------------------------------------------------------------- train


def daemon_history_bars(settings: Settings) -> int:
    """Bars a fresh paper daemon holds as history before its replay starts (main.start_daemon)."""
    return max(
        settings.paper.history_bars,
        FeatureSpec().window,
        settings.models.initial_train_bars if settings.models.enabled_kinds else 0,
    )


def training_bars(source: FrameSource, n: int, until: datetime | None = None) -> BarColumns:
    """The first ``n`` bars of ``source``, or with ``until`` the last ``n`` bars at or before it."""
    import pandas as pd

    frames: list[pd.DataFrame] = []
    total = 0
    limit = None if until is None else pd.Timestamp(until).tz_convert("UTC")
    for frame in source():
        if limit is not None:
            keep = frame[frame["time"] <= limit]
            if len(keep):
                frames.append(keep)
                total += len(keep)
                while frames and total - len(frames[0]) >= n:
                    total -= len(frames.pop(0))
            if len(keep) < len(frame):
                break
        else:
            frames.append(frame)
            total += len(frame)
            if total >= n:
                break
    if not frames:
        raise CommandError(
            "no bars to train on"
            + (f" up to {iso_utc(until)} (the journal's last processed bar)" if until else "")
            + "; check paper.data"
        )
    bars = pd.concat(frames, ignore_index=True)
    bars = bars.iloc[:n] if until is None else bars.iloc[-n:]
    return BarColumns.from_frame(bars.reset_index(drop=True))


class _Progress:
    """A rich progress bar on a terminal, plain log lines otherwise."""

    def __init__(self, out: TextIO, total: int) -> None:
        self._out = out
        self._total = total
        self._done = 0
        self._rich: Any = None
        self._task: Any = None
        if _is_tty(out):
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self._rich = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(file=out),
            )
            self._rich.start()
            self._task = self._rich.add_task("training", total=total)

    def start(self, label: str) -> None:
        if self._rich is not None:
            self._rich.update(self._task, description=f"training {label}")
        else:
            _say(self._out, f"[{self._done + 1}/{self._total}] training {label} ...")

    def finish(self, line: str) -> None:
        self._done += 1
        if self._rich is not None:
            self._rich.console.print(line)
            self._rich.advance(self._task)
        else:
            _say(self._out, f"[{self._done}/{self._total}] {line}")

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()


def _last_run_error(journal: Journal) -> str:
    def op(conn: sqlite3.Connection) -> str:
        row = conn.execute("SELECT error FROM training_runs ORDER BY id DESC LIMIT 1").fetchone()
        return str(row[0]) if row and row[0] else "see python main.py status (last errors)"

    return journal.call(op)


def _train_direct(
    settings: Settings,
    symbols: list[str],
    kinds: list[str],
    *,
    out: TextIO,
    err: TextIO,
    clock: Clock,
    sources: Mapping[str, FrameSource] | None,
    backend: TrainingBackend | None,
) -> int:
    if settings.broker.kind != "paper" and sources is None:
        _say(
            err,
            f"broker.kind = {settings.broker.kind!r}: without a running daemon there is no "
            "history to train on; start the daemon (it fetches bars from the terminal and "
            "trains), then run python main.py train again",
        )
        return EXIT_INVALID
    if sources is None:
        from main import InvalidInput, _replay_sources

        try:
            sources = _replay_sources(settings)
        except InvalidInput as exc:
            _say(err, str(exc))
            return EXIT_INVALID
    from ml.model_manager import TRAINING_ORDER, ModelManager, TrainingRequest
    from ml.predictor_map import PredictorMap
    from ml.training import InlineBackend
    from strategy.baseline import MomentumBaseline

    journal_path = settings.storage.journal_path
    market = market_times(journal_path)
    columns: dict[str, BarColumns] = {}
    rows: dict[str, int] = {}
    for symbol in symbols:
        until = market.get(symbol) or (max(market.values()) if market else None)
        n = settings.models.train_bars
        if until is None:
            # A fresh daemon replays everything after its history: training on more would
            # let the models see bars the paper replay then trades.
            n = min(n, daemon_history_bars(settings))
        try:
            columns[symbol] = training_bars(sources[symbol], n, until)
        except (CommandError, ValueError, KeyError) as exc:
            _say(err, f"{symbol}: cannot read training bars: {exc}")
            return EXIT_INVALID
        rows[symbol] = n
        first = columns[symbol].time_ns[0] if len(columns[symbol]) else 0
        last = columns[symbol].time_ns[-1] if len(columns[symbol]) else 0
        _say(
            out,
            f"{symbol}: {len(columns[symbol])} bars "
            f"{_fmt_time(datetime.fromtimestamp(first / 1e9, UTC))} .. "
            f"{_fmt_time(datetime.fromtimestamp(last / 1e9, UTC))}"
            + (" (ending at the journal's last processed bar)" if until else ""),
        )
    ordered = [k for k in TRAINING_ORDER if k in kinds] + [
        k for k in kinds if k not in TRAINING_ORDER
    ]
    spec = FeatureSpec()
    failures = 0
    try:
        with (
            _writer_journal(settings, clock) as journal,
            tempfile.TemporaryDirectory(prefix="scalper-train-") as cache,
        ):
            store = open_store(settings, clock, on_event=journal_hook(journal))
            manager = ModelManager(
                settings=settings,
                store=store,
                backend=backend or InlineBackend(),
                predictors=PredictorMap(),
                journal=journal,
                clock=clock,
                feature_spec=spec,
                cache_dir=Path(cache),
                recent_rows=lambda _symbol: [],
                call_in_loop=lambda _fn: None,  # nothing serves here: the predictor is dropped
                baseline=lambda: MomentumBaseline(spec),
            )
            progress = _Progress(out, len(symbols) * len(ordered))
            try:
                for symbol in symbols:
                    request = TrainingRequest(
                        symbol, tuple(ordered), columns[symbol], "cli train", rows[symbol]
                    )
                    for kind in ordered:
                        label = f"{symbol} {kind}"
                        progress.start(label)
                        started = clock.monotonic()
                        result = manager.train_one(request, kind)
                        seconds = clock.monotonic() - started
                        if result is None:
                            failures += 1
                            progress.finish(f"{label}: FAILED: {_last_run_error(journal)}")
                            continue
                        info = result.info
                        # A kind's first version that passed the gates serves at once;
                        # any later one waits for the daemon's shadow trial or a promote.
                        if result.outcome.passed and store.resolve(symbol, kind) is None:
                            info = store.promote(symbol, kind, info.version)
                        progress.finish(_trained_line(store, label, info, seconds))
            finally:
                progress.close()
    except JournalError as exc:
        _say(err, str(exc))
        return EXIT_INVALID
    except StoreError as exc:
        _say(err, str(exc))
        return EXIT_FAILURE
    return EXIT_FAILURE if failures else EXIT_OK


def _trained_line(store: ModelStore, label: str, info: VersionInfo, seconds: float) -> str:
    holdout = _holdout(info.manifest)
    stage = store.stages(info.symbol, info.kind).get(info.version, info.stage)
    line = (
        f"{label}: {info.version} {stage} (holdout accuracy {_fmt_num(holdout.get('accuracy'))}"
        f", majority {_fmt_num(holdout.get('majority_rate'))}"
        f", log-loss {_fmt_num(holdout.get('log_loss'))}; {seconds:.1f} s)"
    )
    validation = info.manifest.get("metrics", {}).get("validation")
    if stage == "rejected" and isinstance(validation, dict):
        line += f"; rejected by the validation gates: {validation.get('reasons')}"
    elif stage != "production":
        production = store.aliases(info.symbol, info.kind)["production"]
        line += (
            f"; production stays {production}: promote it with python main.py models promote "
            f"--symbol {info.symbol} --kind {info.kind} --version {info.version}"
        )
    return line


def _max_training_run(journal_path: Path | str) -> int:
    try:
        conn = Journal.open_reader(journal_path)
    except JournalError:
        return 0
    try:
        row = conn.execute("SELECT COALESCE(max(id), 0) FROM training_runs").fetchone()
        return int(row[0])
    finally:
        conn.close()


def _wait_training(
    journal_path: Path | str,
    pairs: list[tuple[str, str]],
    after_id: int,
    *,
    out: TextIO,
    err: TextIO,
    clock: Clock,
    timeout_s: float,
    poll_s: float,
    sleep: Callable[[float], None],
) -> int:
    """Follow ``training_runs`` until each (symbol, kind) has a finished run after ``after_id``."""
    pending = set(pairs)
    failures = 0
    deadline = clock.monotonic() + timeout_s
    conn = Journal.open_reader(journal_path)
    try:
        while pending:
            rows = conn.execute(
                "SELECT id, symbol, kind, status, version, error FROM training_runs "
                "WHERE id > ? ORDER BY id",
                (after_id,),
            ).fetchall()
            for _rid, symbol, kind, status, version, error in rows:
                if (symbol, kind) not in pending or status not in _FINISHED_RUNS:
                    continue
                pending.discard((symbol, kind))
                if status == "done":
                    _say(out, f"{symbol} {kind}: trained version {version}")
                else:
                    failures += 1
                    _say(out, f"{symbol} {kind}: {status}: {error or 'no reason recorded'}")
            if not pending:
                break
            if clock.monotonic() >= deadline:
                left = ", ".join(f"{s} {k}" for s, k in sorted(pending))
                _say(err, f"still training after {timeout_s:g} s: {left}; see models events later")
                return EXIT_FAILURE
            sleep(poll_s)
    finally:
        conn.close()
    return EXIT_FAILURE if failures else EXIT_OK


def train(
    settings: Settings,
    symbol: str | None = None,
    kind: str | None = None,
    wait: bool = False,
    *,
    out: TextIO,
    clock: Clock,
    err: TextIO | None = None,
    sources: Mapping[str, FrameSource] | None = None,
    backend: TrainingBackend | None = None,
    timeout_s: float = COMMAND_TIMEOUT_S,
    train_timeout_s: float = TRAIN_TIMEOUT_S,
    poll_s: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """``train [--symbol S] [--kind K] [--wait]``: default every traded symbol, every enabled kind.

    With a running daemon: queued as a command (``--wait`` follows the training
    runs to the end). Without: trains here, one kind after the other, on the
    symbol's bars up to the journal's last processed bar (else the fresh
    daemon's history); a kind's first version is promoted to production, a
    retrain stays ``validated`` (promote it with ``models promote``).
    """
    errs = _err(err)
    try:
        symbols, kinds = train_selection(settings, symbol, kind)
    except CommandError as exc:
        _say(errs, str(exc))
        return EXIT_INVALID
    journal_path = Path(settings.storage.journal_path)
    if not daemon_alive(journal_path, clock.now()):
        return _train_direct(
            settings, symbols, kinds, out=out, err=errs, clock=clock,
            sources=sources, backend=backend,
        )  # fmt: skip
    after_id = _max_training_run(journal_path)
    args = {"symbol": symbol, "kind": kind}
    if not wait:
        try:
            cid = enqueue(journal_path, "train", args, now=clock.now())
        except CommandQueueError as exc:
            _say(errs, str(exc))
            return EXIT_FAILURE
        _say(
            out,
            f"queued as command {cid}: the running daemon trains "
            f"{', '.join(kinds)} for {', '.join(symbols)} in the background; follow it with "
            "python main.py models events (or train --wait)",
        )
        return EXIT_OK
    answer = _ask_daemon(
        settings, "train", args, out=out, err=errs, clock=clock,
        timeout_s=timeout_s, poll_s=poll_s, sleep=sleep,
    )  # fmt: skip
    if isinstance(answer, int):
        return answer
    if answer is None:
        return _train_direct(
            settings, symbols, kinds, out=out, err=errs, clock=clock,
            sources=sources, backend=backend,
        )  # fmt: skip
    if answer.status == "failed":
        _say(errs, f"the daemon refused command {answer.id}: {answer.error}")
        return _exit_for_failure(answer.error_type)
    queued = (answer.result or {}).get("queued") or []
    pairs = [(str(q["symbol"]), str(k)) for q in queued for k in q.get("kinds", [])]
    _say(out, f"the daemon queued {len(pairs)} training run(s); waiting for them")
    return _wait_training(
        journal_path, pairs, after_id, out=out, err=errs, clock=clock,
        timeout_s=train_timeout_s, poll_s=poll_s, sleep=sleep,
    )  # fmt: skip


# --------------------------------------------------------------------------- the daemon side


def handle_command(
    row: CommandRow,
    *,
    store: ModelStore,
    manager: CommandManager,
    settings: Settings,
    bars_for: Callable[[str], BarColumns],
) -> dict[str, Any]:
    """Answer one command in the daemon; the returned dict becomes ``result_json``.

    ``promote``/``rollback``/``delete`` run on the store (blocking: hashing under
    the store lock; call from a worker thread), then ``manager.reload`` makes the
    daemon serve the new production version from its next bar. ``train`` asks
    ``bars_for(symbol)`` for the recent bars and queues
    ``manager.request_training``; it returns at once. Raises ``CommandError``
    (unknown command, bad arguments) or ``StoreError``: the command fails with
    that message.
    """
    args = row.args
    if row.command in ("promote", "rollback", "delete"):
        result = apply_store_command(store, row.command, args)
        if row.command != "delete":
            symbol, kind = result["symbol"], result["kind"]
            try:
                manager.reload(symbol, kind)
            except Exception as exc:
                raise RuntimeError(
                    f"{symbol}/{kind} {result['version']} is production in the store, but the "
                    f"daemon could not load it ({type(exc).__name__}: {exc}); it keeps serving "
                    f"what it had. Roll back with python main.py models rollback --symbol "
                    f"{symbol} --kind {kind}"
                ) from exc
            result["serving_from_next_bar"] = True
        return result
    if row.command == "train":
        from ml.model_manager import TRAINING_ORDER

        symbol = args.get("symbol")
        kind = args.get("kind")
        if symbol is not None and not isinstance(symbol, str):
            raise CommandError(f"train: symbol must be a string or null (got {symbol!r})")
        if kind is not None and not isinstance(kind, str):
            raise CommandError(f"train: kind must be a string or null (got {kind!r})")
        symbols, kinds = train_selection(settings, symbol, kind)
        queued = []
        for s in symbols:
            cols = bars_for(s)
            if len(cols) == 0:
                raise CommandError(f"train: the daemon has no bars of {s} yet; try again later")
            ordered = [k for k in TRAINING_ORDER if k in kinds]
            manager.request_training(
                s, ordered, cols, reason=f"command {row.id}", rows=settings.models.train_bars
            )
            queued.append({"symbol": s, "kinds": ordered, "bars": len(cols)})
        return {"command": "train", "queued": queued}
    raise CommandError(
        f"unknown command {row.command!r}; this daemon answers {', '.join(STORE_COMMANDS)}"
    )


def make_command_handler(
    *,
    store: ModelStore,
    manager: CommandManager,
    settings: Settings,
    bars_for: Callable[[str], BarColumns],
) -> Callable[[CommandRow], Awaitable[dict[str, Any]]]:
    """The async handler for ``utils.commands.poll_commands`` / ``serve_commands``.

    Store commands run in a worker thread (``asyncio.to_thread``): hashing and
    loading the new model never block the loop. ``train`` runs on the loop
    itself, so ``bars_for`` is called on the loop thread (it may read loop-owned
    state) and only queues the work.
    """

    async def handler(row: CommandRow) -> dict[str, Any]:
        def call() -> dict[str, Any]:
            return handle_command(
                row, store=store, manager=manager, settings=settings, bars_for=bars_for
            )

        if row.command == "train":
            return call()
        return await asyncio.to_thread(call)

    return handler


# --------------------------------------------------------------------------- argparse


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``train`` and ``models ...`` subcommands (optional helper for ``main.build_parser``)."""
    train_p = sub.add_parser("train", help="train models (queued to a running daemon)")
    train_p.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="settings file")
    train_p.add_argument("--symbol", default=None, help="one traded symbol (default: all)")
    train_p.add_argument("--kind", default=None, help="one model kind (default: every enabled)")
    train_p.add_argument(
        "--wait", action="store_true", help="with a running daemon: wait for the training"
    )
    models = sub.add_parser("models", help="list, inspect and manage stored model versions")
    models.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="settings file")
    msub = models.add_subparsers(dest="models_command", required=True)
    for name, text in (
        ("list", "versions, stages, ages and holdout metrics"),
        ("show", "one version's manifest, stage, aliases and verification"),
        ("verify", "re-hash every artifact; exit 1 on a mismatch"),
        ("promote", "make a version production"),
        ("rollback", "production <- previous"),
        ("delete", "delete a version that no alias names"),
        ("events", "the last model events from the journal"),
        ("diff", "what changed between two versions"),
    ):
        p = msub.add_parser(name, help=text)
        p.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="settings file")
        p.add_argument("--symbol", default=None)
        p.add_argument("--kind", default=None)
        if name in ("show", "verify", "promote", "delete"):
            p.add_argument("--version", default=None)
        if name == "events":
            p.add_argument("--limit", type=int, default=DEFAULT_EVENTS)
        if name == "diff":
            p.add_argument("v1", metavar="V1")
            p.add_argument("v2", metavar="V2")


def run(settings: Settings, args: argparse.Namespace, *, out: TextIO, clock: Clock) -> int:
    """Dispatch a parsed ``train`` / ``models ...`` command line (see :func:`add_parsers`)."""
    if args.command == "train":
        return train(settings, args.symbol, args.kind, args.wait, out=out, clock=clock)
    sub = args.models_command
    s, k = args.symbol, args.kind
    if sub == "list":
        return models_list(settings, s, k, out=out, clock=clock)
    if sub == "show":
        return models_show(settings, s, k, args.version, out=out, clock=clock)
    if sub == "diff":
        return models_diff(settings, s, k, args.v1, args.v2, out=out, clock=clock)
    if sub == "verify":
        return models_verify(settings, s, k, args.version, out=out, clock=clock)
    if sub == "events":
        return models_events(settings, s, k, args.limit, out=out, clock=clock)
    if sub == "promote":
        return models_promote(settings, s, k, args.version, out=out, clock=clock)
    if sub == "rollback":
        return models_rollback(settings, s, k, out=out, clock=clock)
    if sub == "delete":
        return models_delete(settings, s, k, args.version, out=out, clock=clock)
    raise ValueError(f"unknown models command {sub!r}")
