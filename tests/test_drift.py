"""Feature drift (ml/drift.py): statistics, decision rule, reference files and the targets.

The targets (2,000-row reference, 1,000-row windows, 40 features): same-distribution
windows alarm on at most 5 % of checks, and a 0.5 sd mean shift of 20 % of the
features alarms in at least 95 % of trials. Measured here on 200 and 100 checks with
fixed seeds and the generator of ``bench/drift.py`` (which measures 1,000 / 500).
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.stats import ks_2samp

from bench.drift import KINDS, draw_check, feature_names, sample
from ml.drift import (
    PSI_EPS,
    REFERENCE_FILE,
    DriftReport,
    _autocorrelation_time,
    _is_drifted,
    _ks_pvalue,
    check_drift,
    holm_adjust,
    load_reference,
    population_stability_index,
    save_reference,
)


def _names(n: int) -> list[str]:
    return [f"f{j}" for j in range(n)]


# -- Holm and PSI against hand-computed values ----------------------------------------


def test_holm_adjust_matches_hand_computed_values() -> None:
    # Sorted: 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04;
    # running max: 0.02, 0.03, 0.06, 0.06; back in input order:
    adjusted = holm_adjust([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02], rtol=0, atol=1e-15)


def test_holm_adjust_caps_at_one_and_handles_ties() -> None:
    np.testing.assert_allclose(holm_adjust([0.5, 0.6]), [1.0, 1.0])
    # Ties: 3 x 0.01 = 0.03, 2 x 0.01 = 0.02 -> running max 0.03, then 1 x 0.2.
    np.testing.assert_allclose(holm_adjust([0.01, 0.2, 0.01]), [0.03, 0.2, 0.03])
    assert holm_adjust([]).shape == (0,)
    with pytest.raises(ValueError, match="within"):
        holm_adjust([0.1, float("nan")])


def test_psi_matches_hand_computed_example() -> None:
    # Deciles of 1..10 (numpy 'linear'): 1.9, 2.8, ..., 9.1, one reference value per bin.
    reference = np.arange(1.0, 11.0)
    # Current bins: 4, 2, 1, 1, 1, 0, 0, 0, 0, 1 values out of 10.
    current = np.array([1, 1, 1, 1, 2, 2, 3, 4, 5, 10], dtype=float)
    expected = (
        (0.4 - 0.1) * math.log(0.4 / 0.1)
        + (0.2 - 0.1) * math.log(0.2 / 0.1)
        + 4 * (PSI_EPS - 0.1) * math.log(PSI_EPS / 0.1)  # four empty bins count as eps
    )
    assert population_stability_index(reference, current) == pytest.approx(expected, rel=1e-12)
    assert population_stability_index(reference, reference) == 0.0


def test_psi_collapses_duplicate_edges_of_a_discrete_feature() -> None:
    # Deciles of five 0s and five 1s: 0, 0, 0, 0, 0.5, 1, 1, 1, 1 -> bins <=0, (0, 0.5],
    # (0.5, 1], >1 once collapsed; the reference has 50 % / 0 / 50 % / 0 in them.
    reference = np.array([0.0] * 5 + [1.0] * 5)
    current = np.array([0.0] * 2 + [1.0] * 8)
    expected = (0.2 - 0.5) * math.log(0.2 / 0.5) + (0.8 - 0.5) * math.log(0.8 / 0.5)
    assert population_stability_index(reference, current) == pytest.approx(expected, rel=1e-12)


def test_check_drift_psi_and_ks_are_the_single_feature_statistics() -> None:
    rng = np.random.default_rng(3)
    reference, current, _ = draw_check(rng, shift=True)
    report = check_drift(reference, current, feature_names())
    for j, feature in enumerate(report.features):
        assert feature.psi == pytest.approx(
            population_stability_index(reference[:, j], current[:, j]), rel=1e-12, abs=1e-15
        )
        assert feature.ks_stat == ks_2samp(reference[:, j], current[:, j]).statistic


# -- KS statistic, p-values and autocorrelation ---------------------------------------


def test_ks_statistic_equals_scipy_with_ties_and_non_finite_values() -> None:
    rng = np.random.default_rng(5)
    ref = np.column_stack(
        [rng.normal(size=300), rng.integers(0, 4, 300), rng.standard_t(3, size=300)]
    ).astype(np.float32)
    cur = np.column_stack(
        [rng.normal(0.3, 1, size=170), rng.integers(0, 5, 170), rng.standard_t(3, size=170)]
    ).astype(np.float32)
    ref[:20, 0] = np.nan  # warm-up rows
    cur[5, 1], cur[9, 2], ref[7, 2] = np.inf, -np.inf, np.nan
    report = check_drift(ref, cur, _names(3))
    for j, feature in enumerate(report.features):
        r, c = ref[:, j], cur[:, j]
        expected = ks_2samp(r[np.isfinite(r)], c[np.isfinite(c)]).statistic
        assert feature.ks_stat == expected


def test_ks_pvalue_matches_scipy_asymptotic_for_independent_rows() -> None:
    rng = np.random.default_rng(8)
    for m, n, shift in [(2000, 1000, 0.0), (2000, 1000, 0.15), (200, 100, 0.3), (60, 50, 0.5)]:
        a, b = rng.normal(size=m), rng.normal(shift, 1, size=n)
        scipy_result = ks_2samp(a, b, method="asymp")
        p = _ks_pvalue(np.array([scipy_result.statistic]), np.array([n * 1.0]), np.array([m * 1.0]))
        assert p[0] == pytest.approx(scipy_result.pvalue, rel=0.1, abs=1e-6)


def test_autocorrelation_time_of_repeated_blocks_is_the_block_length() -> None:
    # Each value repeated 10 times: every indicator series has tau = 10 exactly.
    rng = np.random.default_rng(11)
    blocks = np.repeat(rng.normal(size=(4, 200)), 10, axis=1)
    independent = rng.normal(size=(4, 2000))
    thresholds = np.tile([-0.84, 0.0, 0.84], (4, 1))
    assert np.all(np.abs(_autocorrelation_time(blocks, thresholds) - 10) < 2.5)
    assert np.all(_autocorrelation_time(independent, thresholds) < 1.3)
    constant = np.zeros((1, 500))
    assert _autocorrelation_time(constant, np.zeros((1, 3))).tolist() == [1.0]


def test_autocorrelated_unchanged_features_are_not_flagged() -> None:
    """Consecutive AR(1) rows (phi 0.9, tau 19): p-values for independent rows would
    flag many features; the effective sample sizes keep the flags near alpha."""
    kinds = ("ar1",) * 40
    names = feature_names(kinds)
    rng = np.random.default_rng(12)
    flagged = naive_flagged = tested = 0
    for _ in range(10):
        reference = sample(rng, 2000, kinds=kinds, phi=0.9**20)
        current = sample(rng, 1000, kinds=kinds, phi=0.9)
        report = check_drift(reference, current, names)
        ks = np.array([f.ks_stat for f in report.features])
        naive = _ks_pvalue(ks, np.full(40, 1000.0), np.full(40, 2000.0))
        flagged += sum(f.p_value < 0.01 for f in report.features)
        naive_flagged += int((naive < 0.01).sum())
        tested += 40
        assert not report.alarm
    assert flagged / tested <= 0.03
    assert naive_flagged / tested >= 0.2


# -- decision rule and report ---------------------------------------------------------


def test_decision_rule_is_significant_or_large_and_individually_significant() -> None:
    p = np.array([0.001, 0.001, 0.001, 0.02, 0.02, 0.0001])
    adj = np.array([0.04, 0.04, 0.04, 0.5, 0.5, 0.004])
    psi = np.array([0.1, 0.3, 0.25, 0.9, 0.1, 0.01])
    drifted = _is_drifted(p, adj, psi, alpha=0.01, psi_threshold=0.25)
    # not significant family-wise; large + p < alpha; the threshold is inclusive;
    # large but p >= alpha; neither; significant family-wise, whatever the PSI.
    assert drifted.tolist() == [False, True, True, False, False, True]


def test_alarm_when_share_of_drifted_features_reaches_min_share() -> None:
    rng = np.random.default_rng(13)
    reference = rng.normal(size=(2000, 10)).astype(np.float32)
    current = rng.normal(size=(1000, 10)).astype(np.float32)
    current[:, 4] += 2.0
    report = check_drift(reference, current, _names(10), min_share=0.1)
    assert report.drifted_names() == ["f4"]
    assert report.share_drifted == pytest.approx(0.1)
    assert report.alarm
    assert not check_drift(reference, current, _names(10), min_share=0.2).alarm


def test_constant_feature() -> None:
    rng = np.random.default_rng(14)
    reference = np.column_stack([np.full(500, 3.0), rng.normal(size=500)])
    same = np.column_stack([np.full(200, 3.0), rng.normal(size=200)])
    report = check_drift(reference, same, ["flat", "x"])
    flat = report.features[0]
    assert (flat.ks_stat, flat.psi, flat.p_value, flat.drifted) == (0.0, 0.0, 1.0, False)
    moved = same.copy()
    moved[:, 0] = 4.0
    flat = check_drift(reference, moved, ["flat", "x"]).features[0]
    assert flat.ks_stat == 1.0
    assert flat.drifted
    assert math.isfinite(flat.psi) and flat.psi > 5


def test_non_finite_values_are_ignored() -> None:
    rng = np.random.default_rng(15)
    reference, current, _ = draw_check(rng, shift=True)
    names = feature_names()
    base = check_drift(reference, current, names)
    holed = np.vstack([np.full((60, current.shape[1]), np.nan, dtype=np.float32), current])
    holed[100, 3], holed[200, 7] = np.inf, -np.inf
    ref_holed = np.vstack([np.full((30, reference.shape[1]), np.nan, np.float32), reference])
    report = check_drift(ref_holed, holed, names)
    for a, b, j in zip(base.features, report.features, range(len(names)), strict=True):
        if j in (3, 7):  # one value fewer: the statistics move a little
            assert b.ks_stat == pytest.approx(a.ks_stat, abs=2e-3)
            continue
        assert (b.ks_stat, b.psi) == (a.ks_stat, a.psi)
        assert b.p_value == pytest.approx(a.p_value, rel=0.05, abs=1e-9)
    assert report.drifted_names() == base.drifted_names()
    assert (report.n_reference, report.n_current) == (2030, 1060)


def test_feature_with_too_few_rows_is_not_tested() -> None:
    rng = np.random.default_rng(16)
    reference = rng.normal(size=(500, 3))
    current = rng.normal(size=(200, 3))
    current[:, 0] += 5.0  # drifted, but only 49 finite values are left
    current[49:, 0] = np.nan
    current[:, 2] += 5.0
    report = check_drift(reference, current, ["short", "ok", "moved"], min_rows=50)
    short = report.features[0]
    assert not short.tested and not short.drifted
    assert all(math.isnan(v) for v in (short.ks_stat, short.p_value, short.p_adjusted, short.psi))
    assert report.drifted_names() == ["moved"]
    assert report.share_drifted == pytest.approx(0.5)  # of the two tested features
    assert report.as_dict()["n_tested"] == 2


def test_no_testable_feature_means_no_alarm() -> None:
    reference = np.random.default_rng(17).normal(size=(40, 4))
    report = check_drift(reference, reference + 9.0, _names(4))
    assert not report.alarm and report.share_drifted == 0.0
    assert not any(f.tested for f in report.features)
    json.dumps(report.as_dict(), allow_nan=False)


def test_mismatched_columns_or_names_are_refused() -> None:
    ref, cur = np.zeros((100, 3)), np.zeros((100, 4))
    with pytest.raises(ValueError, match="3 feature columns but current has 4"):
        check_drift(ref, cur, _names(3))
    with pytest.raises(ValueError, match="2 feature names for 3 columns"):
        check_drift(ref, ref, _names(2))
    with pytest.raises(ValueError, match="duplicate feature names"):
        check_drift(ref, ref, ["a", "b", "a"])
    with pytest.raises(ValueError, match="2-D"):
        check_drift(ref[:, 0], ref, _names(3))
    with pytest.raises(ValueError, match="alpha"):
        check_drift(ref, ref, _names(3), alpha=0.0)


def test_as_dict_is_json_ready_and_lists_the_top_ten_by_ks() -> None:
    rng = np.random.default_rng(18)
    reference = rng.normal(size=(1000, 30)).astype(np.float32)
    current = rng.normal(size=(500, 30)).astype(np.float32)
    current[:, :14] += np.linspace(0.5, 2.0, 14)  # 14 drifted features, growing shifts
    report = check_drift(reference, current, _names(30))
    summary = report.as_dict()
    json.dumps(summary, allow_nan=False)
    assert summary["alarm"] and summary["n_drifted"] == 14
    assert (summary["n_features"], summary["n_tested"]) == (30, 30)
    assert (summary["n_reference"], summary["n_current"]) == (1000, 500)
    by_ks = sorted((f for f in report.features if f.drifted), key=lambda f: -f.ks_stat)
    assert [d["name"] for d in summary["drifted"]] == [f.name for f in by_ks[:10]]
    assert {f.name for f in by_ks} == {f"f{j}" for j in range(14)}
    assert summary["drifted_not_listed"] == 4
    assert set(summary["drifted"][0]) == {"name", "ks", "p", "p_holm", "psi"}
    assert isinstance(report, DriftReport)


# -- reference files ------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(19)
    X = rng.normal(size=(5000, 3))
    X[:, 2] = np.arange(5000)  # the row index, to see which rows were kept
    X[:30] = np.nan  # warm-up rows hold no finite value: dropped
    X[30:40, 0] = np.nan  # partly finite rows are kept
    name = save_reference(tmp_path, X, ["a", "b", "row"], max_rows=700, seed=1)
    assert name == REFERENCE_FILE
    rows, names = load_reference(tmp_path)
    assert names == ("a", "b", "row")
    assert rows.dtype == np.float32 and rows.shape == (700, 3)
    kept = rows[:, 2].astype(np.int64)
    assert np.all(np.diff(kept) > 0) and kept[0] >= 30  # time order, no empty rows
    gaps = np.diff(kept)
    assert gaps.min() >= 6 and gaps.max() <= 8  # evenly spaced: 4970 rows / 700
    np.testing.assert_array_equal(rows, X[kept].astype(np.float32), strict=False)


def test_save_reference_keeps_every_row_of_a_small_sample(tmp_path: Path) -> None:
    X = np.arange(12, dtype=np.float32).reshape(6, 2)
    save_reference(tmp_path, X, ["a", "b"])
    rows, _ = load_reference(tmp_path)
    np.testing.assert_array_equal(rows, X)


def test_save_reference_is_byte_identical_for_identical_inputs(tmp_path: Path) -> None:
    X = np.random.default_rng(20).normal(size=(3000, 4)).astype(np.float32)
    names = ["w", "x", "y", "z"]
    paths = []
    for sub, seed in (("a", 0), ("b", 0), ("c", 5)):
        (tmp_path / sub).mkdir()
        save_reference(tmp_path / sub, X, names, max_rows=1000, seed=seed)
        paths.append(tmp_path / sub / REFERENCE_FILE)
    first, second, other_seed = (p.read_bytes() for p in paths)
    assert first == second
    assert other_seed != first  # the seed picks the phase of the spacing
    with zipfile.ZipFile(paths[0]) as zf:
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [REFERENCE_FILE]


def test_save_reference_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2 feature names for 3 columns"):
        save_reference(tmp_path, np.zeros((5, 3)), ["a", "b"])
    with pytest.raises(ValueError, match="no finite value"):
        save_reference(tmp_path, np.full((5, 2), np.nan), ["a", "b"])


def _write_npz(path: Path, **arrays: Any) -> None:
    with path.open("wb") as fh:
        np.savez(fh, **arrays)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "no drift reference sample"),
        ("garbage", "unreadable"),
        ("truncated", "unreadable"),
        ("wrong_keys", "missing arrays"),
        ("name_count", "3 feature names for 2 columns"),
        ("float64", "float32"),
        ("pickled_names", "unreadable"),
    ],
)
def test_load_reference_refuses_missing_corrupt_or_mismatched_files(
    tmp_path: Path, case: str, message: str
) -> None:
    path = tmp_path / REFERENCE_FILE
    X = np.zeros((4, 2), dtype=np.float32)
    if case == "garbage":
        path.write_bytes(b"not a zip file at all")
    elif case == "truncated":
        save_reference(tmp_path, X, ["a", "b"])
        path.write_bytes(path.read_bytes()[:150])
    elif case == "wrong_keys":
        _write_npz(path, rows=X, names=np.array(["a", "b"]))
    elif case == "name_count":
        _write_npz(path, X=X, names=np.array(["a", "b", "c"]))
    elif case == "float64":
        _write_npz(path, X=X.astype(np.float64), names=np.array(["a", "b"]))
    elif case == "pickled_names":
        _write_npz(path, X=X, names=np.array(["a", "b"], dtype=object))
    with pytest.raises(ValueError, match=message) as info:
        load_reference(tmp_path)
    assert str(path) in str(info.value)


def test_reference_of_real_features_round_trips_into_a_check(tmp_path: Path) -> None:
    from market_data.synthetic import SyntheticMarket
    from strategy.features import BarColumns, FeatureSpec, compute_features

    spec = FeatureSpec()
    frame = SyntheticMarket(seed=3).generate(4000)
    X = compute_features(spec, BarColumns.from_frame(frame), point=1e-5, default_spread_points=10)
    assert np.isnan(X[0]).all()  # warm-up rows
    save_reference(tmp_path, X[:3000], spec.names)
    reference, names = load_reference(tmp_path)
    assert names == spec.names
    report = check_drift(reference, X[3000:], names)
    assert len(report.features) == len(spec.names)
    assert all(f.tested for f in report.features)
    json.dumps(report.as_dict(), allow_nan=False)


# -- the targets ----------------------------------------------------------------------


def test_same_distribution_alarms_on_at_most_5_percent_of_checks() -> None:
    """Target (a): 200 checks, independent features of every kind plus AR(1) columns."""
    rng = np.random.default_rng(2024)
    names = feature_names()
    alarms = 0
    for _ in range(200):
        reference, current, _ = draw_check(rng, shift=False)
        alarms += check_drift(reference, current, names).alarm
    assert alarms / 200 <= 0.05


def test_half_sd_shift_of_a_fifth_of_the_features_is_detected_in_95_percent() -> None:
    """Target (b): 100 trials, 8 of the 40 features (drawn at random) shifted by 0.5 sd."""
    rng = np.random.default_rng(2025)
    names = feature_names()
    detected = 0
    for _ in range(100):
        reference, current, shifted = draw_check(rng, shift=True)
        assert shifted.sum() == 0.2 * len(KINDS)
        detected += check_drift(reference, current, names).alarm
    assert detected / 100 >= 0.95
