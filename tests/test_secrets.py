"""Credentials never leak, and the journal and model store are private to their owner.

Secrets come only from the environment (``config.settings.ENV_ONLY_KEYS``). A paper
daemon runs with planted ones (broker password and server, HTTP token, a webhook
URL that cannot be reached, so its failure path runs too), and every output is
scanned for them: the daemon's stdout and stderr, every column of every table of
the journal and the raw bytes of its files, ``status``, ``models list|verify|events``
and the errors of deliberately bad configurations.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import pytest

from bench.faults import daemon_env
from ml.store import ModelStore
from utils.clock import FakeClock
from utils.trade_journal import Journal

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "pw-SECRET-5f1c0a"  # noqa: S105 - planted, to be searched for
SERVER = "srv-SECRET-93d2e7"
TOKEN = "tok-SECRET-c41b88"  # noqa: S105 - planted, to be searched for
WEBHOOK = "http://127.0.0.1:9/hooks/xyz-SECRET-7a6e21"
SECRETS = (PASSWORD, SERVER, TOKEN, WEBHOOK, "xyz-SECRET-7a6e21")
POSIX = pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")


def planted(workdir: Path, **extra: str) -> dict[str, str]:
    return daemon_env(
        workdir,
        {
            "SCALPER__BROKER__PASSWORD": PASSWORD,
            "SCALPER__BROKER__SERVER": SERVER,
            "SCALPER__HTTP__TOKEN": TOKEN,
            "SCALPER__ALERTS__WEBHOOK_URL": WEBHOOK,
            # Every disk is "nearly full": an alert goes to the (unreachable) webhook.
            "SCALPER__ALERTS__DISK_FREE_MIN_MB": "1000000000000",
            "SCALPER__LOGGING__LEVEL": "DEBUG",
            **extra,
        },
    )


def leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


def main_py(
    args: list[str], env: Mapping[str, str], timeout_s: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        cwd=ROOT,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def journal_text(path: Path) -> str:
    """Every value of every table, as text; then the raw bytes of the journal's files."""
    conn = sqlite3.connect(path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        parts = []
        for table in tables:
            for row in conn.execute(f'SELECT * FROM "{table}"'):  # noqa: S608 - names from the file
                parts.append(" ".join(map(str, row)))
    finally:
        conn.close()
    assert "trades" in tables and "events" in tables
    for file in path.parent.glob(path.name + "*"):
        parts.append(file.read_bytes().decode("latin-1"))
    return "\n".join(parts)


def test_planted_credentials_appear_in_no_output(tmp_path: Path) -> None:
    port = free_port()
    env = planted(
        tmp_path,
        SCALPER__HTTP__ENABLED="true",
        SCALPER__HTTP__PORT=str(port),
        SCALPER__PAPER__REPLAY_BARS_PER_S="400",
    )
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "run", "--max-bars", "600"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    responses: list[str] = []
    try:
        # While it runs: the HTTP endpoint with no, a wrong and the right token.
        for header in (None, "Bearer wrong", f"Bearer {TOKEN}"):
            for route in ("/health", "/metrics"):
                request = urllib.request.Request(f"http://127.0.0.1:{port}{route}")
                if header:
                    request.add_header("Authorization", header)
                for _ in range(300):  # until it listens (or the run ends)
                    if proc.poll() is not None:
                        break
                    try:
                        with urllib.request.urlopen(request, timeout=5) as reply:  # noqa: S310
                            responses.append(reply.read().decode("utf-8", "replace"))
                        break
                    except urllib.error.HTTPError as exc:
                        responses.append(exc.read().decode("utf-8", "replace"))
                        break
                    except OSError:
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            proc.wait(timeout=0.02)  # not listening yet: poll again
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert "daemon_ready" in err  # the logs were really scanned
    if "http_listening" in err:
        assert len(responses) == 6  # the endpoint answered (and was scanned)
    scanned = {"stdout": out, "stderr": err, "http": "\n".join(responses)}
    journal = tmp_path / "journal.sqlite3"
    scanned["journal"] = journal_text(journal)
    for args in (
        ["status"],
        ["status", "--check"],
        ["models", "list"],
        ["models", "verify"],
        ["models", "events"],
        ["report"],
    ):
        result = main_py(args, env)
        scanned[" ".join(args)] = result.stdout + result.stderr
    report = journal.with_suffix(".html")
    assert report.is_file(), scanned["report"]
    scanned["report html"] = report.read_text(encoding="utf-8")
    for where, text in scanned.items():
        assert leaks(text) == [], f"{where} leaks {leaks(text)}"


@pytest.mark.parametrize(
    ("extra", "config"),
    [
        ({"SCALPER__RISK__MAX_POSITIONS_PER_SYMBOL": "-1"}, None),
        ({"SCALPER__BROKR__KIND": "paper"}, None),
        ({"SCALPER__BROKER__PASSWORD": "x"}, f'[broker]\npassword = "{PASSWORD}"\n'),
        ({}, f'[http]\ntoken = "{TOKEN}"\n'),
        ({}, f'[alerts]\nwebhook_url = "{WEBHOOK}"\n'),
        ({"SCALPER__ALERTS__WEBHOOK_URL": f"ftp://nowhere/{PASSWORD}"}, "[broker]\nport = 0\n"),
    ],
)
def test_errors_of_bad_configurations_never_quote_a_secret(
    tmp_path: Path, extra: dict[str, str], config: str | None
) -> None:
    env = planted(tmp_path, **extra)
    args = ["status"]
    if config is not None:
        path = tmp_path / "settings.toml"
        path.write_text(config, encoding="utf-8")
        args = ["--config", str(path), "status"]
    result = main_py(args, env, timeout_s=60)
    assert result.returncode == 2, result.stderr
    assert leaks(result.stdout + result.stderr) == [], result.stderr


def test_a_malformed_env_only_value_is_not_quoted_back(tmp_path: Path) -> None:
    # An operator who swapped two variables puts the password where the login goes.
    env = planted(tmp_path, SCALPER__BROKER__LOGIN=PASSWORD)
    result = main_py(["status"], env, timeout_s=60)
    assert result.returncode == 2
    assert leaks(result.stderr) == [], result.stderr


# --------------------------------------------------------------------------- permissions


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@POSIX
def test_a_new_journal_and_its_directories_are_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "var" / "scalper" / "journal.sqlite3"
    with Journal(path, clock=FakeClock()) as journal:
        journal.record_event("info", "k", "m").result(30)
        files = [path, *(path.with_name(path.name + s) for s in ("-wal", "-shm"))]
        for file in files:
            assert file.exists() and mode(file) == 0o600, (file, oct(mode(file)))
    assert mode(tmp_path / "var") == 0o700 and mode(tmp_path / "var" / "scalper") == 0o700


@POSIX
def test_the_model_store_creates_owner_only_directories(tmp_path: Path) -> None:
    root = tmp_path / "models"
    store = ModelStore(root, clock=FakeClock())
    draft = store.new_draft_dir("EURUSD", "rf")
    assert mode(draft) == 0o700
    (draft / "model.onnx").write_bytes(b"x")
    info = store.commit_draft(draft, symbol="EURUSD", kind="rf", manifest={})
    for directory in (root, root / "EURUSD", root / "EURUSD" / "rf", info.path):
        assert mode(directory) == 0o700, (directory, oct(mode(directory)))


@POSIX
def test_the_daemon_creates_its_journal_owner_only(tmp_path: Path) -> None:
    env = daemon_env(tmp_path)
    env["SCALPER__STORAGE__JOURNAL_PATH"] = str(tmp_path / "state" / "journal.sqlite3")
    result = main_py(["run", "--max-bars", "50"], env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert mode(tmp_path / "state") == 0o700
    journal = tmp_path / "state" / "journal.sqlite3"
    for file in journal.parent.glob("journal.sqlite3*"):
        assert mode(file) == 0o600, (file, oct(mode(file)))


def test_the_planted_environment_stays_out_of_the_settings_the_daemon_journals(
    tmp_path: Path,
) -> None:
    from config.settings import load_settings

    env = {k: v for k, v in planted(tmp_path).items() if k.startswith("SCALPER__")}
    settings = load_settings(environ=env)
    assert settings.broker.password is not None
    assert settings.broker.password.get_secret_value() == PASSWORD
    text = repr(settings) + str(settings.public_dict()) + str(os.environ.get("NOPE"))
    assert leaks(text) == []
