"""Drift check (``ml/drift.py``): false-alarm rate, detection rate and time per check.

The targets: with a 2,000-row reference and 1,000-row current windows of 40
features, (a) same-distribution windows raise an alarm on at most 5 % of checks,
(b) a 0.5 sd mean shift of 20 % of the features raises one in at least 95 % of
trials. ``tests/test_drift.py`` asserts both on fewer trials with the same
generator (:func:`draw_check`).

The synthetic features are a mix like the real ones: Gaussian, heavy-tailed
(Student t, 3 df), skewed (lognormal), discrete (0..5) and AR(1) columns. Live
windows are consecutive bars, so the AR(1) columns of a window have coefficient
``AR_PHI`` (0.9: an integrated autocorrelation time of 19 bars) while the
reference, an evenly spaced sample of a long training history (one row in
``REFERENCE_STRIDE``), has ``AR_PHI ** REFERENCE_STRIDE``; the "independent rows"
scenarios set ``phi = 0``. Every check draws a fresh reference and window. The
shifted features are drawn at random in each trial; a shift adds half the column's
standard deviation (discrete columns: half a standard deviation of the latent
Gaussian they are rounded from, so they stay on 0..5).

Besides the rule ``check_drift`` applies, the same checks are scored under the two
rules it was chosen against ("Holm-significant AND PSI >= threshold",
"Holm-significant OR PSI >= threshold") and with KS p-values for independent rows
(no effective sample size). A last section runs the check on the project's own
features computed from the synthetic market, where nothing changes but the slow
volatility regimes and the calendar.

``run`` returns plain JSON-ready figures; ``python -m bench.drift [--quick]`` runs
this module alone.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.signal import lfilter

from ml.drift import (
    DriftReport,
    _ks_pvalue,
    check_drift,
    holm_adjust,
    load_reference,
    save_reference,
)

N_REFERENCE = 2_000
N_CURRENT = 1_000
REFERENCE_STRIDE = 20
AR_PHI = 0.9
SHIFT_SD = 0.5
SHIFT_SHARE = 0.2
KINDS: tuple[str, ...] = (
    ("gauss",) * 10 + ("t3",) * 8 + ("lognormal",) * 8 + ("discrete",) * 6 + ("ar1",) * 8
)
TARGET_FALSE_ALARM = 0.05
TARGET_DETECTION = 0.95
# check_drift's defaults, which are the settings' defaults (auto_trainer.drift_*).
ALPHA, PSI_THRESHOLD, MIN_SHARE = 0.01, 0.25, 0.1
CALENDAR = ("tod_sin", "tod_cos", "day_of_week")
RULES = ("shipped", "and", "or", "iid_p")

_LOGNORMAL_SIGMA = 0.75
_DISCRETE_SCALE = 1.2
_SD = {
    "gauss": 1.0,
    "t3": float(np.sqrt(3.0)),
    "lognormal": float(np.sqrt((np.exp(_LOGNORMAL_SIGMA**2) - 1) * np.exp(_LOGNORMAL_SIGMA**2))),
    "discrete": 1.0,  # in units of the latent Gaussian
    "ar1": 1.0,
}


# -- synthetic features --------------------------------------------------------------


def feature_names(kinds: Sequence[str] = KINDS) -> tuple[str, ...]:
    return tuple(f"{kind}_{j}" for j, kind in enumerate(kinds))


def sample(
    rng: np.random.Generator,
    n_rows: int,
    *,
    kinds: Sequence[str] = KINDS,
    phi: float = AR_PHI,
    shifted: np.ndarray | None = None,
) -> np.ndarray:
    """``n_rows`` float32 rows of synthetic features, oldest first; ``shifted`` (bool per
    column) adds ``SHIFT_SD`` standard deviations; ``phi`` is the AR(1) coefficient of
    consecutive rows of the ``ar1`` columns (0: independent rows)."""
    kind_arr = np.asarray(kinds)
    shift = np.zeros(len(kinds)) if shifted is None else SHIFT_SD * np.asarray(shifted, float)
    z = rng.standard_normal((n_rows, len(kinds)))
    out = np.empty((n_rows, len(kinds)))
    for kind in sorted(set(kinds)):  # sorted: the draws must not depend on set order
        cols = np.flatnonzero(kind_arr == kind)
        s = shift[cols] * _SD[kind]
        zc = z[:, cols]
        if kind == "gauss":
            out[:, cols] = zc + s
        elif kind == "t3":
            out[:, cols] = rng.standard_t(3, size=zc.shape) + s
        elif kind == "lognormal":
            out[:, cols] = np.exp(_LOGNORMAL_SIGMA * zc) + s
        elif kind == "discrete":
            out[:, cols] = np.clip(np.round(2.0 + _DISCRETE_SCALE * (zc + s)), 0, 5)
        elif kind == "ar1":
            out[:, cols] = _ar1(zc, phi) + s
        else:
            raise ValueError(f"unknown synthetic feature kind {kind!r}")
    return out.astype(np.float32)


def _ar1(innovations: np.ndarray, phi: float) -> np.ndarray:
    """Unit-variance stationary AR(1) down the rows, started from its stationary law."""
    scale = float(np.sqrt(1.0 - phi * phi))
    e = innovations.copy()
    e[0] /= scale
    out: np.ndarray = lfilter([scale], [1.0, -phi], e, axis=0)
    return out


def draw_check(
    rng: np.random.Generator, *, phi: float = AR_PHI, shift: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One check: (reference, current window, shifted-columns mask)."""
    shifted = np.zeros(len(KINDS), dtype=bool)
    if shift:
        shifted[rng.choice(len(KINDS), round(SHIFT_SHARE * len(KINDS)), replace=False)] = True
    reference = sample(rng, N_REFERENCE, phi=phi**REFERENCE_STRIDE)
    current = sample(rng, N_CURRENT, phi=phi, shifted=shifted)
    return reference, current, shifted


# -- measurement ---------------------------------------------------------------------


def rule_alarms(report: DriftReport) -> dict[str, bool]:
    """The alarm under the shipped rule and under the alternatives it was chosen over."""
    tested = [f for f in report.features if f.tested]
    if not tested:
        return dict.fromkeys(RULES, False)
    adj = np.array([f.p_adjusted for f in tested])
    psi = np.array([f.psi for f in tested])
    ks = np.array([f.ks_stat for f in tested])
    big = psi >= PSI_THRESHOLD
    iid_p = _ks_pvalue(ks, np.full(ks.size, report.n_current), np.full(ks.size, report.n_reference))
    flags = {
        "shipped": np.array([f.drifted for f in tested]),
        "and": (adj < ALPHA) & big,
        "or": (adj < ALPHA) | big,
        "iid_p": (holm_adjust(iid_p) < ALPHA) | (big & (iid_p < ALPHA)),
    }
    return {rule: bool(f.mean() >= MIN_SHARE) for rule, f in flags.items()}


def run_scenario(name: str, checks: int, *, phi: float, shift: bool, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    kinds = np.asarray(KINDS)
    names = feature_names()
    alarms = {rule: 0 for rule in RULES}
    flagged = {kind: [0, 0] for kind in sorted(set(KINDS))}
    check_ms: list[float] = []
    for _ in range(checks):
        reference, current, shifted = draw_check(rng, phi=phi, shift=shift)
        t0 = time.perf_counter()
        report = check_drift(reference, current, names)
        check_ms.append((time.perf_counter() - t0) * 1e3)
        for rule, alarm in rule_alarms(report).items():
            alarms[rule] += alarm
        drifted = np.array([f.drifted for f in report.features])
        counted = shifted if shift else np.ones(len(KINDS), dtype=bool)
        for kind, tally in flagged.items():
            sel = counted & (kinds == kind)
            tally[0] += int(drifted[sel].sum())
            tally[1] += int(sel.sum())
    return {
        "name": name,
        "checks": checks,
        "phi": phi,
        "shift": shift,
        "alarm_rate": {rule: n / checks for rule, n in alarms.items()},
        # Share of features flagged: all of them without a shift, the shifted ones with.
        "flag_rate_by_kind": {k: (a / b if b else None) for k, (a, b) in flagged.items()},
        "check_ms": check_ms,
    }


def run_market(*, quick: bool) -> dict[str, Any]:
    """The reference from the first bars of the synthetic market, then checks of the
    following non-overlapping 1000-bar windows: all features, and without the calendar."""
    from market_data.synthetic import SyntheticMarket
    from strategy.features import BarColumns, FeatureSpec, compute_features

    train_bars, windows = (10_000, 5) if quick else (40_000, 40)
    spec = FeatureSpec()
    frame = SyntheticMarket(seed=7).generate(train_bars + windows * N_CURRENT)
    X = compute_features(spec, BarColumns.from_frame(frame), point=1e-5, default_spread_points=10)
    with tempfile.TemporaryDirectory() as tmp:
        save_reference(Path(tmp), X[:train_bars], spec.names)
        reference, names = load_reference(Path(tmp))
    keep = [j for j, name in enumerate(names) if name not in CALENDAR]
    variants = {"all": list(range(len(names))), "no_calendar": keep}
    alarms = {v: dict.fromkeys(RULES, 0) for v in variants}
    drifted_in: dict[str, int] = {}
    for w in range(windows):
        current = X[train_bars + w * N_CURRENT : train_bars + (w + 1) * N_CURRENT]
        for variant, cols in variants.items():
            report = check_drift(reference[:, cols], current[:, cols], [names[j] for j in cols])
            for rule, alarm in rule_alarms(report).items():
                alarms[variant][rule] += alarm
            if variant == "all":
                for name in report.drifted_names():
                    drifted_in[name] = drifted_in.get(name, 0) + 1
    return {
        "train_bars": train_bars,
        "windows": windows,
        "n_features": len(names),
        "alarm_rate": {v: {r: n / windows for r, n in a.items()} for v, a in alarms.items()},
        "most_drifted": sorted(drifted_in.items(), key=lambda kv: (-kv[1], kv[0]))[:8],
    }


def run(quick: bool) -> dict[str, Any]:
    """Measure everything; print the summary lines; return JSON-ready figures."""
    null_checks, shift_checks = (100, 50) if quick else (1_000, 500)
    ar = f"AR(1) phi={AR_PHI}"
    scenarios = [
        run_scenario(
            "same distribution, independent rows", null_checks, phi=0.0, shift=False, seed=1
        ),
        run_scenario(f"same distribution, {ar}", null_checks, phi=AR_PHI, shift=False, seed=2),
        run_scenario(
            "0.5 sd shift of 20 %, independent rows", shift_checks, phi=0.0, shift=True, seed=3
        ),
        run_scenario(f"0.5 sd shift of 20 %, {ar}", shift_checks, phi=AR_PHI, shift=True, seed=4),
    ]
    all_ms = np.concatenate([s["check_ms"] for s in scenarios])
    results: dict[str, Any] = {
        "quick": quick,
        "scenarios": scenarios,
        "check_ms_p50": float(np.median(all_ms)),
        "check_ms_p99": float(np.percentile(all_ms, 99)),
        "market": run_market(quick=quick),
    }
    for line in summary_lines(results):
        print(line)
    return results


# -- rendering -----------------------------------------------------------------------


def _met(s: dict[str, Any]) -> bool:
    rate = s["alarm_rate"]["shipped"]
    return bool(rate >= TARGET_DETECTION if s["shift"] else rate <= TARGET_FALSE_ALARM)


def _target(s: dict[str, Any]) -> str:
    if s["shift"]:
        return f"alarm in >= {TARGET_DETECTION:.0%} of trials"
    return f"alarm in <= {TARGET_FALSE_ALARM:.0%} of checks"


def summary_lines(r: dict[str, Any]) -> list[str]:
    lines = [
        f"drift {s['name']:<42} alarm {s['alarm_rate']['shipped']:6.1%} of {s['checks']:>5} "
        f"({'MET' if _met(s) else 'NOT MET'})"
        for s in r["scenarios"]
    ]
    m = r["market"]["alarm_rate"]
    lines.append(
        f"drift check time      p50 {r['check_ms_p50']:5.1f} ms  p99 {r['check_ms_p99']:5.1f} ms; "
        f"synthetic market: alarm {m['all']['shipped']:.0%} of windows "
        f"({m['no_calendar']['shipped']:.0%} without calendar features)"
    )
    return lines


def render(r: dict[str, Any]) -> str:
    kinds = sorted(set(KINDS))
    lines = [
        "## Drift check (`bench/drift.py`)",
        "",
        f"`check_drift` with its defaults (alpha {ALPHA}, PSI threshold {PSI_THRESHOLD}, "
        f"min share {MIN_SHARE}): {N_REFERENCE:,}-row reference, {N_CURRENT:,}-row windows, "
        f"{len(KINDS)} synthetic features ({', '.join(f'{KINDS.count(k)} {k}' for k in kinds)}); "
        f"AR(1) columns: phi {AR_PHI} in the window, phi^{REFERENCE_STRIDE} in the reference "
        "(an evenly spaced sample of training). A fresh reference and window per check.",
        "",
        "| scenario | checks | alarm rate | target | result | AND rule | OR rule | "
        "independent-rows p |",
        "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: |",
    ]
    for s in r["scenarios"]:
        a = s["alarm_rate"]
        lines.append(
            f"| {s['name']} | {s['checks']:,} | {a['shipped']:.1%} | {_target(s)} | "
            f"**{'MET' if _met(s) else 'NOT MET'}** | {a['and']:.1%} | {a['or']:.1%} | "
            f"{a['iid_p']:.1%} |"
        )
    lines += [
        "",
        "*AND rule*: drifted = Holm-significant and PSI >= threshold; *OR rule*: "
        "Holm-significant or PSI >= threshold; *independent-rows p*: the shipped rule with "
        "KS p-values that ignore autocorrelation. Share of features flagged as drifted "
        "(without a shift: all features, i.e. false flags; with one: the shifted features):",
        "",
        "| scenario | " + " | ".join(kinds) + " |",
        "| --- | " + " | ".join("---:" for _ in kinds) + " |",
    ]
    for s in r["scenarios"]:
        rates = s["flag_rate_by_kind"]
        cells = " | ".join("-" if rates[k] is None else f"{rates[k]:.1%}" for k in kinds)
        lines.append(f"| {s['name']} | {cells} |")
    m = r["market"]
    a_all, a_cal = m["alarm_rate"]["all"], m["alarm_rate"]["no_calendar"]
    top = ", ".join(f"{name} ({n})" for name, n in m["most_drifted"]) or "none"
    lines += [
        "",
        f"Time per check ({len(KINDS)} features): p50 {r['check_ms_p50']:.1f} ms, "
        f"p99 {r['check_ms_p99']:.1f} ms.",
        "",
        f"The project's {m['n_features']} features on the synthetic market (reference: "
        f"`save_reference` of the first {m['train_bars']:,} bars; then {m['windows']} "
        "consecutive 1,000-bar windows; the market is stationary apart from volatility "
        "regimes of hours to days):",
        "",
        "| features | shipped rule | AND rule | OR rule | independent-rows p |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| all | {a_all['shipped']:.0%} | {a_all['and']:.0%} | {a_all['or']:.0%} | "
        f"{a_all['iid_p']:.0%} |",
        f"| without {', '.join(CALENDAR)} | {a_cal['shipped']:.0%} | {a_cal['and']:.0%} | "
        f"{a_cal['or']:.0%} | {a_cal['iid_p']:.0%} |",
        "",
        f"Most often drifted (windows, all features): {top}. A window shorter than a week "
        "cannot match the reference's calendar, so the caller should leave the calendar "
        "features out.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(run(quick="--quick" in sys.argv[1:])))
