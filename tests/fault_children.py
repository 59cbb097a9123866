"""Children for the fault-injection suite: processes that are killed at random instants.

``python -m tests.fault_children store ROOT LOG START`` opens the model store the
way the daemon does at start-up (``cleanup_leftovers``), then saves small model
versions through the real store API in an endless loop (draft, commit, validate,
promote every other one, retention), appending one JSON line to LOG after each
step so the parent can tell, after a kill, what the store must hold.

It imports only ``ml.store`` (the standard library and ``filelock``) and
``utils.clock``: no numpy, no torch, no model code.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from ml.store import ModelStore
from utils.clock import FakeClock, iso_utc

SYMBOL = "EURUSD"
KIND = "rf"
RETENTION = 3


def _payload(i: int, size: int) -> bytes:
    seed = hashlib.sha256(str(i).encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def _log(out: TextIO, record: dict[str, Any]) -> None:
    # No fsync: a killed process keeps what reached the page cache.
    out.write(json.dumps(record) + "\n")
    out.flush()


def store_saver(root: Path, log_path: Path, start: int) -> None:
    clock = FakeClock()
    clock.advance(start * 3600)
    store = ModelStore(root, clock=clock, retention=RETENTION)
    with open(log_path, "a", encoding="utf-8") as out:
        store.cleanup_leftovers()
        _log(out, {"op": "ready", "aliases": store.aliases(SYMBOL, KIND)})
        i = start
        while True:
            clock.advance(60)
            draft = store.new_draft_dir(SYMBOL, KIND)
            # Sizes vary so that kills land inside writes and hashes, not only between them.
            (draft / "model.onnx").write_bytes(_payload(i, 4096 + (i * 7919) % 60_000))
            (draft / "scaler.json").write_text(json.dumps({"mean": [i]}), encoding="utf-8")
            info = store.commit_draft(
                draft,
                symbol=SYMBOL,
                kind=KIND,
                manifest={
                    "feature_hash": "f1",
                    "architecture": "forest",
                    "hyperparams": {"depth": 3},
                    "trained": iso_utc(clock.now()),
                },
            )
            _log(out, {"op": "committed", "version": info.version})
            store.set_stage(SYMBOL, KIND, info.version, "validated")
            if i % 2 == 0:
                _log(out, {"op": "promoting", "version": info.version})
                store.promote(SYMBOL, KIND, info.version)
                _log(out, {"op": "promoted", "version": info.version})
            deleted = store.apply_retention(SYMBOL, KIND)
            _log(out, {"op": "retention", "deleted": deleted})
            i += 1


if __name__ == "__main__":
    if sys.argv[1] == "store":
        store_saver(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
    else:
        raise SystemExit(f"unknown child {sys.argv[1]!r}")
