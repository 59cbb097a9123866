"""Feature drift: are recent live feature rows still distributed like the training rows?

Each trained version stores a reference sample of its training features
(:func:`save_reference`, ``reference.npz``); the daemon periodically compares the
feature rows of recent bars with it (:func:`check_drift`) and retrains on an alarm.
numpy and scipy only, no side effects besides the two file functions.

**Per feature** (non-finite values ignored, column by column):

- *Significance*: the two-sample Kolmogorov-Smirnov statistic ``D``, exactly as
  ``scipy.stats.ks_2samp`` computes it (ties included; the tests compare the two),
  with a p-value from the asymptotic Kolmogorov distribution at the *effective*
  sample sizes (below): ``Q((sqrt(e) + 0.12 + 0.11 / sqrt(e)) * D)`` with
  ``e = n_eff * m_eff / (n_eff + m_eff)`` (Stephens' small-sample correction; within
  a few per cent of ``ks_2samp``'s asymptotic p for independent rows). ``ks_2samp``
  itself is not called: its p-value assumes independent rows, and one call costs
  about 1 ms per feature where the whole check of 40 features takes about 10 ms.
  For discrete features the p-value is conservative, as KS p-values are. Then
  Holm's step-down adjustment across the tested features, so the chance that any
  feature is flagged by significance alone when nothing changed is at most ``alpha``.
- *Magnitude*: the population stability index over 10 bins cut at the
  reference's deciles. Duplicate edges (discrete or constant features) leave bins
  that are empty on both sides; those contribute exactly 0, which is the same as
  collapsing the edges. Empty bins count as ``PSI_EPS`` so the index stays finite.

**Decision rule.** A tested feature is *drifted* when

    Holm-adjusted p < alpha                                  (significant, family-wise)
    or (PSI >= psi_threshold and unadjusted p < alpha)       (large, and significant alone)

and the report raises an *alarm* when the drifted features are at least
``min_share`` of the tested ones. Why not "significant AND PSI >= 0.25": a 0.5 sd
mean shift of a Gaussian feature has a decile PSI of 0.24, so that rule misses
about half of the shifts the detection target asks to catch. Why not "significant
OR PSI >= 0.25": PSI knows nothing of sample size, and a feature that moves slowly
(a 60-bar volatility) has only a handful of independent values in a 1000-bar
window, so its PSI alone exceeds 0.25 on most windows of an unchanged market.
Requiring the unadjusted KS p-value of the same feature (at its effective size)
keeps that branch at a false-positive rate of about ``alpha`` per feature, while
still letting a large change of a slow feature count where Holm's correction
would be too strict for its small effective size. ``bench/drift.py`` measures
all three rules on synthetic features and on the synthetic market.

**Consecutive bars are not independent.** The live window holds consecutive
bars and many features are moving-window statistics, so the rows are strongly
autocorrelated; a KS p-value computed for ``n`` independent rows would flag such
features on most windows. Each sample's size is therefore divided by its
integrated autocorrelation time ``tau = 1 + 2 * sum(rho_k)``, estimated from the
centred indicator series ``1{x <= q}`` at the reference's 20/50/80 % quantiles
(what the KS statistic is made of; this also catches volatility clustering of
returns, which leaves the values themselves uncorrelated), with Sokal's
automatic window (the smallest ``M >= 5 * tau(M)``, lags up to a quarter of the
sample), clipped to ``[1, n]``. For the reference this is measured on the
stored order: :func:`save_reference` keeps an evenly spaced sample in time
order for that reason. Known limit: a feature whose memory is comparable to the
window (tau above about n / 20) gets an underestimated tau, so keep the window
long against the longest feature window. Features that are not random at all
over a window, such as the time of day over less than a day, should be left out
by the caller.

Fewer than ``min_rows`` finite values in either sample leave a feature untested
(its statistics are NaN, it is not drifted, it does not count in the share);
with no tested feature there is no alarm.
"""

from __future__ import annotations

import io
import math
import os
import uuid
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.fft
from scipy.stats import kstwobign

__all__ = [
    "PSI_BINS",
    "PSI_EPS",
    "REFERENCE_FILE",
    "DriftReport",
    "FeatureDrift",
    "check_drift",
    "holm_adjust",
    "load_reference",
    "population_stability_index",
    "save_reference",
]

REFERENCE_FILE = "reference.npz"
PSI_BINS = 10
PSI_EPS = 1e-4

_REFERENCE_KEYS = ("X", "names")
# Fixed zip metadata: the file is hashed into the version's manifest, so two runs on
# the same data must write the same bytes (np.savez stamps the current local time).
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_ZIP_SYSTEM = 3  # "Unix", whatever the writing OS
_ZIP_MODE = 0o644 << 16
# Autocorrelation time: quantiles whose indicators are analysed, Sokal's window
# constant, and the longest lag as a fraction of the sample.
_TAU_QUANTILES = (0.2, 0.5, 0.8)
_SOKAL_C = 5.0
_MAX_LAG_FRACTION = 4
_CHUNK = 8  # features per vectorised step
_AS_DICT_TOP = 10


# -- reference sample ---------------------------------------------------------------


def save_reference(
    directory: Path, X: np.ndarray, names: Sequence[str], *, max_rows: int = 2000, seed: int = 0
) -> str:
    """Write an evenly spaced sample of the rows of ``X`` to ``directory/REFERENCE_FILE``.

    Rows with no finite value are dropped first; if more than ``max_rows`` remain,
    ``max_rows`` of them are kept at evenly spaced positions, in their original
    order (the drift check estimates the sample's autocorrelation from that order),
    starting at a phase drawn from ``seed``. The file is a ``.npz`` without pickles
    (``X`` as little-endian float32, ``names`` as unicode) and its bytes depend only
    on the inputs. Returns the file name, relative to ``directory``.
    """
    rows = np.asarray(X)
    names = tuple(names)
    if rows.ndim != 2:
        raise ValueError(f"reference rows must be a 2-D array (got shape {rows.shape})")
    _check_names(names, rows.shape[1], "reference rows")
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1 (got {max_rows})")
    rows = rows.astype("<f4")
    rows = rows[np.isfinite(rows).any(axis=1)]
    if rows.shape[0] == 0:
        raise ValueError("reference rows hold no finite value: nothing to save")
    n = rows.shape[0]
    if n > max_rows:
        phase = float(np.random.default_rng(seed).random())
        picks = np.floor((np.arange(max_rows) + phase) * (n / max_rows)).astype(np.int64)
        rows = rows[np.minimum(picks, n - 1)]
    arrays = {
        "X": np.ascontiguousarray(rows),
        "names": np.asarray(names, dtype=f"<U{max(1, *(len(s) for s in names))}"),
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in _REFERENCE_KEYS:
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE)
            info.create_system = _ZIP_SYSTEM
            info.external_attr = _ZIP_MODE
            payload = io.BytesIO()
            np.lib.format.write_array(payload, arrays[key], allow_pickle=False)
            zf.writestr(info, payload.getvalue())
    directory = Path(directory)
    path = directory / REFERENCE_FILE
    tmp = directory / f".{REFERENCE_FILE}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(buffer.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return REFERENCE_FILE


def load_reference(directory: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    """Read the reference sample written by :func:`save_reference`: (rows, names)."""
    path = Path(directory) / REFERENCE_FILE
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in _REFERENCE_KEYS if k not in data.files]
            if missing:
                raise ValueError(f"missing arrays {missing} (has {sorted(data.files)})")
            rows = data["X"]
            raw_names = data["names"]
    except FileNotFoundError:
        raise ValueError(
            f"{path}: no drift reference sample (versions trained before drift checks "
            "have none; retrain to create one)"
        ) from None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: unreadable drift reference sample ({exc})") from exc
    if rows.ndim != 2 or rows.dtype != np.float32:
        raise ValueError(
            f"{path}: X must be a 2-D float32 array (got {rows.dtype} of shape {rows.shape})"
        )
    if raw_names.ndim != 1 or raw_names.dtype.kind != "U":
        raise ValueError(f"{path}: names must be a 1-D unicode array (got {raw_names.dtype})")
    names = tuple(str(s) for s in raw_names)
    try:
        _check_names(names, rows.shape[1], "X")
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return rows, names


def _check_names(names: tuple[str, ...], n_columns: int, what: str) -> None:
    if len(names) != n_columns:
        raise ValueError(f"{len(names)} feature names for {n_columns} columns of {what}")
    if n_columns == 0:
        raise ValueError(f"{what} have no feature columns")
    dupes = sorted({s for s in names if names.count(s) > 1})
    if dupes:
        raise ValueError(f"duplicate feature names {dupes}")


# -- statistics ---------------------------------------------------------------------


def holm_adjust(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control), in input order.

    With ``p_(1) <= ... <= p_(k)``: ``adj_(i) = max_{j <= i} min(1, (k - j + 1) p_(j))``;
    rejecting every hypothesis whose adjusted p is below ``alpha`` is Holm's test.
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"p-values must be 1-D (got shape {p.shape})")
    if np.any(~np.isfinite(p) | (p < 0) | (p > 1)):
        raise ValueError("p-values must be finite and within [0, 1]")
    k = p.size
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate((k - np.arange(k)) * p[order])
    out = np.empty(k)
    out[order] = np.minimum(stepped, 1.0)
    return out


def population_stability_index(reference: np.ndarray, current: np.ndarray) -> float:
    """PSI of one feature, as :func:`check_drift` computes it: ``sum((c - r) * ln(c / r))``
    over ``PSI_BINS`` bins cut at the reference's quantiles ``1/10 .. 9/10`` (numpy's
    default 'linear' method; a value on an edge goes to the lower bin), bin shares
    below ``PSI_EPS`` counted as ``PSI_EPS``. Non-finite values are ignored."""
    ref_sorted, m = _sorted_finite(np.asarray(reference, dtype=np.float64).reshape(1, -1))
    cur_sorted, n = _sorted_finite(np.asarray(current, dtype=np.float64).reshape(1, -1))
    if not (m[0] and n[0]):
        raise ValueError("PSI needs at least one finite value on each side")
    edges = _quantiles(ref_sorted, m, np.arange(1, PSI_BINS) / PSI_BINS)
    return float(_psi(ref_sorted, m, cur_sorted, n, edges)[0])


@dataclass(frozen=True)
class _Compared:
    """Per-feature statistics of two samples: KS statistic, PSI, and each sample's
    finite count and autocorrelation time."""

    ks: np.ndarray
    psi: np.ndarray
    m: np.ndarray
    n: np.ndarray
    tau_ref: np.ndarray
    tau_cur: np.ndarray


def _compare(ref_t: np.ndarray, cur_t: np.ndarray) -> _Compared:
    """The statistics of each row pair (features along the first axis, rows in time order
    along the second), computed together: they share the sorted samples and the deciles."""
    ref_sorted, m = _sorted_finite(ref_t)
    cur_sorted, n = _sorted_finite(cur_t)
    edges = _quantiles(ref_sorted, m, np.arange(1, PSI_BINS) / PSI_BINS)
    picks = [round(q * PSI_BINS) - 1 for q in _TAU_QUANTILES]
    return _Compared(
        ks=_ks_statistics(ref_sorted, m, cur_sorted, n),
        psi=_psi(ref_sorted, m, cur_sorted, n, edges),
        m=m,
        n=n,
        tau_ref=_autocorrelation_time(ref_t, edges[:, picks]),
        tau_cur=_autocorrelation_time(cur_t, edges[:, picks]),
    )


def _sorted_finite(x_t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row sorted with its non-finite values turned into +inf (so they come last),
    and the number of finite values per row."""
    ok = np.isfinite(x_t)
    return np.sort(np.where(ok, x_t, np.inf), axis=1), ok.sum(axis=1)


def _chunks(n_rows: int) -> list[slice]:
    # A few features at a time: the temporaries stay small enough for the allocator to
    # reuse them; one pass over 40 features costs about twice as long in page faults.
    return [slice(lo, lo + _CHUNK) for lo in range(0, n_rows, _CHUNK)]


def _ks_statistics(
    ref_sorted: np.ndarray, m: np.ndarray, cur_sorted: np.ndarray, n: np.ndarray
) -> np.ndarray:
    """Two-sample KS statistic per row of two row-sorted samples whose first ``m`` (``n``)
    values are finite, as ``scipy.stats.ks_2samp`` computes it: the largest gap between
    the empirical CDFs over the pooled values, exactly (as a multiple of 1/lcm(m, n))."""
    out = np.empty(len(m))
    width = ref_sorted.shape[1]
    for rows in _chunks(len(m)):
        pooled = np.concatenate([ref_sorted[rows], cur_sorted[rows]], axis=1)
        order = np.argsort(pooled, axis=1, kind="stable")  # merges two sorted runs: linear
        values = np.take_along_axis(pooled, order, axis=1)
        # The non-finite values (+inf here) come last, so they change no count before them.
        below_ref = np.cumsum(order < width, axis=1)
        below_cur = np.arange(1, pooled.shape[1] + 1) - below_ref
        # Equal values may sit in any order: read the CDFs after the last copy of each.
        last = np.ones(values.shape, dtype=bool)
        np.not_equal(values[:, 1:], values[:, :-1], out=last[:, :-1])
        last &= np.isfinite(values)
        lcm = np.lcm(m[rows], n[rows])
        gaps = below_ref * (lcm // m[rows])[:, None] - below_cur * (lcm // n[rows])[:, None]
        out[rows] = np.where(last, np.abs(gaps), 0).max(axis=1) / lcm
    return out


def _count_at_or_below(sorted_t: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """How many values of each row are <= each of the row's edges (+inf never is)."""
    out = np.empty(edges.shape, dtype=np.int64)
    for j in range(len(edges)):  # a binary search per row beats comparing every value
        out[j] = np.searchsorted(sorted_t[j], edges[j], side="right")
    return out


def _psi(
    ref_sorted: np.ndarray, m: np.ndarray, cur_sorted: np.ndarray, n: np.ndarray, edges: np.ndarray
) -> np.ndarray:
    """PSI per row, the bins cut at ``edges`` (a value on an edge goes to the lower bin).
    A duplicate edge leaves a bin empty on both sides, which adds exactly 0."""
    r = np.diff(_count_at_or_below(ref_sorted, edges), prepend=0, append=m[:, None])
    c = np.diff(_count_at_or_below(cur_sorted, edges), prepend=0, append=n[:, None])
    r_share = np.maximum(r / m[:, None], PSI_EPS)
    c_share = np.maximum(c / n[:, None], PSI_EPS)
    psi: np.ndarray = np.sum((c_share - r_share) * np.log(c_share / r_share), axis=1)
    return psi


def _quantiles(sorted_t: np.ndarray, counts: np.ndarray, q: np.ndarray) -> np.ndarray:
    """numpy's default ('linear') quantiles, in float64, of each row of ``sorted_t``
    whose first ``counts[j]`` values are its sorted finite ones. Returns (rows, len(q))."""
    h = (counts[:, None] - 1) * q[None, :]
    lo = np.floor(h).astype(np.int64)
    hi = np.minimum(lo + 1, counts[:, None] - 1)
    a = np.take_along_axis(sorted_t, lo, axis=1).astype(np.float64)
    b = np.take_along_axis(sorted_t, hi, axis=1).astype(np.float64)
    out: np.ndarray = a + (h - lo) * (b - a)
    return out


def _autocorrelation_time(values_t: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Integrated autocorrelation time of each row of ``values_t`` (features, time).

    Estimated from the indicator series ``1{x_t <= threshold}`` for each of the row's
    ``thresholds`` (features, q): their centred autocovariances (a non-finite value
    counts as the mean) are summed over the thresholds and windowed after Sokal.
    """
    p, n = values_t.shape
    max_lag = max(n // _MAX_LAG_FRACTION, 1)
    # Zero padding to n + max_lag keeps the lags we read free of the circular wrap.
    size = scipy.fft.next_fast_len(n + max_lag, real=True)
    acov = np.empty((p, max_lag + 1))
    for rows in _chunks(p):
        x = values_t[rows]
        ok = np.isfinite(x)
        z = (x[:, None, :] <= thresholds[rows, :, None]).astype(np.float32)
        z -= (z.sum(axis=2) / np.maximum(ok.sum(axis=1), 1)[:, None])[:, :, None]
        if not ok.all():
            z *= ok[:, None, :]
        spectrum = scipy.fft.rfft(z, n=size, axis=2)
        # Summing the power spectra over the thresholds sums their autocovariances.
        power = (spectrum.real**2 + spectrum.imag**2).sum(axis=1)
        acov[rows] = scipy.fft.irfft(power, n=size, axis=1)[:, : max_lag + 1]
    counts = np.maximum(np.isfinite(values_t).sum(axis=1), 1).astype(np.float64)
    var = acov[:, 0]
    varying = var > 1e-9 * counts  # a constant series has no autocorrelation to speak of
    rho = acov[:, 1:] / np.where(varying, var, 1.0)[:, None]
    tau_m = 1.0 + 2.0 * np.cumsum(rho, axis=1)
    window_ok = np.arange(1, max_lag + 1)[None, :] >= _SOKAL_C * tau_m
    first = np.where(window_ok.any(axis=1), window_ok.argmax(axis=1), max_lag - 1)
    tau = np.take_along_axis(tau_m, first[:, None], axis=1)[:, 0]
    out: np.ndarray = np.clip(np.where(varying, tau, 1.0), 1.0, counts)
    return out


def _ks_pvalue(d: np.ndarray, n_eff: np.ndarray, m_eff: np.ndarray) -> np.ndarray:
    en = np.sqrt(n_eff * m_eff / (n_eff + m_eff))
    p: np.ndarray = kstwobign.sf((en + 0.12 + 0.11 / en) * d)
    return np.clip(p, 0.0, 1.0)


# -- the check ----------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureDrift:
    """One feature's comparison. Untested features (too few finite rows) carry NaN."""

    name: str
    ks_stat: float
    p_value: float  # KS p-value at the effective sample sizes
    p_adjusted: float  # Holm-adjusted across the tested features
    psi: float
    drifted: bool

    @property
    def tested(self) -> bool:
        return not math.isnan(self.p_value)


@dataclass(frozen=True)
class DriftReport:
    """Outcome of :func:`check_drift`; ``share_drifted`` is over the tested features."""

    features: tuple[FeatureDrift, ...]
    share_drifted: float
    alarm: bool
    n_reference: int
    n_current: int

    def drifted_names(self) -> list[str]:
        return [f.name for f in self.features if f.drifted]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary for the journal: counts and the top drifted features by KS."""
        drifted = sorted((f for f in self.features if f.drifted), key=lambda f: -f.ks_stat)
        top = drifted[:_AS_DICT_TOP]
        return {
            "alarm": self.alarm,
            "share_drifted": round(self.share_drifted, 4),
            "n_features": len(self.features),
            "n_tested": sum(f.tested for f in self.features),
            "n_drifted": len(drifted),
            "n_reference": self.n_reference,
            "n_current": self.n_current,
            "drifted": [
                {
                    "name": f.name,
                    "ks": round(f.ks_stat, 4),
                    "p": _sig(f.p_value),
                    "p_holm": _sig(f.p_adjusted),
                    "psi": round(f.psi, 4),
                }
                for f in top
            ],
            "drifted_not_listed": len(drifted) - len(top),
        }


def _is_drifted(
    p_value: np.ndarray,
    p_adjusted: np.ndarray,
    psi: np.ndarray,
    *,
    alpha: float,
    psi_threshold: float,
) -> np.ndarray:
    """The decision rule (module docstring): significant family-wise, or large and
    significant on its own."""
    out: np.ndarray = (p_adjusted < alpha) | ((psi >= psi_threshold) & (p_value < alpha))
    return out


def _sig(x: float) -> float:
    return float(f"{x:.3g}")


def check_drift(
    reference: np.ndarray,
    current: np.ndarray,
    names: Sequence[str],
    *,
    alpha: float = 0.01,
    psi_threshold: float = 0.25,
    min_share: float = 0.1,
    min_rows: int = 50,
) -> DriftReport:
    """Compare ``current`` rows (consecutive bars, oldest first) with the ``reference``
    sample column by column; see the module docstring for the method and the rule."""
    ref = np.asarray(reference)
    cur = np.asarray(current)
    names = tuple(names)
    if ref.ndim != 2 or cur.ndim != 2:
        raise ValueError(
            f"reference and current must be 2-D arrays (got shapes {ref.shape} and {cur.shape})"
        )
    if ref.shape[1] != cur.shape[1]:
        raise ValueError(
            f"reference has {ref.shape[1]} feature columns but current has {cur.shape[1]}: "
            "compute the current rows with the feature spec the model was trained on"
        )
    _check_names(names, ref.shape[1], "the reference and current rows")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1) (got {alpha})")
    if not psi_threshold > 0.0:
        raise ValueError(f"psi_threshold must be > 0 (got {psi_threshold})")
    if not 0.0 < min_share <= 1.0:
        raise ValueError(f"min_share must be in (0, 1] (got {min_share})")
    if min_rows < 2:
        raise ValueError(f"min_rows must be >= 2 (got {min_rows})")

    # Features along the first axis, rows along the last: sorts and FFTs run on
    # contiguous rows. float32 rows (what the features are) stay float32.
    dtype = np.result_type(ref.dtype, cur.dtype, np.float32)
    ref_t = np.ascontiguousarray(ref.T, dtype=dtype)
    cur_t = np.ascontiguousarray(cur.T, dtype=dtype)
    m = np.isfinite(ref_t).sum(axis=1)
    n = np.isfinite(cur_t).sum(axis=1)
    tested = np.flatnonzero((m >= min_rows) & (n >= min_rows))
    k = tested.size
    nan = np.full(len(names), np.nan)
    ks, p_value, p_adjusted, psi = nan.copy(), nan.copy(), nan.copy(), nan.copy()
    drifted = np.zeros(len(names), dtype=bool)
    if k:
        stats = _compare(ref_t[tested], cur_t[tested])
        p_k = _ks_pvalue(stats.ks, stats.n / stats.tau_cur, stats.m / stats.tau_ref)
        adj_k = holm_adjust(p_k)
        drifted_k = _is_drifted(p_k, adj_k, stats.psi, alpha=alpha, psi_threshold=psi_threshold)
        ks[tested], psi[tested] = stats.ks, stats.psi
        p_value[tested], p_adjusted[tested] = p_k, adj_k
        drifted[tested] = drifted_k
    share = float(drifted.sum() / k) if k else 0.0
    features = tuple(
        FeatureDrift(
            name=names[j],
            ks_stat=float(ks[j]),
            p_value=float(p_value[j]),
            p_adjusted=float(p_adjusted[j]),
            psi=float(psi[j]),
            drifted=bool(drifted[j]),
        )
        for j in range(len(names))
    )
    return DriftReport(
        features=features,
        share_drifted=share,
        alarm=bool(k and share >= min_share),
        n_reference=int(ref.shape[0]),
        n_current=int(cur.shape[0]),
    )
