"""The model store: atomic immutable versions, aliases, integrity, and crash safety."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from ml import store as store_mod
from ml.store import (
    CRASH_POINTS,
    IntegrityError,
    ModelStore,
    StoreError,
    StoreEvent,
    StoreLockedError,
    VersionInfo,
    bump_version,
    decide_bump,
    parse_version,
)
from utils.clock import FakeClock, iso_utc

ROOT = Path(__file__).resolve().parents[1]
S, K = "EURUSD", "rf"
BASE_MANIFEST: dict[str, Any] = {
    "feature_hash": "fh1",
    "feature_names": ["ret_1", "rsi_14"],
    "architecture": "forest",
    "hyperparams": {"n_estimators": 100, "max_depth": 6},
    "metrics": {"holdout": {"accuracy": 0.55, "log_loss": 1.01}},
    "training_window": {"start": "2024-01-01T00:00:00Z", "end": "2024-01-02T00:00:00Z"},
    "samples": {"train": 1000, "test": 200},
    "libraries": {"sklearn": "1.9.1"},
    "seed": 7,
}


class Recorder:
    def __init__(self) -> None:
        self.events: list[StoreEvent] = []

    def __call__(self, event: StoreEvent) -> None:
        self.events.append(event)

    def names(self) -> list[str]:
        return [e.event for e in self.events]


@pytest.fixture(autouse=True)
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """In-process, fsync only records what it was asked to flush.

    Nothing here simulates power loss, and a real fsync costs ~4 ms on this disk
    (90% of these tests' time). The subprocess crash tests run the real one.
    """
    paths: list[str] = []

    def record(fd: int) -> None:
        proc_fd = Path(f"/proc/self/fd/{fd}")
        paths.append(os.readlink(proc_fd) if proc_fd.exists() else str(fd))

    monkeypatch.setattr(os, "fsync", record)
    return paths


@pytest.fixture
def events() -> Recorder:
    return Recorder()


@pytest.fixture
def store(tmp_path: Path, fake_clock: FakeClock, events: Recorder) -> ModelStore:
    return ModelStore(tmp_path / "models", clock=fake_clock, retention=3, on_event=events)


def commit(
    store: ModelStore,
    *,
    payload: bytes = b"weights",
    bump: str | None = None,
    symbol: str = S,
    kind: str = K,
    **changes: Any,
) -> VersionInfo:
    draft = store.new_draft_dir(symbol, kind)
    (draft / "model.onnx").write_bytes(b"onnx:" + payload)
    (draft / "model.ubj").write_bytes(b"ubj:" + payload)
    (draft / "scaler.json").write_text(json.dumps({"mean": [0.5]}), encoding="utf-8")
    manifest = {**BASE_MANIFEST, **changes}
    return store.commit_draft(draft, symbol=symbol, kind=kind, manifest=manifest, bump=bump)


def chain(store: ModelStore, n: int) -> list[str]:
    """``n`` patch versions, each validated."""
    out = []
    for i in range(n):
        info = commit(store, payload=f"w{i}".encode())
        store.set_stage(S, K, info.version, "validated")
        out.append(info.version)
    return out


# --------------------------------------------------------------------------- versions


def test_parse_version_orders_numerically_and_rejects_junk() -> None:
    assert parse_version("1.10.0") > parse_version("1.9.0")
    assert sorted(["1.10.0", "1.9.0", "1.2.10", "1.2.9"], key=parse_version) == [
        "1.2.9",
        "1.2.10",
        "1.9.0",
        "1.10.0",
    ]
    for bad in ("1.0", "01.0.0", "1.0.0-rc1", "v1.0.0", ""):
        with pytest.raises(ValueError):
            parse_version(bad)
    assert bump_version(None, "patch") == "1.0.0"
    assert bump_version("1.2.3", "major") == "2.0.0"
    assert bump_version("1.2.3", "minor") == "1.3.0"
    assert bump_version("1.2.3", "patch") == "1.2.4"


def test_commit_writes_a_complete_version_with_correct_hashes(
    store: ModelStore, fake_clock: FakeClock, events: Recorder
) -> None:
    info = commit(store)
    assert info.version == "1.0.0"
    assert info.stage == "draft"
    assert info.path == store.root / S / K / "1.0.0"
    assert sorted(p.name for p in info.path.iterdir()) == [
        "manifest.json",
        "model.onnx",
        "model.ubj",
        "scaler.json",
    ]
    manifest = json.loads((info.path / "manifest.json").read_text(encoding="utf-8"))
    for name in ("model.onnx", "model.ubj", "scaler.json"):
        assert (
            manifest["files"][name] == hashlib.sha256((info.path / name).read_bytes()).hexdigest()
        )
    assert manifest["symbol"] == S and manifest["kind"] == K and manifest["version"] == "1.0.0"
    assert manifest["parent_version"] is None
    assert manifest["created"] == iso_utc(fake_clock.now())
    assert manifest["manifest_version"] == 1
    assert "stage" not in manifest
    assert manifest["hyperparams"] == BASE_MANIFEST["hyperparams"]
    assert store.verify(S, K, "1.0.0") == []
    assert store.stages(S, K) == {"1.0.0": "draft"}
    assert json.loads((store.root / S / K / "stages.json").read_text(encoding="utf-8")) == {
        "1.0.0": "draft"
    }
    # The draft directory and its lock are gone.
    assert [p.name for p in (store.root / S / K).iterdir() if p.name.startswith(".tmp-")] == []
    assert events.names() == ["registered"]
    assert events.events[0].version == "1.0.0"
    assert events.events[0].time == fake_clock.now()
    assert store.symbols_kinds() == [(S, K)]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names fds via /proc")
def test_commit_fsyncs_every_file_the_manifest_and_both_directories(
    store: ModelStore, fsynced: list[str]
) -> None:
    store.new_draft_dir(S, "warmup")  # creates the root, outside what we look at
    draft = store.new_draft_dir(S, K)
    (draft / "sub").mkdir()
    (draft / "sub" / "scaler.json").write_text("{}", encoding="utf-8")
    (draft / "model.onnx").write_bytes(b"x")
    fsynced.clear()
    store.commit_draft(draft, symbol=S, kind=K, manifest={})
    kdir = str(store.root / S / K)
    expected = [
        str(draft / "model.onnx"),
        str(draft / "sub" / "scaler.json"),
        str(draft / "manifest.json"),
        str(draft / "sub"),
        str(draft),
        kdir,  # the rename of the draft into 1.0.0
        kdir + "/stages.json.tmp",
        kdir,  # the replace of stages.json
    ]
    assert fsynced == expected


def test_version_bumps_follow_what_changed(store: ModelStore) -> None:
    assert commit(store).version == "1.0.0"
    assert commit(store, payload=b"retrain").version == "1.0.1"  # same configuration
    v = commit(store, hyperparams={"n_estimators": 200, "max_depth": 6})
    assert v.version == "1.1.0"
    assert v.manifest["parent_version"] == "1.0.1"
    assert (
        commit(store, feature_hash="fh2", hyperparams=v.manifest["hyperparams"]).version == "2.0.0"
    )
    assert commit(store, feature_hash="fh2", architecture="bilstm").version == "3.0.0"
    assert commit(store, feature_hash="fh2", architecture="bilstm", bump="minor").version == "3.1.0"
    assert [i.version for i in store.versions(S, K)] == [
        "1.0.0",
        "1.0.1",
        "1.1.0",
        "2.0.0",
        "3.0.0",
        "3.1.0",
    ]


def test_decide_bump_rules() -> None:
    old = {"feature_hash": "a", "architecture": "x", "hyperparams": {"d": 1}}
    assert decide_bump(old, dict(old)) == "patch"
    assert decide_bump(old, {**old, "hyperparams": {"d": 2}}) == "minor"
    assert decide_bump(old, {**old, "feature_hash": "b", "hyperparams": {"d": 2}}) == "major"
    assert decide_bump(old, {**old, "architecture": "y"}) == "major"
    assert decide_bump(None, old) == "major"


def test_committing_never_overwrites_an_existing_version(store: ModelStore) -> None:
    first = commit(store, payload=b"one")
    before = {p.name: p.read_bytes() for p in first.path.iterdir()}
    second = commit(store, payload=b"two")
    assert second.version != first.version
    assert {p.name: p.read_bytes() for p in first.path.iterdir()} == before
    # Deleting the newest version does not free its number.
    store.delete(S, K, second.version)
    assert commit(store, payload=b"three").version == "1.0.2"


def test_commit_refuses_bad_drafts(store: ModelStore) -> None:
    draft = store.new_draft_dir(S, K)
    with pytest.raises(StoreError, match="no files"):
        store.commit_draft(draft, symbol=S, kind=K, manifest={})
    (draft / "model.onnx").write_bytes(b"x")
    with pytest.raises(StoreError, match="set by the store"):
        store.commit_draft(draft, symbol=S, kind=K, manifest={"version": "9.9.9"})
    with pytest.raises(StoreError, match="set by the store"):
        store.commit_draft(draft, symbol=S, kind=K, manifest={"stage": "production"})
    with pytest.raises(StoreError, match="not valid JSON"):
        store.commit_draft(draft, symbol=S, kind=K, manifest={"metrics": float("nan")})
    assert not (draft / "manifest.json").exists()  # a failed commit leaves the draft reusable
    with pytest.raises(StoreError, match="not a draft"):
        store.commit_draft(draft, symbol=S, kind="xgb", manifest={})
    (draft / "manifest.json").write_text("{}", encoding="utf-8")
    with pytest.raises(StoreError, match="already holds"):
        store.commit_draft(draft, symbol=S, kind=K, manifest={})
    with pytest.raises(StoreError, match="not a valid name"):
        store.new_draft_dir("../etc", K)
    store.discard_draft(draft)
    assert not draft.exists()
    assert store.versions(S, K) == []


# --------------------------------------------------------------------------- lifecycle


def test_promote_moves_production_to_previous_and_archives_the_older(
    store: ModelStore, events: Recorder
) -> None:
    v1, v2, v3 = chain(store, 3)
    store.promote(S, K, v1)
    assert store.aliases(S, K) == {"production": v1, "previous": None, "shadow": None}
    store.promote(S, K, v2)
    assert store.aliases(S, K) == {"production": v2, "previous": v1, "shadow": None}
    store.set_shadow(S, K, v3)
    assert store.stages(S, K) == {v1: "previous", v2: "production", v3: "shadow"}
    events.events.clear()
    info = store.promote(S, K, v3)
    assert info.stage == "production"
    assert store.aliases(S, K) == {"production": v3, "previous": v2, "shadow": None}
    assert store.stages(S, K) == {v1: "archived", v2: "previous", v3: "production"}
    on_disk = json.loads((store.root / S / K / "stages.json").read_text(encoding="utf-8"))
    assert on_disk == {v1: "archived", v2: "previous", v3: "production"}
    assert events.names() == ["promoted"]
    assert events.events[0].details["archived"] == v1
    assert events.events[0].details["shadow_cleared"] is True
    # Promoting production again changes nothing.
    store.promote(S, K, v3)
    assert store.aliases(S, K)["previous"] == v2


def test_rollback_restores_previous_and_rejects_the_rolled_back(
    store: ModelStore, events: Recorder
) -> None:
    v1, v2, v3, v4 = chain(store, 4)
    store.set_stage(S, K, v2, "rejected")
    for v in (v1, v3, v4):
        store.promote(S, K, v)
    assert store.aliases(S, K) == {"production": v4, "previous": v3, "shadow": None}
    events.events.clear()
    info = store.rollback(S, K)
    assert info.version == v3 and info.stage == "production"
    # The new previous is the newest older validated/archived version (v2 is rejected).
    assert store.aliases(S, K) == {"production": v3, "previous": v1, "shadow": None}
    assert store.stages(S, K) == {v1: "previous", v2: "rejected", v3: "production", v4: "rejected"}
    assert events.names() == ["rolled_back"]
    assert events.events[0].details["rolled_back"] == v4
    store.rollback(S, K)
    assert store.aliases(S, K) == {"production": v1, "previous": None, "shadow": None}
    with pytest.raises(StoreError, match="no previous version"):
        store.rollback(S, K)


def test_rollback_refuses_a_previous_that_does_not_verify(store: ModelStore) -> None:
    v1, v2 = chain(store, 2)
    store.promote(S, K, v1)
    store.promote(S, K, v2)
    (store.root / S / K / v1 / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(IntegrityError, match=r"model\.onnx"):
        store.rollback(S, K)
    assert store.aliases(S, K)["production"] == v2


def test_set_stage_rules(store: ModelStore) -> None:
    v1, v2 = chain(store, 2)
    store.promote(S, K, v1)
    with pytest.raises(StoreError, match="holds the production alias"):
        store.set_stage(S, K, v1, "rejected")
    with pytest.raises(StoreError, match="promote and rollback"):
        store.set_stage(S, K, v2, "previous")
    with pytest.raises(StoreError, match="unknown stage"):
        store.set_stage(S, K, v2, "golden")
    with pytest.raises(StoreError, match="no version"):
        store.set_stage(S, K, "9.9.9", "validated")
    store.set_stage(S, K, v2, "shadow")
    assert store.aliases(S, K)["shadow"] == v2
    with pytest.raises(StoreError, match="cannot be shadow"):
        store.set_shadow(S, K, v1)
    store.set_stage(S, K, v2, "production")
    assert store.aliases(S, K) == {"production": v2, "previous": v1, "shadow": None}


def test_delete_refuses_aliased_versions(store: ModelStore, events: Recorder) -> None:
    v1, v2, v3 = chain(store, 3)
    store.promote(S, K, v1)
    store.promote(S, K, v2)
    store.set_shadow(S, K, v3)
    for version, alias in ((v1, "previous"), (v2, "production"), (v3, "shadow")):
        with pytest.raises(StoreError, match=f"{alias} alias"):
            store.delete(S, K, version)
    store.set_shadow(S, K, None)
    assert store.stages(S, K)[v3] == "archived"
    store.delete(S, K, v3)
    assert [i.version for i in store.versions(S, K)] == [v1, v2]
    assert events.names()[-1] == "deleted"
    assert store.verify(S, K) == []


def test_retention_keeps_the_newest_n_plus_every_aliased_version(
    store: ModelStore, events: Recorder
) -> None:
    versions = chain(store, 7)
    store.promote(S, K, versions[0])
    store.promote(S, K, versions[1])
    store.set_shadow(S, K, versions[2])
    events.events.clear()
    deleted = store.apply_retention(S, K)  # retention=3
    assert deleted == versions[3:4]
    assert [i.version for i in store.versions(S, K)] == versions[:3] + versions[4:]
    assert events.names() == ["retention_deleted"]
    assert store.apply_retention(S, K) == []
    assert store.verify(S, K) == []
    # Deleted numbers are never handed out again.
    assert commit(store, payload=b"next").version == bump_version(versions[-1], "patch")


# --------------------------------------------------------------------------- integrity


def test_verify_detects_a_tampered_byte_a_missing_file_and_an_extra_file(store: ModelStore) -> None:
    v1, v2, v3 = chain(store, 3)
    vdir = store.root / S / K
    data = bytearray((vdir / v1 / "model.onnx").read_bytes())
    data[0] ^= 0x01
    (vdir / v1 / "model.onnx").write_bytes(bytes(data))
    (vdir / v2 / "scaler.json").unlink()
    (vdir / v3 / "evil.pkl").write_bytes(b"cos\nsystem\n")
    [p1] = store.verify(S, K, v1)
    assert "model.onnx" in p1 and "SHA-256 mismatch" in p1
    [p2] = store.verify(S, K, v2)
    assert "scaler.json" in p2 and "missing" in p2
    [p3] = store.verify(S, K, v3)
    assert "evil.pkl" in p3 and "extra file" in p3
    assert len(store.verify(S, K)) == 3


def test_verify_detects_bad_manifests(store: ModelStore) -> None:
    v1, v2, v3 = chain(store, 3)
    vdir = store.root / S / K
    (vdir / v1 / "manifest.json").write_text("{not json", encoding="utf-8")
    m2 = json.loads((vdir / v2 / "manifest.json").read_text(encoding="utf-8"))
    m2["manifest_version"] = 99
    (vdir / v2 / "manifest.json").write_text(json.dumps(m2), encoding="utf-8")
    m3 = json.loads((vdir / v3 / "manifest.json").read_text(encoding="utf-8"))
    m3["files"]["../../escape"] = "0" * 64
    (vdir / v3 / "manifest.json").write_text(json.dumps(m3), encoding="utf-8")
    assert "not valid JSON" in store.verify(S, K, v1)[0]
    assert "unknown manifest_version 99" in store.verify(S, K, v2)[0]
    assert any("not allowed" in p for p in store.verify(S, K, v3))
    (vdir / v1 / "manifest.json").unlink()
    assert "manifest.json is missing" in store.verify(S, K, v1)[0]
    assert store.verify(S, K, "7.7.7")[0].endswith("is missing")


def test_resolve_falls_back_to_previous_on_tamper_and_reports_why(
    store: ModelStore, events: Recorder
) -> None:
    v1, v2 = chain(store, 2)
    store.promote(S, K, v1)
    store.promote(S, K, v2)
    assert store.resolve(S, K) == store.version_info(S, K, v2)
    events.events.clear()
    (store.root / S / K / v2 / "model.onnx").write_bytes(b"truncated")
    info = store.resolve(S, K)
    assert info is not None and info.version == v1 and info.stage == "previous"
    assert events.names() == ["integrity_failed", "fallback"]
    failed, fallback = events.events
    assert failed.version == v2 and "model.onnx" in failed.details["problems"][0]
    assert fallback.version == v1 and fallback.details["refused"] == v2
    # Aliases are not moved by a read.
    assert store.aliases(S, K)["production"] == v2
    events.events.clear()
    (store.root / S / K / v1 / "model.ubj").unlink()
    assert store.resolve(S, K) is None
    assert events.names() == ["integrity_failed", "integrity_failed"]
    assert store.resolve(S, K, "shadow") is None


def test_read_file_refuses_bytes_that_do_not_match_the_manifest(store: ModelStore) -> None:
    info = commit(store)
    assert store.read_file(info, "model.onnx") == b"onnx:weights"
    (info.path / "model.onnx").write_bytes(b"onnx:weightz")
    with pytest.raises(IntegrityError, match=r"model\.onnx"):
        store.read_file(info, "model.onnx")
    with pytest.raises(IntegrityError, match="not listed"):
        store.read_file(info, "../aliases.json")


def test_promote_refuses_a_version_that_does_not_verify(store: ModelStore) -> None:
    (v1,) = chain(store, 1)
    (store.root / S / K / v1 / "extra.bin").write_bytes(b"x")
    with pytest.raises(IntegrityError, match=r"extra\.bin"):
        store.promote(S, K, v1)
    assert store.aliases(S, K)["production"] is None


# --------------------------------------------------------------------------- ages, diff, hooks


def test_staleness_follows_the_fake_clock(store: ModelStore, fake_clock: FakeClock) -> None:
    now = fake_clock.now
    assert store.is_stale(S, K, now(), 86400)  # no production at all
    info = commit(store)
    store.promote(S, K, info.version)
    assert store.age_s(info, now()) == 0.0
    fake_clock.advance(86400)
    assert not store.is_stale(S, K, now(), 86400)
    fake_clock.advance(1)
    assert store.is_stale(S, K, now(), 86400)
    # A manifest's "trained" time wins over "created".
    trained = iso_utc(now() - timedelta(hours=30))
    newer = commit(store, payload=b"old data", trained=trained)
    store.promote(S, K, newer.version)
    assert store.age_s(newer, now()) == 30 * 3600
    assert store.is_stale(S, K, now(), 86400)


def test_diff_shows_changed_manifest_fields(store: ModelStore) -> None:
    a = commit(store)
    b = commit(
        store,
        hyperparams={"n_estimators": 100, "max_depth": 8},
        metrics={"holdout": {"accuracy": 0.57, "log_loss": 1.01}},
        samples={"train": 2000, "test": 200},
        feature_names=["ret_1", "rsi_14", "atr_14"],
        notes="wider",
    )
    diff = store.diff(S, K, a.version, b.version)
    assert diff == {
        "hyperparams.max_depth": {"old": 6, "new": 8},
        "metrics.holdout.accuracy": {"old": 0.55, "new": 0.57},
        "samples.train": {"old": 1000, "new": 2000},
        "feature_names": {"old": ["ret_1", "rsi_14"], "new": ["ret_1", "rsi_14", "atr_14"]},
        "notes": {"old": None, "new": "wider"},
    }
    assert store.diff(S, K, a.version, a.version) == {}


def test_a_raising_event_hook_never_breaks_the_store(
    tmp_path: Path, fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []

    def hook(event: StoreEvent) -> None:
        calls.append(event.event)
        raise RuntimeError("registry down")

    store = ModelStore(tmp_path / "m", clock=fake_clock, on_event=hook)
    info = commit(store)
    store.promote(S, K, info.version)
    assert store.resolve(S, K) is not None
    assert calls == ["registered", "promoted"]
    assert "on_event hook failed" in caplog.text


# --------------------------------------------------------------------------- start-up


def test_cleanup_removes_leftovers_but_not_a_live_draft(
    store: ModelStore, tmp_path: Path, fake_clock: FakeClock, events: Recorder
) -> None:
    commit(store)
    kdir = store.root / S / K
    dead = kdir / ".tmp-deadbeef"
    dead.mkdir()
    (dead / "model.onnx").write_bytes(b"half")
    (kdir / ".tmp-0badc0de.lock").write_text("", encoding="utf-8")
    (kdir / "aliases.json.tmp").write_text("{", encoding="utf-8")
    (store.root / "stray.tmp").write_text("x", encoding="utf-8")
    live = store.new_draft_dir(S, K)  # this store is still writing it
    other = ModelStore(store.root, clock=fake_clock)
    events.events.clear()
    removed = other.cleanup_leftovers()
    assert sorted(p.name for p in removed) == sorted(
        [".tmp-deadbeef", ".tmp-0badc0de.lock", "aliases.json.tmp", "stray.tmp"]
    )
    assert live.is_dir()
    assert sorted(p.name for p in kdir.iterdir()) == sorted(
        [".lock", "1.0.0", "stages.json", live.name, live.name + ".lock"]
    )
    # The owner's own cleanup leaves its draft too; once discarded, nothing is left.
    assert store.cleanup_leftovers() == []
    store.discard_draft(live)
    assert not live.exists() and not (kdir / (live.name + ".lock")).exists()


def test_cleanup_removes_the_draft_of_a_dead_process(store: ModelStore, tmp_path: Path) -> None:
    kdir = store.root / S / K
    code = (
        "import sys; from pathlib import Path; from ml.store import ModelStore;"
        "from utils.clock import FakeClock;"
        "s = ModelStore(Path(sys.argv[1]), clock=FakeClock());"
        "d = s.new_draft_dir('EURUSD', 'rf'); (d / 'model.onnx').write_bytes(b'x'); print(d)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(store.root)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    draft = Path(out.stdout.strip())
    assert draft.is_dir()
    removed = store.cleanup_leftovers()
    assert draft in removed and not draft.exists()
    assert [p.name for p in kdir.iterdir()] == [".lock"]


def test_repair_rewrites_stages_from_the_aliases(store: ModelStore) -> None:
    v1, v2, v3 = chain(store, 3)
    store.promote(S, K, v1)
    store.promote(S, K, v2)
    kdir = store.root / S / K
    # What a crash between writing aliases.json and the final stages.json leaves,
    # plus an entry for a version whose directory is gone.
    (kdir / "aliases.json").write_text(
        json.dumps({"production": v3, "previous": v2, "shadow": None}), encoding="utf-8"
    )
    (kdir / "stages.json").write_text(
        json.dumps({v1: "archived", v2: "production", v3: "validated", "0.9.0": "validated"}),
        encoding="utf-8",
    )
    assert store.stages(S, K) == {v1: "archived", v2: "previous", v3: "production"}
    assert store.repair(S, K)
    on_disk = json.loads((kdir / "stages.json").read_text(encoding="utf-8"))
    assert on_disk == {v1: "archived", v2: "previous", v3: "production"}
    assert not store.repair(S, K)


def test_repair_rebuilds_damaged_aliases_from_stages(store: ModelStore, events: Recorder) -> None:
    v1, v2 = chain(store, 2)
    store.promote(S, K, v1)
    store.promote(S, K, v2)
    kdir = store.root / S / K
    (kdir / "aliases.json").write_text("{garbage", encoding="utf-8")
    with pytest.raises(IntegrityError, match=r"aliases\.json"):
        store.aliases(S, K)
    events.events.clear()
    assert store.resolve(S, K) is None
    assert events.names() == ["integrity_failed"]
    store.cleanup_leftovers()
    assert store.aliases(S, K) == {"production": v2, "previous": v1, "shadow": None}


def test_repair_replaces_a_damaged_stages_file(store: ModelStore, events: Recorder) -> None:
    v1, v2 = chain(store, 2)
    store.promote(S, K, v1)
    kdir = store.root / S / K
    (kdir / "stages.json").write_bytes(b"\x00\x01 not json")
    with pytest.raises(IntegrityError, match=r"stages\.json"):
        store.versions(S, K)
    # Serving needs only aliases.json: production still resolves.
    resolved = store.resolve(S, K)
    assert resolved is not None and resolved.version == v1
    events.events.clear()
    store.cleanup_leftovers()
    assert events.names() == ["integrity_failed"]
    assert store.stages(S, K) == {v1: "production", v2: "draft"}


def test_a_lock_held_by_another_process_blocks_a_second_writer(
    tmp_path: Path, fake_clock: FakeClock
) -> None:
    store = ModelStore(tmp_path / "m", clock=fake_clock, lock_timeout_s=0)
    draft = store.new_draft_dir(S, K)
    (draft / "model.onnx").write_bytes(b"x")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, filelock; lock = filelock.FileLock(sys.argv[1]); lock.acquire();"
            "print('locked', flush=True); sys.stdin.read()",
            str(store.lock_path(S, K)),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLockedError, match="locked by another writer"):
            store.commit_draft(draft, symbol=S, kind=K, manifest={})
        assert draft.is_dir() and store.versions(S, K) == []
        holder.stdin.close()  # the holder exits, and its lock dies with it
        assert holder.wait(timeout=30) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert store.commit_draft(draft, symbol=S, kind=K, manifest={}).version == "1.0.0"


def test_writers_on_two_threads_are_serialised(store: ModelStore) -> None:
    def writer(tag: str) -> None:
        for i in range(8):
            info = commit(store, payload=f"{tag}{i}".encode())
            store.promote(S, K, info.version)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for future in [pool.submit(writer, tag) for tag in "ab"]:
            future.result()  # re-raises a writer's exception
    versions = [i.version for i in store.versions(S, K)]
    assert versions == [f"1.0.{n}" for n in range(16)]
    assert store.verify(S, K) == []
    stages = store.stages(S, K)
    assert sorted(stages.values()).count("production") == 1
    assert sorted(stages.values()).count("previous") == 1


def test_crash_env_is_parsed_strictly() -> None:
    assert store_mod._parse_crash_spec(None) is None
    assert store_mod._parse_crash_spec("json.replaced:3") == ("json.replaced", 3)
    for bad in ("json.replaced", "json.replaced:0", ":2", "x:y"):
        with pytest.raises(ValueError):
            store_mod._parse_crash_spec(bad)


# --------------------------------------------------------------------------- crash safety


class SimulatedCrash(BaseException):
    """Stops a store operation at a crash point, in-process (nothing after it runs)."""


def _build_lifecycle(root: Path) -> tuple[ModelStore, list[str]]:
    store = ModelStore(root, clock=FakeClock(), retention=2)
    versions = chain(store, 5)
    for v in versions[:3]:
        store.promote(S, K, v)
    store.set_shadow(S, K, versions[3])
    return store, versions


LIFECYCLE_OPS: dict[str, Any] = {
    "promote_shadow": lambda st, vs: st.promote(S, K, vs[3]),
    "promote_validated": lambda st, vs: st.promote(S, K, vs[4]),
    "rollback": lambda st, vs: st.rollback(S, K),
    "replace_shadow": lambda st, vs: st.set_shadow(S, K, vs[4]),
    "clear_shadow": lambda st, vs: st.set_shadow(S, K, None),
    "reject": lambda st, vs: st.set_stage(S, K, vs[4], "rejected"),
    "delete": lambda st, vs: st.delete(S, K, vs[0]),
    "retention": lambda st, vs: st.apply_retention(S, K),
    "commit": lambda st, vs: commit(st, payload=b"new"),
}


def _snapshot(root: Path) -> tuple[Any, ...]:
    store = ModelStore(root, clock=FakeClock())
    store.cleanup_leftovers()
    assert store.verify(S, K) == []
    return store.aliases(S, K), store.stages(S, K)


@pytest.mark.parametrize("op", LIFECYCLE_OPS)
def test_an_operation_stopped_at_any_crash_point_leaves_the_old_or_the_new_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, op: str
) -> None:
    """Exhaustive and exact, in-process: every crash point the operation passes, one
    by one. The state read back (aliases *and* every stage) is exactly the state
    before or exactly the state after, never a mixture."""
    run = LIFECYCLE_OPS[op]
    template = tmp_path / "template"
    _, versions = _build_lifecycle(template)
    old = _snapshot(template)
    shutil.copytree(template, tmp_path / "complete")
    hits: list[str] = []
    monkeypatch.setattr(store_mod, "_crash_point", hits.append)
    run(ModelStore(tmp_path / "complete", clock=FakeClock(), retention=2), versions)
    new = _snapshot(tmp_path / "complete")
    assert old != new and hits
    for k in range(1, len(hits) + 1):
        root = tmp_path / f"crash-{k}"
        shutil.copytree(template, root)
        store = ModelStore(root, clock=FakeClock(), retention=2)
        seen: list[str] = []

        def point(name: str, seen: list[str] = seen, k: int = k) -> None:
            seen.append(name)
            if len(seen) == k:
                raise SimulatedCrash(name)

        monkeypatch.setattr(store_mod, "_crash_point", point)
        with pytest.raises(SimulatedCrash):
            run(store, versions)
        monkeypatch.setattr(store_mod, "_crash_point", lambda name: None)
        assert _snapshot(root) in (old, new), f"{op} stopped at {seen[-1]} (#{k})"


KILLED_RC = 137 if sys.platform == "win32" else -signal.SIGKILL
CHILD_STEPS = (*CRASH_POINTS, "child.draft_written")


def run_child(
    root: Path, log: Path, start: int, iterations: int, crash_at: str | None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != store_mod.CRASH_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if crash_at is not None:
        env[store_mod.CRASH_ENV] = crash_at
    cmd = [sys.executable, "-m", "tests.store_crash_child", str(root), str(log)]
    return subprocess.run(
        [*cmd, str(start), str(iterations), "--no-fsync"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def read_log(log: Path) -> list[dict[str, Any]]:
    records = []
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by the kill (never happens with small lines, but be exact)
    return records


def matches(actual: Mapping[str, Any], expect: Mapping[str, Any]) -> bool:
    return all(actual.get(key) == value for key, value in expect.items())


def check_store_after_crash(
    root: Path, log: Path, before: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Open the store fresh, the way the daemon starts, and check every promise.

    ``log``: the killed child's record; ``before``: the aliases the previous
    check found (None for a fresh store). Returns the aliases found now.
    """
    events = Recorder()
    store = ModelStore(root, clock=FakeClock(), on_event=events)
    store.cleanup_leftovers()
    kdir = root / S / K
    if kdir.exists():
        leftovers = [
            p.name for p in kdir.iterdir() if p.name.startswith(".tmp-") or p.name.endswith(".tmp")
        ]
        assert leftovers == []
    # Every version directory is complete and verifies.
    assert store.verify(S, K) == []
    aliases = store.aliases(S, K)
    live = {i.version for i in store.versions(S, K)}
    for role, version in aliases.items():
        assert version is None or version in live, (role, version)
    # stages.json was repaired to mirror the aliases.
    stages_path = kdir / "stages.json"
    on_disk = json.loads(stages_path.read_text(encoding="utf-8")) if stages_path.exists() else {}
    for role, version in aliases.items():
        if version is not None:
            assert on_disk[version] == role
    # The state is the one before or after the operation in flight, never a mixture.
    before = before or {"production": None, "previous": None, "shadow": None}
    records = read_log(log) if log.exists() else []
    if not records:
        # Killed during start-up (cleanup_leftovers repairs stages.json): nothing moved.
        assert aliases == before
        return aliases
    assert records[0]["op"] == "ready" and records[0]["aliases"] == before, records[:1]
    done = records[0]["aliases"]
    committed: set[str] = set()
    deleted: set[str] = set()
    inflight: dict[str, Any] | None = None
    for record in records[1:]:
        if record["op"] == "begin":
            inflight = record
        elif record["op"] == "end":
            done = record["aliases"]
            inflight = None
            if record["name"] == "commit":
                committed.add(record["version"])
            deleted.update(record.get("deleted", []))
    if inflight is None or inflight["expect"] is None:
        assert aliases == done, (aliases, done, inflight)
    else:
        assert aliases == done or matches(aliases, inflight["expect"]), (aliases, done, inflight)
        if inflight["name"] == "rollback" and aliases != done:
            assert store.stages(S, K)[inflight["rolled_back"]] == "rejected"
    # Every version the child saw committed is still there, unless it was deleted.
    if inflight is None or inflight["name"] not in ("delete", "retention"):
        assert committed - deleted <= live, committed - deleted - live
    # The daemon can load production.
    resolved = store.resolve(S, K)
    if aliases["production"] is None:
        assert resolved is None
    else:
        assert resolved is not None and resolved.version == aliases["production"]
    assert "integrity_failed" not in events.names()
    return aliases


@pytest.mark.parametrize("step", CHILD_STEPS)
def test_a_crash_at_any_step_leaves_a_loadable_store(tmp_path: Path, step: str) -> None:
    root = tmp_path / "models"
    aliases = None
    for run, count in enumerate((1, 2, 5)):
        log = tmp_path / f"child-{run}.log"
        proc = run_child(root, log, start=run * 100, iterations=40, crash_at=f"{step}:{count}")
        assert proc.returncode == KILLED_RC, (
            f"{step}:{count} was never reached (rc {proc.returncode}): {proc.stderr[-2000:]}"
        )
        aliases = check_store_after_crash(root, log, aliases)


def test_the_store_keeps_working_after_crashes(tmp_path: Path) -> None:
    root = tmp_path / "models"
    aliases = None
    crashes = ("alias.aliases_written:2", "commit.renamed:3", "delete.renamed:1")
    for run, crash_at in enumerate(crashes):
        log = tmp_path / f"child-{run}.log"
        assert run_child(root, log, run * 100, 40, crash_at).returncode == KILLED_RC
        aliases = check_store_after_crash(root, log, aliases)
    log = tmp_path / "child-complete.log"
    proc = run_child(root, log, 1000, 8, None)
    assert proc.returncode == 0, proc.stderr
    assert read_log(log)[-1] == {"op": "done"}
    check_store_after_crash(root, log, aliases)


@pytest.mark.slow
def test_sigkill_at_random_instants_leaves_a_loadable_store(tmp_path: Path) -> None:
    """200 real SIGKILLs at random instants (seeded; the instants still vary with load)."""
    rng = random.Random(20240102)
    root = tmp_path / "models"
    env = {k: v for k, v in os.environ.items() if k != store_mod.CRASH_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    aliases = None
    for run in range(200):
        log = tmp_path / f"child-{run}.log"
        cmd = [sys.executable, "-m", "tests.store_crash_child", str(root), str(log)]
        proc = subprocess.Popen(
            [*cmd, str(run * 100), "1000"], cwd=ROOT, env=env, stderr=subprocess.PIPE
        )
        try:
            if rng.random() < 0.1:
                time.sleep(rng.uniform(0.0, 0.3))  # anywhere, start-up cleanup included
            else:
                # Past start-up, then somewhere in the save/promote/delete loop.
                deadline = time.monotonic() + 60
                while not (log.exists() and log.stat().st_size) and time.monotonic() < deadline:
                    if proc.poll() is not None:
                        break
                    time.sleep(0.002)
                time.sleep(rng.uniform(0.0, 0.4))
            proc.kill()
            _, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == KILLED_RC, stderr.decode(errors="replace")[-2000:]
        aliases = check_store_after_crash(root, log, aliases)
