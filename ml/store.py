"""The versioned model store: immutable, hashed artifact directories that survive crashes.

Layout (one directory per symbol and model kind)::

    <root>/<SYMBOL>/<kind>/
      1.0.0/         files written by the model kind + manifest.json (SHA-256 of every file)
      aliases.json   {"production": "1.0.1", "previous": "1.0.0", "shadow": null}
      stages.json    {"1.0.0": "previous", "1.0.1": "production", "1.0.2": "rejected"}
      .lock          OS-level lock (``filelock``) every writer holds; it dies with its process

Only the standard library and ``filelock`` are imported here: the serving process,
the CLI and crash-test children use this module without numpy, torch or sklearn.

**Crash consistency.** A version appears by one ``os.replace`` of a fully written
and fsynced ``.tmp-<uuid>/`` draft, so a version directory is either complete or
absent. ``aliases.json`` is the single source of truth for ``production``,
``previous`` and ``shadow``; ``stages.json`` holds every other stage and mirrors
the aliases for readability. The *effective* stage of a version is its alias if
an alias names it, else its ``stages.json`` entry (``draft`` when it has none, which
is what a crash between a commit's rename and its stages write leaves). Moving an
alias writes three files, each atomically:

1. ``stages.json`` with the resting stage (``archived``, ``rejected``) of every
   version about to lose its alias. Those versions are still aliased in the old
   ``aliases.json``, so the effective stages do not change yet.
2. ``aliases.json``: the commit point.
3. ``stages.json`` again, mirroring the new aliases.

A crash before 2 leaves the old state, a crash after 2 the new one, exactly, with
no repair needed to read it. :meth:`ModelStore.repair` (run for every symbol and
kind by :meth:`ModelStore.cleanup_leftovers` at start-up) rewrites ``stages.json``
to the effective stages and turns entries of deleted versions into tombstones.

**Version numbers are never reused.** ``delete`` renames the version directory
away first, then records a ``"deleted"`` tombstone in ``stages.json``; the next
version number is above every live version and every tombstone. Tombstones below
the newest live version carry no information and are dropped.

**Events.** Every registration, stage or alias change, deletion and integrity
failure is a :class:`StoreEvent` passed to ``on_event`` (the daemon journals them
as ``model_events``; a registry mirror such as MLflow can subscribe the same way).
Events are emitted after the store lock is released; an exception raised by the
hook is logged and never breaks the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol

import filelock

from utils.clock import Clock, iso_utc, parse_iso_utc
from utils.paths import mkdir_private

log = logging.getLogger(__name__)

JSONDict = dict[str, Any]

MANIFEST_VERSION: Final = 1
MANIFEST_NAME: Final = "manifest.json"
ALIASES_NAME: Final = "aliases.json"
STAGES_NAME: Final = "stages.json"
LOCK_NAME: Final = ".lock"
DRAFT_PREFIX: Final = ".tmp-"
TMP_SUFFIX: Final = ".tmp"

STAGES: Final = ("draft", "validated", "shadow", "production", "previous", "archived", "rejected")
ALIASES: Final = ("production", "previous", "shadow")
BUMPS: Final = ("major", "minor", "patch")
EVENTS: Final = (
    "registered",
    "stage_changed",
    "promoted",
    "rolled_back",
    "deleted",
    "retention_deleted",
    "integrity_failed",
    "fallback",
    "leftover_removed",
)
# Stage a version gets when rollback takes the production alias away from it: it
# misbehaved live, so it must not come back as anyone's "previous".
ROLLED_BACK_STAGE: Final = "rejected"
# Stage of a version that loses the previous or shadow alias.
RETIRED_STAGE: Final = "archived"
_TOMBSTONE: Final = "deleted"
# Fields the store writes into every manifest; a caller may not set them.
RESERVED_MANIFEST_KEYS: Final = frozenset(
    {"symbol", "kind", "version", "parent_version", "created", "files", "manifest_version", "stage"}
)
# Manifest fields that differ between any two versions and say nothing about what changed.
_DIFF_SKIP: Final = frozenset({"version", "parent_version", "created", "files"})

_VERSION_RE: Final = re.compile(r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)$")
# Symbols and kinds become directory names on Linux and Windows alike.
_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_#$@+-][A-Za-z0-9_.#$@+-]{0,63}$")
_CHUNK: Final = 1 << 20
_REPLACE_RETRIES: Final = 20
_REPLACE_RETRY_S: Final = 0.05


# --------------------------------------------------------------------------- crash points
# Tests kill a child process at a named step inside a save: STORE_CRASH_AT="<step>:<n>"
# kills the process (SIGKILL; os._exit on Windows) the n-th time the step is reached.
# The variable is read once at import; unset, a crash point costs one comparison.

CRASH_ENV: Final = "STORE_CRASH_AT"
CRASH_POINTS: Final = (
    "commit.file_fsynced",  # after hashing and fsyncing each draft file
    "commit.manifest_written",  # manifest.json written, not yet fsynced
    "commit.manifest_fsynced",
    "commit.draft_fsynced",  # draft directory fsynced, not yet renamed
    "commit.renamed",  # version directory in place, parent not yet fsynced
    "commit.parent_fsynced",  # before stages.json gets the "draft" entry
    "json.tmp_written",  # <name>.tmp written, not yet fsynced
    "json.tmp_fsynced",  # before os.replace
    "json.replaced",  # after os.replace, directory not yet fsynced
    "json.dir_fsynced",
    "alias.stages_pre_written",  # resting stages written, aliases.json not yet
    "alias.aliases_written",  # between aliases.json and the final stages.json
    "alias.stages_written",
    "delete.renamed",  # version directory moved to .tmp-del-*, stages not yet updated
    "delete.stages_written",  # tombstone written, directory not yet removed
)


def _parse_crash_spec(text: str | None) -> tuple[str, int] | None:
    if not text:
        return None
    step, sep, count = text.rpartition(":")
    if not sep or not step or not count.isdigit() or int(count) < 1:
        raise ValueError(f"{CRASH_ENV}={text!r}: expected <step>:<n> with n >= 1")
    return step, int(count)


_CRASH_SPEC: Final = _parse_crash_spec(os.environ.get(CRASH_ENV))
_crash_hits: dict[str, int] = {}


def _crash_point(name: str) -> None:
    """Kill this process here if ``STORE_CRASH_AT`` names this step and count (tests only)."""
    if _CRASH_SPEC is None or _CRASH_SPEC[0] != name:
        return
    _crash_hits[name] = _crash_hits.get(name, 0) + 1
    if _crash_hits[name] >= _CRASH_SPEC[1]:
        if sys.platform == "win32":
            os._exit(137)
        else:
            os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------- values


class StoreError(Exception):
    """A store request that cannot be honoured (unknown version, aliased version, ...)."""


class IntegrityError(StoreError):
    """An artifact on disk does not match its manifest, or a store file is unreadable."""


class StoreLockedError(StoreError):
    """Another process (or thread) holds the lock of this symbol and kind."""


@dataclass(frozen=True)
class StoreEvent:
    time: datetime
    symbol: str
    kind: str
    version: str | None
    event: str
    details: JSONDict = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class VersionInfo:
    symbol: str
    kind: str
    version: str
    path: Path
    stage: str
    created: datetime
    manifest: JSONDict = field(default_factory=dict, hash=False)


# --------------------------------------------------------------------------- versions


def parse_version(text: str) -> tuple[int, int, int]:
    """``"1.10.0"`` -> ``(1, 10, 0)``; tuples order numerically (1.10.0 > 1.9.0)."""
    match = _VERSION_RE.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r} is not a semantic version MAJOR.MINOR.PATCH")
    return int(match[1]), int(match[2]), int(match[3])


def format_version(parts: tuple[int, int, int]) -> str:
    return f"{parts[0]}.{parts[1]}.{parts[2]}"


def is_version(text: str) -> bool:
    return isinstance(text, str) and _VERSION_RE.match(text) is not None


def bump_version(version: str | None, part: str) -> str:
    """The next version after ``version`` (``None``: the first, 1.0.0)."""
    if part not in BUMPS:
        raise ValueError(f"bump must be one of {', '.join(BUMPS)} (got {part!r})")
    if version is None:
        return "1.0.0"
    major, minor, patch = parse_version(version)
    if part == "major":
        return format_version((major + 1, 0, 0))
    if part == "minor":
        return format_version((major, minor + 1, 0))
    return format_version((major, minor, patch + 1))


def decide_bump(previous: Mapping[str, Any] | None, new: Mapping[str, Any]) -> str:
    """MAJOR if ``feature_hash`` or ``architecture`` changed, MINOR for ``hyperparams``, else PATCH.

    With no readable previous manifest nothing can be compared, so MAJOR.
    """
    if previous is None:
        return "major"
    if any(previous.get(key) != new.get(key) for key in ("feature_hash", "architecture")):
        return "major"
    if previous.get("hyperparams") != new.get("hyperparams"):
        return "minor"
    return "patch"


def _version_key(version: str) -> tuple[int, int, int]:
    return parse_version(version)


# --------------------------------------------------------------------------- file helpers


def _check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or _NAME_RE.match(value) is None:
        raise StoreError(
            f"model store: {what} {value!r} is not a valid name "
            "(letters, digits and _ # $ @ + - ., at most 64 characters, not starting with '.')"
        )
    return value


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (a no-op on Windows, which cannot)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(src: Path, dst: Path) -> None:
    """``os.replace``, retried briefly on Windows where a reader's open handle blocks it."""
    for attempt in range(_REPLACE_RETRIES):
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if os.name != "nt" or attempt == _REPLACE_RETRIES - 1:
                raise
            # A real sleep, not the Clock's: this waits for another process's file handle.
            time.sleep(_REPLACE_RETRY_S)


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return iso_utc(value)
    if isinstance(value, Path):
        return value.as_posix()
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _dumps(obj: object, *, sort_keys: bool = True) -> bytes:
    # allow_nan=False: NaN is not JSON, and a registry mirror would choke on it.
    text = json.dumps(obj, indent=2, sort_keys=sort_keys, allow_nan=False, default=_json_default)
    return (text + "\n").encode("utf-8")


def _write_json(path: Path, obj: object) -> None:
    """Replace ``path`` atomically: ``<name>.tmp`` beside it, fsync, ``os.replace``, fsync dir.

    Keys keep the caller's order (stages in version order, aliases in ALIASES order).
    """
    data = _dumps(obj, sort_keys=False)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            _crash_point("json.tmp_written")
            os.fsync(handle.fileno())
        _crash_point("json.tmp_fsynced")
        _replace(tmp, path)
    except OSError:
        # Disk full or an I/O error: the old file stays in force; leave no half copy.
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _crash_point("json.replaced")
    _fsync_dir(path.parent)
    _crash_point("json.dir_fsynced")


def _read_json_object(path: Path) -> JSONDict | None:
    """The JSON object in ``path``; None when the file does not exist."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise IntegrityError(f"{path}: cannot be read ({exc})") from exc
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise IntegrityError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise IntegrityError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _sha256_file(path: Path, *, fsync: bool = False) -> str:
    digest = hashlib.sha256()
    # r+b so that fsync works on Windows too (it needs a handle opened for writing).
    with open(path, "r+b" if fsync else "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
        if fsync:
            os.fsync(handle.fileno())
    return digest.hexdigest()


def _safe_relative(name: object) -> bool:
    """A manifest file name must stay inside its version directory."""
    if not isinstance(name, str) or not name or "\\" in name:
        return False
    parts = name.split("/")
    return (
        not name.startswith("/")
        and all(p not in ("", ".", "..") for p in parts)
        and ":" not in name
    )


def _files_in(directory: Path) -> list[str]:
    """Every regular file under ``directory`` as a POSIX relative path, sorted."""
    return sorted(
        path.relative_to(directory).as_posix()
        for path in directory.rglob("*")
        if path.is_symlink() or path.is_file()
    )


def _subdirs_deepest_first(top: Path, names: list[str]) -> list[Path]:
    """``top`` and every directory between it and the files, deepest first (fsync order)."""
    dirs = {top}
    for name in names:
        dirs.update(p for p in (top / name).parents if p.is_relative_to(top))
    return sorted(dirs, key=lambda p: len(p.parts), reverse=True)


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


# --------------------------------------------------------------------------- the store


@dataclass(frozen=True)
class _KindState:
    aliases: dict[str, str | None]
    raw_stages: dict[str, str]
    live: list[str]  # version directories present, oldest first

    def stage_of(self, version: str) -> str:
        return _effective_stage(version, self.aliases, self.raw_stages)


def _effective_stage(
    version: str, aliases: Mapping[str, str | None], raw: Mapping[str, str]
) -> str:
    for role in ALIASES:
        if aliases.get(role) == version:
            return role
    stage = raw.get(version)
    if stage is None:
        return "draft"  # committed, crash before its stages entry was written
    if stage in ALIASES or stage not in STAGES:
        return RETIRED_STAGE  # an alias stage no alias backs up (an edited file)
    return stage


class ModelStore:
    """Immutable versioned artifacts under ``root``; see the module docstring for the rules."""

    def __init__(
        self,
        root: Path,
        *,
        clock: Clock,
        retention: int = 5,
        on_event: Callable[[StoreEvent], None] | None = None,
        lock_timeout_s: float = 30.0,
    ) -> None:
        if retention < 1:
            raise ValueError(f"model store: retention must be >= 1 (got {retention})")
        self._root = Path(root)
        self._clock = clock
        self._retention = retention
        self._on_event = on_event
        self._lock_timeout_s = lock_timeout_s
        self._drafts: dict[Path, filelock.BaseFileLock] = {}
        self._drafts_guard = threading.Lock()

    # ------------------------------------------------------------------ layout and locking

    @property
    def root(self) -> Path:
        return self._root

    @property
    def retention(self) -> int:
        return self._retention

    def kind_dir(self, symbol: str, kind: str) -> Path:
        return self._root / _check_name(symbol, "symbol") / _check_name(kind, "kind")

    def lock_path(self, symbol: str, kind: str) -> Path:
        return self.kind_dir(symbol, kind) / LOCK_NAME

    @contextlib.contextmanager
    def lock(self, symbol: str, kind: str, timeout_s: float | None = None) -> Iterator[None]:
        """Hold the OS-level writer lock of (symbol, kind); it dies with this process.

        Reentrant within a thread; other threads and processes wait up to
        ``timeout_s`` (default: the store's ``lock_timeout_s``), then
        :class:`StoreLockedError`.
        """
        kdir = self.kind_dir(symbol, kind)
        mkdir_private(kdir)
        # is_singleton: one lock object per path in this process, so nested use by
        # two store objects in one thread is reentrant instead of a self-deadlock.
        file_lock = filelock.FileLock(kdir / LOCK_NAME, is_singleton=True)
        wait_s = self._lock_timeout_s if timeout_s is None else timeout_s
        try:
            file_lock.acquire(timeout=wait_s)
        except filelock.Timeout as exc:
            raise StoreLockedError(
                f"model store {symbol}/{kind} is locked by another writer ({kdir / LOCK_NAME}); "
                f"waited {wait_s:g} s"
            ) from exc
        try:
            yield
        finally:
            file_lock.release()

    # ------------------------------------------------------------------ events

    def _event(
        self, symbol: str, kind: str, version: str | None, event: str, **details: Any
    ) -> StoreEvent:
        return StoreEvent(self._clock.now(), symbol, kind, version, event, dict(details))

    def _emit(self, events: list[StoreEvent]) -> None:
        for ev in events:
            log.info(
                "model store event %s %s/%s %s %s",
                ev.event,
                ev.symbol,
                ev.kind,
                ev.version,
                ev.details,
            )
            if self._on_event is None:
                continue
            try:
                self._on_event(ev)
            except Exception:
                log.exception("model store: on_event hook failed for %s (ignored)", ev.event)

    # ------------------------------------------------------------------ reading state

    def _read_aliases(self, kdir: Path) -> dict[str, str | None]:
        path = kdir / ALIASES_NAME
        obj = _read_json_object(path)
        aliases: dict[str, str | None] = dict.fromkeys(ALIASES)
        if obj is None:
            return aliases
        for role in ALIASES:
            value = obj.get(role)
            if value is not None and not is_version(value):
                raise IntegrityError(f"{path}: {role} = {value!r} is not a version")
            aliases[role] = value
        named = [v for v in aliases.values() if v is not None]
        if len(named) != len(set(named)):
            raise IntegrityError(f"{path}: one version holds two aliases ({aliases})")
        return aliases

    def _read_raw_stages(self, kdir: Path) -> dict[str, str]:
        path = kdir / STAGES_NAME
        obj = _read_json_object(path)
        if obj is None:
            return {}
        for version, stage in obj.items():
            if not is_version(version) or stage not in (*STAGES, _TOMBSTONE):
                raise IntegrityError(f"{path}: bad entry {version!r}: {stage!r}")
        return dict(obj)

    @staticmethod
    def _live_versions(kdir: Path) -> list[str]:
        try:
            entries = list(kdir.iterdir())
        except FileNotFoundError:
            return []
        found = [p.name for p in entries if is_version(p.name) and p.is_dir()]
        return sorted(found, key=_version_key)

    def _state(self, kdir: Path) -> _KindState:
        """A consistent snapshot without the lock.

        stages.json is read before and after aliases.json: when it did not change
        in between, the pair is one that the three-write protocol makes consistent.
        """
        for _ in range(5):
            before = self._read_raw_stages(kdir)
            aliases = self._read_aliases(kdir)
            live = self._live_versions(kdir)
            after = self._read_raw_stages(kdir)
            if before == after:
                return _KindState(aliases, after, live)
        return _KindState(self._read_aliases(kdir), self._read_raw_stages(kdir), live)

    def _locked_state(self, kdir: Path) -> _KindState:
        """The state while holding the lock (no writer can interleave)."""
        return _KindState(
            self._read_aliases(kdir), self._read_raw_stages(kdir), self._live_versions(kdir)
        )

    def _info(
        self, symbol: str, kind: str, kdir: Path, version: str, stage: str
    ) -> VersionInfo | None:
        vdir = kdir / version
        try:
            manifest = _read_json_object(vdir / MANIFEST_NAME) or {}
        except IntegrityError:
            manifest = {}
        created: datetime | None = None
        if isinstance(manifest.get("created"), str):
            with contextlib.suppress(ValueError):
                created = parse_iso_utc(manifest["created"])
        if created is None:
            try:
                created = datetime.fromtimestamp(vdir.stat().st_mtime, UTC)
            except FileNotFoundError:
                return None  # deleted while we looked
        return VersionInfo(symbol, kind, version, vdir, stage, created, manifest)

    def versions(self, symbol: str, kind: str) -> list[VersionInfo]:
        """Every version directory of (symbol, kind), oldest first, with its effective stage."""
        kdir = self.kind_dir(symbol, kind)
        state = self._state(kdir)
        infos = (self._info(symbol, kind, kdir, v, state.stage_of(v)) for v in state.live)
        return [info for info in infos if info is not None]

    def version_info(self, symbol: str, kind: str, version: str) -> VersionInfo:
        kdir = self.kind_dir(symbol, kind)
        parse_version(version)
        state = self._state(kdir)
        info = None
        if version in state.live:
            info = self._info(symbol, kind, kdir, version, state.stage_of(version))
        if info is None:
            raise StoreError(f"model store: {symbol}/{kind} has no version {version}")
        return info

    def symbols_kinds(self) -> list[tuple[str, str]]:
        pairs: list[tuple[str, str]] = []
        if not self._root.is_dir():
            return pairs
        for sym in sorted(self._root.iterdir()):
            if not sym.is_dir() or _NAME_RE.match(sym.name) is None:
                continue
            for kdir in sorted(sym.iterdir()):
                if (
                    kdir.is_dir()
                    and _NAME_RE.match(kdir.name) is not None
                    and not is_version(kdir.name)
                ):
                    pairs.append((sym.name, kdir.name))
        return pairs

    def manifest(self, symbol: str, kind: str, version: str) -> JSONDict:
        parse_version(version)
        vdir = self.kind_dir(symbol, kind) / version
        if not vdir.is_dir():
            raise StoreError(f"model store: {symbol}/{kind} has no version {version}")
        obj = _read_json_object(vdir / MANIFEST_NAME)
        if obj is None:
            raise IntegrityError(f"{vdir / MANIFEST_NAME}: missing")
        return obj

    def aliases(self, symbol: str, kind: str) -> dict[str, str | None]:
        """``{"production": ..., "previous": ..., "shadow": ...}`` (None where unset)."""
        return self._read_aliases(self.kind_dir(symbol, kind))

    def stages(self, symbol: str, kind: str) -> dict[str, str]:
        """Effective stage of every live version."""
        state = self._state(self.kind_dir(symbol, kind))
        return {v: state.stage_of(v) for v in state.live}

    # ------------------------------------------------------------------ verification

    def _verify_dir(self, symbol: str, kind: str, version: str, vdir: Path) -> list[str]:
        return self._check_version(symbol, kind, version, vdir)[0]

    def _check_version(
        self, symbol: str, kind: str, version: str, vdir: Path
    ) -> tuple[list[str], JSONDict]:
        """(problems, the manifest they were checked against); no problems = verified."""
        label = f"{symbol}/{kind} {version}"
        if not vdir.is_dir():
            return [f"{label}: version directory {vdir} is missing"], {}
        mpath = vdir / MANIFEST_NAME
        try:
            manifest = _read_json_object(mpath)
        except IntegrityError as exc:
            return [f"{label}: {exc}"], {}
        if manifest is None:
            return [f"{label}: {mpath} is missing"], {}
        problems: list[str] = []
        mv = manifest.get("manifest_version")
        if mv != MANIFEST_VERSION:
            problem = (
                f"{label}: {mpath}: unknown manifest_version {mv!r} "
                f"(this store reads {MANIFEST_VERSION})"
            )
            return [problem], manifest
        for key, expected in (("symbol", symbol), ("kind", kind), ("version", version)):
            if manifest.get(key) != expected:
                problems.append(
                    f"{label}: {mpath}: {key} is {manifest.get(key)!r}, expected {expected!r}"
                )
        try:
            parse_iso_utc(manifest["created"])
        except (KeyError, TypeError, ValueError, AttributeError):
            problems.append(f"{label}: {mpath}: 'created' is not an ISO-8601 UTC time")
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            problems.append(f"{label}: {mpath}: 'files' must map file names to SHA-256 hashes")
            return problems, manifest
        for name, expected_hash in sorted(files.items()):
            if not _safe_relative(name) or name == MANIFEST_NAME:
                problems.append(f"{label}: {mpath}: file name {name!r} is not allowed")
                continue
            path = vdir / name
            if path.is_symlink() or not path.is_file():
                problems.append(
                    f"{label}: {path} is missing"
                    if not path.is_symlink()
                    else f"{label}: {path} is a symlink"
                )
                continue
            try:
                actual = _sha256_file(path)
            except OSError as exc:
                problems.append(f"{label}: {path} cannot be read ({exc})")
                continue
            if actual != expected_hash:
                problems.append(
                    f"{label}: {path}: SHA-256 mismatch (manifest {str(expected_hash)[:12]}..., "
                    f"file {actual[:12]}...)"
                )
        for name in _files_in(vdir):
            if name != MANIFEST_NAME and name not in files:
                problems.append(
                    f"{label}: {vdir / name} is not listed in the manifest (extra file)"
                )
        return problems, manifest

    def verify(self, symbol: str, kind: str, version: str | None = None) -> list[str]:
        """Problems found (empty = OK): re-hash every file against the manifest.

        With ``version=None`` every version is checked, and aliases that name a
        missing version are reported too.
        """
        kdir = self.kind_dir(symbol, kind)
        if version is not None:
            parse_version(version)
            return self._verify_dir(symbol, kind, version, kdir / version)
        problems: list[str] = []
        try:
            state = self._state(kdir)
        except IntegrityError as exc:
            return [str(exc)]
        for v in state.live:
            problems.extend(self._verify_dir(symbol, kind, v, kdir / v))
        for role, named in state.aliases.items():
            if named is not None and named not in state.live:
                problems.append(
                    f"{symbol}/{kind}: alias {role} names {named}, which does not exist"
                )
        return problems

    def read_file(self, info: VersionInfo, name: str) -> bytes:
        """The bytes of one artifact file, refused unless they hash to the manifest's SHA-256.

        Loading from these bytes (e.g. an ONNX session from bytes) closes the gap
        between verifying a file and reading it.
        """
        files = info.manifest.get("files")
        if not isinstance(files, dict) or name not in files or not _safe_relative(name):
            raise IntegrityError(f"{info.path / name}: not listed in {info.path / MANIFEST_NAME}")
        path = info.path / name
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise IntegrityError(f"{path}: cannot be read ({exc})") from exc
        if hashlib.sha256(data).hexdigest() != files[name]:
            raise IntegrityError(
                f"{path}: SHA-256 does not match the manifest (tampered or truncated)"
            )
        return data

    def resolve(self, symbol: str, kind: str, alias: str = "production") -> VersionInfo | None:
        """The version ``alias`` names, only if it verifies.

        A production version that fails verification is reported
        ("integrity_failed") and the previous version is used instead
        ("fallback"), if it verifies; otherwise None. Aliases are not moved:
        deciding to roll back is the caller's business. Re-hashes every file, so
        call it when loading, not per bar.
        """
        if alias not in ALIASES:
            raise StoreError(f"model store: unknown alias {alias!r} (one of {', '.join(ALIASES)})")
        kdir = self.kind_dir(symbol, kind)
        events: list[StoreEvent] = []
        try:
            result = self._resolve(symbol, kind, kdir, alias, events)
        finally:
            self._emit(events)
        return result

    def _resolve(
        self, symbol: str, kind: str, kdir: Path, alias: str, events: list[StoreEvent]
    ) -> VersionInfo | None:
        for _ in range(3):
            # Only aliases.json matters here: a damaged stages.json must not stop trading.
            try:
                aliases = self._read_aliases(kdir)
            except IntegrityError as exc:
                events.append(
                    self._event(
                        symbol, kind, None, "integrity_failed", alias=alias, problems=[str(exc)]
                    )
                )
                return None
            version = aliases[alias]
            if version is None:
                return None
            problems, manifest = self._check_version(symbol, kind, version, kdir / version)
            if not problems:
                return _verified_info(symbol, kind, kdir / version, alias, manifest)
            # An alias that moved while we hashed (a concurrent promote, then retention)
            # is not an integrity failure: look again.
            try:
                if self._read_aliases(kdir) != aliases:
                    continue
            except IntegrityError:
                pass
            events.append(
                self._event(
                    symbol, kind, version, "integrity_failed", alias=alias, problems=problems
                )
            )
            log.warning(
                "model store: %s/%s %s %s refused: %s", symbol, kind, alias, version, problems
            )
            if alias != "production":
                return None
            fallback = aliases["previous"]
            if fallback is None:
                return None
            fb_problems, fb_manifest = self._check_version(symbol, kind, fallback, kdir / fallback)
            if fb_problems:
                events.append(
                    self._event(
                        symbol,
                        kind,
                        fallback,
                        "integrity_failed",
                        alias="previous",
                        problems=fb_problems,
                    )
                )
                return None
            events.append(
                self._event(
                    symbol,
                    kind,
                    fallback,
                    "fallback",
                    alias=alias,
                    refused=version,
                    reason=problems,
                )
            )
            return _verified_info(symbol, kind, kdir / fallback, "previous", fb_manifest)
        return None

    # ------------------------------------------------------------------ ages and diffs

    @staticmethod
    def trained_at(info: VersionInfo) -> datetime:
        """The manifest's ``trained`` time when present and readable, else ``created``."""
        trained = info.manifest.get("trained")
        if isinstance(trained, str):
            with contextlib.suppress(ValueError):
                return parse_iso_utc(trained)
        return info.created

    @staticmethod
    def age_s(info: VersionInfo, now: datetime) -> float:
        return (now - ModelStore.trained_at(info)).total_seconds()

    def is_stale(self, symbol: str, kind: str, now: datetime, max_model_age_s: float) -> bool:
        """True when there is no production version or it is older than ``max_model_age_s``."""
        kdir = self.kind_dir(symbol, kind)
        try:
            production = self._read_aliases(kdir)["production"]
        except IntegrityError:
            return True
        if production is None:
            return True
        info = self._info(symbol, kind, kdir, production, "production")
        if info is None or not info.manifest:
            return True
        return self.age_s(info, now) > max_model_age_s

    def diff(self, symbol: str, kind: str, v1: str, v2: str) -> dict[str, dict[str, Any]]:
        """Changed manifest fields, nested ones dotted.

        ``{"hyperparams.max_depth": {"old": 6, "new": 8}}``.

        Bookkeeping that always differs (version, parent, created, file hashes) is
        left out; a field missing on one side shows as None.
        """
        old = _flatten(self.manifest(symbol, kind, v1))
        new = _flatten(self.manifest(symbol, kind, v2))
        changed: dict[str, dict[str, Any]] = {}
        for key in sorted(set(old) | set(new)):
            if key.split(".", 1)[0] in _DIFF_SKIP:
                continue
            if old.get(key) != new.get(key) or (key in old) != (key in new):
                changed[key] = {"old": old.get(key), "new": new.get(key)}
        return changed

    # ------------------------------------------------------------------ drafts and commits

    def new_draft_dir(self, symbol: str, kind: str) -> Path:
        """A fresh ``.tmp-<uuid>/`` for a training worker to write a version's files into.

        The draft is protected from :meth:`cleanup_leftovers` by a lock file beside
        it that this process holds until :meth:`commit_draft` or
        :meth:`discard_draft`; if the process dies, the draft becomes a leftover.
        """
        kdir = self.kind_dir(symbol, kind)
        mkdir_private(kdir)
        draft = kdir / f"{DRAFT_PREFIX}{uuid.uuid4().hex}"
        draft_lock = filelock.FileLock(draft.with_name(draft.name + ".lock"))
        draft_lock.acquire(timeout=0)
        try:
            draft.mkdir(mode=0o700)
        except BaseException:
            draft_lock.release()
            raise
        with self._drafts_guard:
            self._drafts[draft] = draft_lock
        return draft

    def _release_draft(self, draft: Path) -> None:
        with self._drafts_guard:
            draft_lock = self._drafts.pop(draft, None)
        lock_file = draft.with_name(draft.name + ".lock")
        if draft_lock is not None:
            draft_lock.release()
            with contextlib.suppress(OSError):
                lock_file.unlink()

    def discard_draft(self, draft_dir: Path) -> None:
        """Remove a draft that will not be committed (a failed training run)."""
        draft = Path(draft_dir)
        if not draft.name.startswith(DRAFT_PREFIX):
            raise StoreError(f"model store: {draft} is not a draft directory")
        shutil.rmtree(draft, ignore_errors=True)
        self._release_draft(draft)

    def commit_draft(
        self,
        draft_dir: Path,
        *,
        symbol: str,
        kind: str,
        manifest: Mapping[str, object],
        bump: str | None = None,
    ) -> VersionInfo:
        """Turn a draft into the next immutable version (stage "draft") and return it.

        The version number follows :func:`decide_bump` against the newest
        existing version (``bump`` overrides). Every file is hashed and fsynced,
        ``manifest.json`` written and fsynced, then the draft is renamed into place.
        """
        kdir = self.kind_dir(symbol, kind)
        draft = Path(draft_dir)
        if draft.parent.resolve() != kdir.resolve() or not draft.name.startswith(DRAFT_PREFIX):
            raise StoreError(
                f"model store: {draft} is not a draft of {symbol}/{kind} (see new_draft_dir)"
            )
        if not draft.is_dir():
            raise StoreError(f"model store: draft {draft} does not exist")
        if bump is not None and bump not in BUMPS:
            raise StoreError(f"model store: bump must be one of {', '.join(BUMPS)} (got {bump!r})")
        reserved = sorted(RESERVED_MANIFEST_KEYS & set(manifest))
        if reserved:
            raise StoreError(
                f"model store: manifest fields {reserved} are set by the store, not the caller"
            )
        try:
            # What will be on disk: tuples become lists, datetimes ISO strings, and the
            # bump decision compares like with like.
            normalized: JSONDict = json.loads(_dumps(dict(manifest)))
        except (TypeError, ValueError) as exc:
            raise StoreError(
                f"model store: manifest for {symbol}/{kind} is not valid JSON ({exc})"
            ) from exc
        names = _files_in(draft)
        if MANIFEST_NAME in names:
            raise StoreError(f"model store: draft {draft} already holds a {MANIFEST_NAME}")
        if not names:
            raise StoreError(f"model store: draft {draft} holds no files")
        for name in names:
            if (draft / name).is_symlink():
                raise StoreError(f"model store: draft file {draft / name} is a symlink")

        events: list[StoreEvent] = []
        with self.lock(symbol, kind):
            state = self._locked_state(kdir)
            # Numbers are never reused: stages.json keys without a directory are tombstones.
            used = set(state.live) | set(state.raw_stages)
            highest = max(used, key=_version_key) if used else None
            base = state.live[-1] if state.live else None
            base_manifest: JSONDict | None = None
            if base is not None:
                try:
                    base_manifest = _read_json_object(kdir / base / MANIFEST_NAME)
                except IntegrityError as exc:
                    log.warning("model store: cannot compare with %s (%s): major bump", base, exc)
            if bump is not None:
                part = bump
            elif highest is None or base_manifest is None:
                part = "major"  # the first version (1.0.0), or nothing readable to compare with
            else:
                part = decide_bump(base_manifest, normalized)
            version = bump_version(highest, part)
            target = kdir / version
            if target.exists():
                raise StoreError(f"model store: {target} already exists; versions are immutable")

            files: dict[str, str] = {}
            try:
                for name in names:
                    files[name] = _sha256_file(draft / name, fsync=True)
                    _crash_point("commit.file_fsynced")
            except OSError as exc:
                raise _save_failed(symbol, kind, version, exc) from exc
            full: JSONDict = dict(normalized)
            full.update(
                symbol=symbol,
                kind=kind,
                version=version,
                parent_version=base,
                created=iso_utc(self._clock.now()),
                files=files,
                manifest_version=MANIFEST_VERSION,
            )
            data = _dumps(full)
            mpath = draft / MANIFEST_NAME
            try:
                with open(mpath, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    _crash_point("commit.manifest_written")
                    os.fsync(handle.fileno())
                _crash_point("commit.manifest_fsynced")
                for sub in _subdirs_deepest_first(draft, names):
                    _fsync_dir(sub)
                _crash_point("commit.draft_fsynced")
                _replace(draft, target)
            except BaseException as exc:
                with contextlib.suppress(OSError):
                    mpath.unlink()
                if isinstance(exc, OSError):
                    raise _save_failed(symbol, kind, version, exc) from exc
                raise
            _crash_point("commit.renamed")
            try:
                _fsync_dir(kdir)
                _crash_point("commit.parent_fsynced")
                raw = dict(state.raw_stages)
                raw[version] = "draft"
                _write_json(kdir / STAGES_NAME, raw)
            except OSError as exc:
                # The version is complete and in place; without its stages entry it
                # reads as "draft" (never served), which is what it is.
                raise StoreError(
                    f"model store: {symbol}/{kind} {version} was saved but its stage could "
                    f"not be recorded ({exc}); it stays a draft, no alias moved"
                ) from exc
            events.append(
                self._event(
                    symbol,
                    kind,
                    version,
                    "registered",
                    parent_version=base,
                    bump=part,
                    stage="draft",
                )
            )
        self._release_draft(draft)
        self._emit(events)
        return VersionInfo(
            symbol, kind, version, target, "draft", parse_iso_utc(full["created"]), full
        )

    # ------------------------------------------------------------------ stages and aliases

    def _require_live(self, symbol: str, kind: str, state: _KindState, version: str) -> None:
        parse_version(version)
        if version not in state.live:
            raise StoreError(f"model store: {symbol}/{kind} has no version {version}")

    def _require_verified(self, symbol: str, kind: str, version: str) -> None:
        problems = self._verify_dir(symbol, kind, version, self.kind_dir(symbol, kind) / version)
        if problems:
            raise IntegrityError("; ".join(problems))

    def _move_aliases(
        self,
        kdir: Path,
        state: _KindState,
        new_aliases: dict[str, str | None],
        resting: Mapping[str, str],
    ) -> dict[str, list[str]]:
        """The three-write alias change (module docstring); returns {version: [old, new]}."""
        old_named = {v for v in state.aliases.values() if v is not None}
        new_named = {v for v in new_aliases.values() if v is not None}
        pre = dict(state.raw_stages)
        for version in old_named - new_named:
            pre[version] = resting.get(version, RETIRED_STAGE)
        if pre != state.raw_stages:
            _write_json(kdir / STAGES_NAME, pre)
            _crash_point("alias.stages_pre_written")
        _write_json(kdir / ALIASES_NAME, {role: new_aliases.get(role) for role in ALIASES})
        _crash_point("alias.aliases_written")
        final = dict(pre)
        for role, named in new_aliases.items():
            if named is not None:
                final[named] = role
        if final != pre:
            _write_json(kdir / STAGES_NAME, final)
            _crash_point("alias.stages_written")
        changes: dict[str, list[str]] = {}
        for version in sorted(old_named | new_named, key=_version_key):
            before = state.stage_of(version)
            after = _effective_stage(version, new_aliases, final)
            if before != after:
                changes[version] = [before, after]
        return changes

    def set_stage(self, symbol: str, kind: str, version: str, stage: str) -> None:
        """Record a lifecycle stage. "production" promotes, "shadow" sets the shadow alias;
        "previous" only results from promote and rollback."""
        if stage not in STAGES:
            raise StoreError(f"model store: unknown stage {stage!r} (one of {', '.join(STAGES)})")
        if stage == "production":
            self.promote(symbol, kind, version)
            return
        if stage == "shadow":
            self.set_shadow(symbol, kind, version)
            return
        if stage == "previous":
            raise StoreError("model store: stage 'previous' is set by promote and rollback only")
        kdir = self.kind_dir(symbol, kind)
        events: list[StoreEvent] = []
        with self.lock(symbol, kind):
            state = self._locked_state(kdir)
            self._require_live(symbol, kind, state, version)
            current = state.stage_of(version)
            if current in ALIASES:
                raise StoreError(
                    f"model store: {symbol}/{kind} {version} holds the {current} alias; "
                    "move the alias first (promote, rollback or set_shadow None)"
                )
            if current != stage:
                raw = dict(state.raw_stages)
                raw[version] = stage
                _write_json(kdir / STAGES_NAME, raw)
                events.append(
                    self._event(
                        symbol, kind, version, "stage_changed", **{"from": current, "to": stage}
                    )
                )
        self._emit(events)

    def promote(self, symbol: str, kind: str, version: str) -> VersionInfo:
        """``version`` becomes production; the old production becomes previous and the old
        previous is archived. Refused unless ``version`` verifies."""
        kdir = self.kind_dir(symbol, kind)
        events: list[StoreEvent] = []
        with self.lock(symbol, kind):
            state = self._locked_state(kdir)
            self._require_live(symbol, kind, state, version)
            self._require_verified(symbol, kind, version)
            old = state.aliases
            if old["production"] != version:
                new_previous: str | None = old["production"]
                if new_previous is None and old["previous"] != version:
                    new_previous = old["previous"]
                new = {
                    "production": version,
                    "previous": new_previous,
                    "shadow": old["shadow"] if old["shadow"] != version else None,
                }
                changes = self._move_aliases(kdir, state, new, {})
                events.append(
                    self._event(
                        symbol,
                        kind,
                        version,
                        "promoted",
                        replaced=old["production"],
                        previous=new["previous"],
                        archived=old["previous"]
                        if old["previous"] not in (version, new_previous)
                        else None,
                        shadow_cleared=old["shadow"] == version,
                        stages=changes,
                    )
                )
        self._emit(events)
        return self.version_info(symbol, kind, version)

    def set_shadow(self, symbol: str, kind: str, version: str | None) -> None:
        """Point the shadow alias at ``version`` (None clears it); the old shadow is archived."""
        kdir = self.kind_dir(symbol, kind)
        events: list[StoreEvent] = []
        with self.lock(symbol, kind):
            state = self._locked_state(kdir)
            old = state.aliases
            if version is not None:
                self._require_live(symbol, kind, state, version)
                for role in ("production", "previous"):
                    if old[role] == version:
                        raise StoreError(
                            f"model store: {symbol}/{kind} {version} is {role}; it cannot be shadow"
                        )
                self._require_verified(symbol, kind, version)
            if old["shadow"] != version:
                new = dict(old)
                new["shadow"] = version
                changes = self._move_aliases(kdir, state, new, {})
                for v, (before, after) in changes.items():
                    events.append(
                        self._event(
                            symbol, kind, v, "stage_changed", **{"from": before, "to": after}
                        )
                    )
        self._emit(events)

    def rollback(self, symbol: str, kind: str) -> VersionInfo:
        """production <- previous in one atomic alias write.

        The rolled-back version becomes "rejected" (it misbehaved live and must not
        return as anyone's previous). The new previous is the newest older
        version that is validated or archived and verifies, else None.
        """
        kdir = self.kind_dir(symbol, kind)
        events: list[StoreEvent] = []
        with self.lock(symbol, kind):
            state = self._locked_state(kdir)
            old = state.aliases
            target = old["previous"]
            if target is None:
                raise StoreError(
                    f"model store: {symbol}/{kind} has no previous version to roll back to"
                )
            if target not in state.live:
                raise StoreError(
                    f"model store: {symbol}/{kind} previous version {target} does not exist"
                )
            self._require_verified(symbol, kind, target)
            new_previous: str | None = None
            for candidate in reversed(state.live):
                if _version_key(candidate) >= _version_key(target):
                    continue
                if candidate in (old["production"], old["shadow"]):
                    continue
                if state.stage_of(candidate) not in ("validated", "archived"):
                    continue
                if not self._verify_dir(symbol, kind, candidate, kdir / candidate):
                    new_previous = candidate
                    break
            new = {"production": target, "previous": new_previous, "shadow": old["shadow"]}
            resting = {old["production"]: ROLLED_BACK_STAGE} if old["production"] else {}
            changes = self._move_aliases(kdir, state, new, resting)
            events.append(
                self._event(
                    symbol,
                    kind,
                    target,
                    "rolled_back",
                    rolled_back=old["production"],
                    rolled_back_stage=ROLLED_BACK_STAGE if old["production"] else None,
                    previous=new_previous,
                    stages=changes,
                )
            )
        self._emit(events)
        return self.version_info(symbol, kind, target)

    # ------------------------------------------------------------------ deletion

    def _delete_locked(self, kdir: Path, state: _KindState, version: str) -> None:
        """Rename away (atomic), tombstone in stages.json, then remove the files."""
        graveyard = kdir / f"{DRAFT_PREFIX}del-{uuid.uuid4().hex}"
        _replace(kdir / version, graveyard)
        _fsync_dir(kdir)
        _crash_point("delete.renamed")
        live = [v for v in state.live if v != version]
        raw = dict(state.raw_stages)
        raw[version] = _TOMBSTONE
        _write_json(kdir / STAGES_NAME, _compact(raw, live))
        _crash_point("delete.stages_written")
        shutil.rmtree(graveyard, ignore_errors=True)

    def delete(self, symbol: str, kind: str, version: str) -> None:
        """Delete one version; refused while an alias names it."""
        kdir = self.kind_dir(symbol, kind)
        events: list[StoreEvent] = []
        with self.lock(symbol, kind):
            state = self._locked_state(kdir)
            self._require_live(symbol, kind, state, version)
            for role, named in state.aliases.items():
                if named == version:
                    raise StoreError(
                        f"model store: {symbol}/{kind} {version} is the {role} alias; "
                        "move the alias before deleting it"
                    )
            stage = state.stage_of(version)
            self._delete_locked(kdir, state, version)
            events.append(self._event(symbol, kind, version, "deleted", stage=stage))
        self._emit(events)

    def apply_retention(self, symbol: str, kind: str) -> list[str]:
        """Keep the newest ``retention`` versions plus every aliased one; delete the rest."""
        kdir = self.kind_dir(symbol, kind)
        events: list[StoreEvent] = []
        deleted: list[str] = []
        with self.lock(symbol, kind):
            state = self._locked_state(kdir)
            keep = set(state.live[-self._retention :]) | {v for v in state.aliases.values() if v}
            for version in state.live:
                if version in keep:
                    continue
                stage = state.stage_of(version)
                self._delete_locked(kdir, state, version)
                state = self._locked_state(kdir)
                deleted.append(version)
                events.append(
                    self._event(
                        symbol,
                        kind,
                        version,
                        "retention_deleted",
                        stage=stage,
                        retention=self._retention,
                    )
                )
        self._emit(events)
        return deleted

    # ------------------------------------------------------------------ start-up

    def repair(self, symbol: str, kind: str) -> bool:
        """Rewrite stages.json to the effective stages; True when something changed.

        aliases.json is the source of truth. Only if it is unreadable (damaged
        from outside: the store replaces it atomically) it is rebuilt from the
        alias stages in stages.json.
        """
        kdir = self.kind_dir(symbol, kind)
        events: list[StoreEvent] = []
        changed = False
        with self.lock(symbol, kind):
            live = self._live_versions(kdir)
            stages_damaged = False
            try:
                raw = self._read_raw_stages(kdir)
            except IntegrityError as exc:
                # Stages other than the aliases are lost: the versions read as "draft"
                # (unvalidated) until something sets them again.
                events.append(
                    self._event(symbol, kind, None, "integrity_failed", problems=[str(exc)])
                )
                raw = {}
                stages_damaged = True
            try:
                aliases = self._read_aliases(kdir)
            except IntegrityError as exc:
                aliases = dict.fromkeys(ALIASES)
                for version, stage in raw.items():
                    if stage in ALIASES and version in live and aliases[stage] is None:
                        aliases[stage] = version
                events.append(
                    self._event(
                        symbol, kind, None, "integrity_failed", problems=[str(exc)], rebuilt=aliases
                    )
                )
                _write_json(kdir / ALIASES_NAME, aliases)
                changed = True
            effective = {v: _effective_stage(v, aliases, raw) for v in live}
            tombstones = {v: _TOMBSTONE for v in raw if v not in live}
            fixed = _compact(effective | tombstones, live)
            if fixed != raw or stages_damaged:
                _write_json(kdir / STAGES_NAME, fixed)
                changed = True
        self._emit(events)
        return changed

    def cleanup_leftovers(self) -> list[Path]:
        """Remove ``.tmp-*`` drafts of dead writers and stray ``*.tmp`` files; repair stages.json.

        Run at start-up. A draft whose writer still runs (its lock file is held)
        is left alone, as is a kind another process holds locked.
        """
        removed: list[Path] = []
        if not self._root.is_dir():
            return removed
        events: list[StoreEvent] = []
        for path in sorted(self._root.iterdir()):
            if path.is_file() and path.name.endswith(TMP_SUFFIX):
                path.unlink(missing_ok=True)
                removed.append(path)
                events.append(self._event("", "", None, "leftover_removed", path=str(path)))
        self._emit(events)
        for sym in sorted(p for p in self._root.iterdir() if p.is_dir()):
            events = []
            for path in sorted(sym.iterdir()):
                if path.is_file() and path.name.endswith(TMP_SUFFIX):
                    path.unlink(missing_ok=True)
                    removed.append(path)
                    events.append(
                        self._event(sym.name, "", None, "leftover_removed", path=str(path))
                    )
            self._emit(events)
            if _NAME_RE.match(sym.name) is None:
                continue
            for kdir in sorted(p for p in sym.iterdir() if p.is_dir()):
                if _NAME_RE.match(kdir.name) is None or is_version(kdir.name):
                    continue
                try:
                    removed.extend(self._cleanup_kind(sym.name, kdir.name, kdir))
                    self.repair(sym.name, kdir.name)
                except StoreLockedError:
                    log.warning(
                        "model store: %s/%s is locked by another writer; cleanup skipped",
                        sym.name,
                        kdir.name,
                    )
        return removed

    def _cleanup_kind(self, symbol: str, kind: str, kdir: Path) -> list[Path]:
        removed: list[Path] = []
        events: list[StoreEvent] = []
        with self.lock(symbol, kind):
            with self._drafts_guard:
                own = set(self._drafts)
            entries = sorted(kdir.iterdir(), key=lambda p: (not p.is_dir(), p.name))
            for path in entries:
                name = path.name
                if name.startswith(DRAFT_PREFIX) and not name.endswith(".lock"):
                    if path in own:
                        continue
                    lock_file = path.with_name(name + ".lock")
                    if not self._remove_if_unlocked(lock_file, path):
                        continue
                elif name.startswith(DRAFT_PREFIX) and name.endswith(".lock"):
                    if not path.exists() or path.with_name(name[: -len(".lock")]) in own:
                        continue
                    if not self._remove_if_unlocked(path, None):
                        continue
                elif name.endswith(TMP_SUFFIX) and path.is_file():
                    path.unlink(missing_ok=True)  # only written under the lock we hold
                else:
                    continue
                removed.append(path)
                events.append(self._event(symbol, kind, None, "leftover_removed", path=str(path)))
        self._emit(events)
        return removed

    @staticmethod
    def _remove_if_unlocked(lock_file: Path, target: Path | None) -> bool:
        """Remove ``target`` (a draft dir) and ``lock_file`` unless a live writer holds the lock."""
        draft_lock = filelock.FileLock(lock_file)
        try:
            draft_lock.acquire(timeout=0)
        except filelock.Timeout:
            return False
        try:
            if target is not None:
                if target.is_symlink() or not target.is_dir():
                    target.unlink(missing_ok=True)
                else:
                    shutil.rmtree(target)
        finally:
            draft_lock.release()
            with contextlib.suppress(OSError):
                lock_file.unlink()
        return True


def _save_failed(symbol: str, kind: str, version: str, exc: OSError) -> StoreError:
    return StoreError(
        f"model store: saving {symbol}/{kind} {version} failed ({exc}); nothing was "
        "registered and no alias moved (free disk space; the draft is removed by the "
        "caller or at the next start-up)"
    )


def _verified_info(
    symbol: str, kind: str, vdir: Path, stage: str, manifest: JSONDict
) -> VersionInfo:
    # A verified manifest has a valid "created" (the store wrote it).
    return VersionInfo(
        symbol, kind, vdir.name, vdir, stage, parse_iso_utc(manifest["created"]), manifest
    )


def _compact(raw: Mapping[str, str], live: list[str]) -> dict[str, str]:
    """Drop tombstones below the newest live version: only those above it keep numbers reserved."""
    newest = _version_key(live[-1]) if live else None
    out: dict[str, str] = {}
    for version, stage in raw.items():
        if version not in live and newest is not None and _version_key(version) < newest:
            continue
        out[version] = _TOMBSTONE if version not in live else stage
    return dict(sorted(out.items(), key=lambda kv: _version_key(kv[0])))


class ModelEventSink(Protocol):
    """What ``journal_hook`` needs: the journal's ``record_model_event``."""

    def record_model_event(
        self,
        event: str,
        *,
        symbol: str | None = None,
        kind: str | None = None,
        version: str | None = None,
        details: Mapping[str, object] | None = None,
        time: datetime | None = None,
    ) -> object: ...

    def record_event(
        self, level: str, kind: str, message: str, details: Mapping[str, object] | None = None
    ) -> object: ...


# Store events an operator must see in ``status`` (the events table), not only in
# model_events: a version that was refused, and what serves instead.
_ALERTS: Final = {"integrity_failed": "error", "fallback": "warning"}


def journal_hook(journal: ModelEventSink) -> Callable[[StoreEvent], None]:
    """An ``on_event`` hook that records every store event as a ``model_events`` row."""

    def hook(event: StoreEvent) -> None:
        journal.record_model_event(
            event.event,
            symbol=event.symbol,
            kind=event.kind,
            version=event.version,
            details=event.details,
            time=event.time,
        )
        level = _ALERTS.get(event.event)
        if level is not None:
            reason = event.details.get("reason") or event.details.get("problems") or ""
            journal.record_event(
                level,
                f"model_{event.event}",
                f"{event.symbol} {event.kind} {event.version}: {event.event} {reason}".strip(),
                dict(event.details),
            )

    return hook
