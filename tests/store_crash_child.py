"""Crash-test child for the model store: saves, promotes, rolls back and deletes until killed.

``python -m tests.store_crash_child ROOT LOG START ITERATIONS [--no-fsync]`` opens the store the
way the daemon does at start-up (``cleanup_leftovers``), then runs ITERATIONS
rounds of the model lifecycle. Before each store operation it appends a "begin"
line to LOG (with the aliases the operation must produce, where they are known),
after it an "end" line with the aliases it left, so the parent can tell after a
kill which state the store must be in. The parent kills it either with
``STORE_CRASH_AT=<step>:<n>`` (deterministic) or with SIGKILL at a random instant.

It imports only ``ml.store`` (and what that imports) and the standard library.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

from ml.store import ModelStore, _crash_point
from utils.clock import FakeClock, iso_utc

SYMBOL = "EURUSD"
KIND = "rf"
RETENTION = 3


def _payload(i: int, j: int, size: int) -> bytes:
    seed = hashlib.sha256(f"{i}:{j}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def _log(out: TextIO, record: dict[str, Any]) -> None:
    # No fsync: a killed process keeps what it wrote in the page cache.
    out.write(json.dumps(record) + "\n")
    out.flush()


def run(root: Path, log_path: Path, start: int, iterations: int) -> None:
    clock = FakeClock()
    clock.advance(start * 3600)
    store = ModelStore(root, clock=clock, retention=RETENTION)
    with open(log_path, "a", encoding="utf-8") as out:
        store.cleanup_leftovers()
        _log(out, {"op": "ready", "aliases": store.aliases(SYMBOL, KIND)})

        def begin(name: str, expect: dict[str, Any] | None, **extra: Any) -> None:
            _log(out, {"op": "begin", "name": name, "expect": expect, **extra})

        def end(name: str, **extra: Any) -> None:
            _log(out, {"op": "end", "name": name, "aliases": store.aliases(SYMBOL, KIND), **extra})

        for i in range(start, start + iterations):
            clock.advance(60)
            begin("commit", None)
            draft = store.new_draft_dir(SYMBOL, KIND)
            (draft / "model.onnx").write_bytes(_payload(i, 0, 256 * 1024))
            (draft / "model.ubj").write_bytes(_payload(i, 1, 4096))
            (draft / "sub").mkdir()
            (draft / "sub" / "scaler.json").write_text(json.dumps({"mean": [i]}), encoding="utf-8")
            _crash_point("child.draft_written")
            info = store.commit_draft(
                draft,
                symbol=SYMBOL,
                kind=KIND,
                manifest={
                    "feature_hash": f"f{i // 5}",
                    "architecture": "forest",
                    "hyperparams": {"depth": i // 3},
                    "trained": iso_utc(clock.now()),
                },
            )
            version = info.version
            end("commit", version=version)

            begin("validate", None, version=version)
            store.set_stage(SYMBOL, KIND, version, "validated")
            end("validate")

            old = store.aliases(SYMBOL, KIND)
            if i % 2 == 0:
                begin("set_shadow", {**old, "shadow": version})
                store.set_shadow(SYMBOL, KIND, version)
                end("set_shadow")

            old = store.aliases(SYMBOL, KIND)
            if i % 3 != 2:
                previous = old["production"] or (
                    old["previous"] if old["previous"] != version else None
                )
                shadow = old["shadow"] if old["shadow"] != version else None
                expect = {"production": version, "previous": previous, "shadow": shadow}
                begin("promote", expect)
                store.promote(SYMBOL, KIND, version)
                end("promote")
            else:
                if old["shadow"] == version:
                    begin("set_shadow", {**old, "shadow": None})
                    store.set_shadow(SYMBOL, KIND, None)
                    end("set_shadow")
                begin("reject", None, version=version)
                store.set_stage(SYMBOL, KIND, version, "rejected")
                end("reject")

            old = store.aliases(SYMBOL, KIND)
            if i % 4 == 3 and old["previous"] is not None:
                expect = {"production": old["previous"], "shadow": old["shadow"]}
                begin("rollback", expect, rolled_back=old["production"])
                store.rollback(SYMBOL, KIND)
                end("rollback")

            if i % 5 == 4:
                aliased = {v for v in store.aliases(SYMBOL, KIND).values() if v}
                spare = [
                    v.version for v in store.versions(SYMBOL, KIND) if v.version not in aliased
                ]
                if spare:
                    begin("delete", None, version=spare[0])
                    store.delete(SYMBOL, KIND, spare[0])
                    end("delete", deleted=[spare[0]])

            begin("retention", None)
            deleted = store.apply_retention(SYMBOL, KIND)
            end("retention", deleted=deleted)
        _log(out, {"op": "done"})


if __name__ == "__main__":
    if "--no-fsync" in sys.argv[5:]:
        # A killed process loses nothing that reached the page cache, so fsync cannot
        # change what the parent finds; skipping it (~4 ms each here) keeps the
        # deterministic crash tests fast. The slow random-kill test keeps it.
        os.fsync = lambda fd: None
    run(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
