"""Runs every benchmark and rewrites BENCHMARKS.md with the figures.

``python -m bench`` measures at the sizes the targets are stated for;
``python -m bench --quick`` is a smoke run (CI): it runs everything on small
inputs and asserts no timings. Figures are wall-clock on a shared machine:
compare variants measured in the same run, not across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np

from bench import autotrain, backtest, decision, drift, faults, models, soak

ROOT = Path(__file__).resolve().parent.parent


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):  # no /proc on Windows: keep platform's answer
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} logical CPUs"


def _versions() -> str:
    names = [
        "numpy",
        "pandas",
        "pydantic-settings",
        "structlog",
        "onnxruntime",
        "scikit-learn",
        "xgboost",
        "torch",
    ]
    parts = [f"Python {platform.python_version()}"]
    for name in names:
        # xgboost ships as "xgboost" or, without the CUDA dependencies, "xgboost-cpu".
        for dist in (name, f"{name}-cpu"):
            try:
                parts.append(f"{dist} {metadata.version(dist)}")
                break
            except metadata.PackageNotFoundError:
                continue
        else:
            parts.append(f"{name} (not installed)")
    return ", ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run (CI)")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    command = "python -m bench" + (" --quick" if args.quick else "")
    sections: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        results = asyncio.run(decision.run(Path(tmp), quick=args.quick))
        sections.append(decision.render(results))
        for line in decision.summary_lines(results):
            print(line)
        sections.append(drift.render(drift.run(quick=args.quick)))  # run() prints its lines
        auto = asyncio.run(autotrain.run(Path(tmp) / "autotrain-bench", quick=args.quick))
        sections.append(autotrain.render(auto))
        for line in autotrain.summary_lines(auto):
            print(line)
        seed = 20240607
        store_kills, daemon_kills = faults.run(
            Path(tmp) / "faults",
            store_n=20 if args.quick else 200,
            daemon_n=6 if args.quick else 25,
            seed=seed,
        )
        sections.append(faults.render(store_kills, daemon_kills, seed=seed))
        for line in faults.summary_lines(store_kills, daemon_kills):
            print(line)
        soaked = soak.run(Path(tmp) / "soak", quick=args.quick)
        sections.append(soak.render(soaked))
        for line in soak.summary_lines(soaked):
            print(line)
        section = backtest.run(args.quick)
        sections.append(section)
        print(section.split("### Throughput", 1)[0].strip())
        # Last: its naive variant imports scikit-learn, xgboost and torch into this process.
        model_results = asyncio.run(models.run(Path(tmp) / "models-bench", quick=args.quick))
        sections.append(models.render(model_results))
        for line in models.summary_lines(model_results):
            print(line)
        elapsed = time.perf_counter() - t0
    header = [
        "# Benchmarks",
        "",
        f"Written by `{command}` on {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} "
        f"({elapsed:.1f} s).",
        "",
        f"- Machine: {_machine()}",
        f"- Libraries: {_versions()}",
        "- Wall-clock figures on a shared machine: compare rows of one run, not runs.",
        "- Commands: `python -m bench` (full sizes, the figures below mean something) and "
        "`python -m bench --quick` (smoke run for CI, small sizes); both rewrite this file.",
        "",
    ]
    if args.quick:
        header.insert(
            3, "**Quick (smoke) run: sizes are too small for the figures to mean much.**\n"
        )
    args.out.write_text("\n".join(header + sections) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
