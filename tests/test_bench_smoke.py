"""`python -m bench --quick` runs end to end (a smoke test: no timing is asserted).

The quick mode exercises every benchmark on small inputs so a broken benchmark is
found in CI, not the next time someone wants the real figures.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmarks_run_and_write_every_section(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text(encoding="utf-8")
    assert "Quick (smoke) run" in text
    for title in (
        "## Strategy decision time per bar",
        "## Drift check",
        "## Auto-trainer",
        "## Backtest throughput",
        "## Fault injection",
        "## Soak",
        "## Models: training",
    ):
        assert title in text, title
    assert f"wrote {out}" in done.stdout
