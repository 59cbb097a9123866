"""The contract every model kind follows, and the artifact files they share.

Light on purpose: numpy and the standard library only, so the serving process
(``ml.serving``) can use the exceptions and the artifact readers without
importing torch, xgboost or scikit-learn. The heavy libraries are imported by
the kind modules (``ml.kinds.rf`` ...), which only training workers load.

The contract is scikit-learn's estimator contract: ``__init__`` stores
hyperparameters and nothing else, ``fit`` returns ``self``, fitted attributes
end in ``_``, a model that is not fitted raises :class:`NotFittedError`.
Classes are ``0 = down, 1 = flat, 2 = up``.

A saved model is a directory holding::

    model.<native>     the kind's own format (inspection, retraining); never pickle
    model.onnx         the graph the daemon serves: input "input" float32
                       (batch, n_features) or (batch, seq_len, n_features),
                       output "probabilities" float32 (batch, 3)
    scaler.json        per-feature mean and scale as JSON numbers; the model
                       sees (x - mean) / scale in float32 (identity for trees)
    model_meta.json    kind, hyperparameters, feature hash and names, shapes,
                       library versions, training budget and counts

Every file is a pure function of (data, hyperparameters, library versions):
no timestamps, no object ids, sorted JSON keys, so a retrain of the same
configuration gives byte-identical files.
"""

from __future__ import annotations

import inspect
import json
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np

CLASS_NAMES: tuple[str, str, str] = ("down", "flat", "up")
N_CLASSES = 3
META_FILE = "model_meta.json"
SCALER_FILE = "scaler.json"
ONNX_FILE = "model.onnx"
ONNX_INPUT = "input"
ONNX_OUTPUT = "probabilities"
META_FORMAT = 1
# Fewer training samples (rows, or full windows for sequence kinds) than this
# cannot say anything about three classes.
MIN_TRAIN_SAMPLES = 30


class NotFittedError(ValueError, AttributeError):
    """The model is used before ``fit`` (or ``load``): same bases as scikit-learn's."""


class FeatureMismatchError(ValueError):
    """The artifact was trained on another feature spec than the running one."""


class ArtifactError(ValueError):
    """An artifact file is missing, malformed, unsafe, or from an incompatible library."""


class TrainingError(RuntimeError):
    """A fit could not produce a trustworthy model (budget exceeded, loss diverged)."""


# --------------------------------------------------------------------------- JSON files


def dump_json_bytes(payload: Mapping[str, Any]) -> bytes:
    """Deterministic JSON: sorted keys, fixed indent, no NaN, LF line ends."""
    text = json.dumps(payload, sort_keys=True, indent=2, allow_nan=False, ensure_ascii=True)
    return (text + "\n").encode("utf-8")


def read_json(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing") from None
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot be read ({exc})") from exc
    try:
        payload = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(payload, dict):
        raise ArtifactError(f"{path}: expected a JSON object, got {type(payload).__name__}")
    return payload


def read_meta(directory: Path) -> dict[str, Any]:
    """``model_meta.json`` of ``directory``, its required fields checked."""
    path = directory / META_FILE
    meta = read_json(path)
    if meta.get("format") != META_FORMAT:
        raise ArtifactError(
            f"{path}: unknown meta format {meta.get('format')!r} (this code reads {META_FORMAT})"
        )
    required: dict[str, type | tuple[type, ...]] = {
        "kind": str,
        "feature_hash": str,
        "feature_names": list,
        "n_features": int,
        "sequence_length": int,
        "hyperparams": dict,
        "library_versions": dict,
    }
    for key, typ in required.items():
        if not isinstance(meta.get(key), typ):
            raise ArtifactError(f"{path}: field {key!r} missing or of the wrong type")
    if meta["n_features"] < 1 or len(meta["feature_names"]) != meta["n_features"]:
        raise ArtifactError(
            f"{path}: n_features={meta['n_features']} but {len(meta['feature_names'])} "
            "feature names"
        )
    if meta["sequence_length"] < 0:
        raise ArtifactError(f"{path}: negative sequence_length {meta['sequence_length']}")
    return meta


def check_feature_hash(found: str, expected: str, where: Path | str) -> None:
    if found != expected:
        raise FeatureMismatchError(
            f"{where}: model was trained on feature spec {found} but the running feature "
            f"spec is {expected}; retrain it or roll back to a version built on {expected}"
        )


def scaler_payload(mean: np.ndarray, scale: np.ndarray, *, identity: bool) -> dict[str, Any]:
    # float(np.float32) is exact, and Python's repr of a double round-trips, so
    # the float32 values come back bit for bit.
    return {
        "type": "identity" if identity else "standard",
        "mean": [float(v) for v in np.asarray(mean, dtype=np.float32)],
        "scale": [float(v) for v in np.asarray(scale, dtype=np.float32)],
    }


def read_scaler(directory: Path, n_features: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """(mean, scale, is_identity) from ``scaler.json`` as float32 vectors of ``n_features``."""
    path = directory / SCALER_FILE
    payload = read_json(path)
    kind = payload.get("type")
    if kind not in ("identity", "standard"):
        raise ArtifactError(f"{path}: unknown scaler type {kind!r}")
    try:
        mean = np.asarray(payload["mean"], dtype=np.float32)
        scale = np.asarray(payload["scale"], dtype=np.float32)
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{path}: mean/scale are not lists of numbers ({exc})") from exc
    if mean.shape != (n_features,) or scale.shape != (n_features,):
        raise ArtifactError(
            f"{path}: mean/scale have shapes {mean.shape}/{scale.shape}, expected ({n_features},)"
        )
    if not (np.isfinite(mean).all() and np.isfinite(scale).all() and (scale > 0).all()):
        raise ArtifactError(f"{path}: mean/scale must be finite and scale > 0")
    identity = kind == "identity"
    if identity and not ((mean == 0).all() and (scale == 1).all()):
        raise ArtifactError(f"{path}: an identity scaler must have mean 0 and scale 1")
    return mean, scale, identity


def major_version(version: str) -> str:
    return version.split(".", 1)[0]


# --------------------------------------------------------------------------- input checks


def as_features(X: Any, n_features: int | None = None, *, what: str = "X") -> np.ndarray:
    """``X`` as a finite, C-contiguous float32 matrix (with ``n_features`` columns if given)."""
    arr = np.ascontiguousarray(X, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be 2-D (rows, features), got shape {arr.shape}")
    if n_features is not None and arr.shape[1] != n_features:
        raise ValueError(f"{what} has {arr.shape[1]} features, the model expects {n_features}")
    finite = np.isfinite(arr)
    if not finite.all():
        row, col = np.argwhere(~finite)[0]
        raise ValueError(
            f"{what} has {int((~finite).sum())} non-finite values (first at row {row}, "
            f"column {col}): drop the rows whose features are not yet defined"
        )
    return arr


def as_labels(y: Any, n_rows: int, *, what: str = "y") -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1 or arr.shape[0] != n_rows:
        raise ValueError(f"{what} must be 1-D with {n_rows} labels, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or not (arr == np.round(arr)).all():
            raise ValueError(f"{what} must hold the integer classes 0, 1, 2")
    elif arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must hold the integer classes 0, 1, 2, got dtype {arr.dtype}")
    labels = arr.astype(np.int64)
    bad = (labels < 0) | (labels >= N_CLASSES)
    if bad.any():
        raise ValueError(f"{what} holds {sorted(set(labels[bad].tolist()))}: classes are 0, 1, 2")
    return labels


def class_counts(y: np.ndarray) -> list[int]:
    return [int(c) for c in np.bincount(y, minlength=N_CLASSES)]


def balanced_class_weights(y: np.ndarray) -> np.ndarray:
    """scikit-learn's "balanced" weights ``n / (3 * count)`` per class (float64, shape (3,))."""
    counts = np.bincount(y, minlength=N_CLASSES).astype(np.float64)
    return len(y) / (N_CLASSES * counts)


def window_ends(n_rows: int, seq_len: int) -> np.ndarray:
    """Indices of the rows that end a full window (all rows for row models)."""
    return np.arange(max(seq_len, 1) - 1, n_rows, dtype=np.int64)


# --------------------------------------------------------------------------- the contract


class ModelKind(ABC):
    """Base class of every model kind; subclasses implement the ``_``-prefixed hooks.

    Fitted attributes common to all kinds: ``classes_`` (array [0, 1, 2]),
    ``n_features_in_``, ``feature_hash_``, ``feature_names_`` (tuple) and
    ``training_`` (the deterministic training record written to the meta).

    ``predict_proba(X)`` takes consecutive rows (n, f). Row kinds answer every
    row. Sequence kinds (``sequence_length > 0``) answer row ``i`` from the
    window of rows ``i - L + 1 .. i``; the first ``L - 1`` rows have no full
    window and get NaN probabilities.
    """

    kind: ClassVar[str]
    # Libraries whose major version must match between save and load.
    major_libraries: ClassVar[tuple[str, ...]] = ()

    # ------------------------------------------------------------- parameters

    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [
            name
            for name, p in sig.parameters.items()
            if name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor's hyperparameters (``deep`` is accepted for scikit-learn parity)."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> Self:
        valid = set(self._param_names())
        for name, value in params.items():
            if name not in valid:
                raise ValueError(f"{type(self).__name__} has no hyperparameter {name!r}")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    @property
    def sequence_length(self) -> int:
        """Rows per input window; 0 for row models."""
        return 0

    # ------------------------------------------------------------- fitting

    def _reset(self) -> None:
        for name in [k for k in vars(self) if k.endswith("_") and not k.startswith("_")]:
            delattr(self, name)

    def _check_fitted(self) -> None:
        if not hasattr(self, "n_features_in_"):
            raise NotFittedError(
                f"this {type(self).__name__} is not fitted yet: call fit() or load() first"
            )

    def fit(
        self,
        X: Any,
        y: Any,
        *,
        feature_hash: str,
        feature_names: Sequence[str],
        X_val: Any = None,
        y_val: Any = None,
    ) -> Self:
        """Train on rows ``X`` (n, f) with labels ``y`` in {0, 1, 2}; returns ``self``.

        ``X_val``/``y_val`` (both or neither) may be used by the kind to choose,
        deterministically, among checkpoints inside its fixed budget (see each
        kind); they never extend the budget. A refit starts from scratch.
        """
        Xa = as_features(X)
        ya = as_labels(y, Xa.shape[0])
        names = tuple(str(n) for n in feature_names)
        if len(names) != Xa.shape[1]:
            raise ValueError(f"{len(names)} feature names for {Xa.shape[1]} feature columns")
        if not feature_hash:
            raise ValueError("feature_hash must be the FeatureSpec hash the rows were built with")
        n_samples = len(window_ends(Xa.shape[0], self.sequence_length))
        if n_samples < MIN_TRAIN_SAMPLES:
            raise ValueError(
                f"training data too short: {Xa.shape[0]} rows give {n_samples} samples, "
                f"need at least {MIN_TRAIN_SAMPLES}"
                + (f" (sequence length {self.sequence_length})" if self.sequence_length else "")
            )
        counts = class_counts(ya[window_ends(Xa.shape[0], self.sequence_length)])
        if min(counts) == 0:
            raise ValueError(
                f"labels do not cover all three classes (counts down/flat/up = {counts}): "
                "constant or one-sided labels cannot train a 3-class model"
            )
        Xv: np.ndarray | None = None
        yv: np.ndarray | None = None
        if (X_val is None) != (y_val is None):
            raise ValueError("pass both X_val and y_val, or neither")
        if X_val is not None:
            Xv = as_features(X_val, Xa.shape[1], what="X_val")
            yv = as_labels(y_val, Xv.shape[0], what="y_val")

        self._reset()
        record = self._fit(Xa, ya, Xv, yv)
        self.n_features_in_ = Xa.shape[1]
        self.feature_hash_ = feature_hash
        self.feature_names_ = names
        self.classes_ = np.arange(N_CLASSES)
        self.training_ = {
            "n_rows": int(Xa.shape[0]),
            "n_samples": n_samples,
            "class_counts": counts,
            "n_val_rows": 0 if Xv is None else int(Xv.shape[0]),
            **record,
        }
        return self

    # ------------------------------------------------------------- prediction

    def predict_proba(self, X: Any) -> np.ndarray:
        """(n, 3) float64 probabilities down/flat/up; NaN rows before a full window."""
        self._check_fitted()
        Xa = as_features(X, self.n_features_in_)
        out = np.asarray(self._predict_proba(Xa), dtype=np.float64)
        if out.shape != (Xa.shape[0], N_CLASSES):
            raise RuntimeError(f"{self.kind}: predict_proba produced shape {out.shape}")
        return out

    def predict(self, X: Any) -> np.ndarray:
        """Most probable class per row (-1 where a sequence kind has no full window)."""
        proba = self.predict_proba(X)
        labels = np.full(proba.shape[0], -1, dtype=np.int64)
        ok = ~np.isnan(proba).any(axis=1)
        labels[ok] = proba[ok].argmax(axis=1)
        return labels

    def warmup(self) -> None:
        """Run dummy predictions of every input shape: one row/window and a small batch."""
        self._check_fitted()
        n = max(self.sequence_length, 1)
        zeros = np.zeros((n + 1, self.n_features_in_), dtype=np.float32)
        self.predict_proba(zeros[:n])
        self.predict_proba(zeros)

    # ------------------------------------------------------------- persistence

    def save(self, directory: Path) -> list[str]:
        """Write the artifact files into ``directory`` (created if needed); return their names."""
        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        native = self._save_native(directory)
        (directory / ONNX_FILE).write_bytes(self._onnx_bytes())
        mean, scale, identity = self._scaler()
        (directory / SCALER_FILE).write_bytes(
            dump_json_bytes(scaler_payload(mean, scale, identity=identity))
        )
        params = self.get_params()
        try:
            json.dumps(params, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"hyperparameters must be JSON values: {params!r} ({exc})") from exc
        meta = {
            "format": META_FORMAT,
            "kind": self.kind,
            "classes": list(CLASS_NAMES),
            "hyperparams": params,
            "feature_hash": self.feature_hash_,
            "feature_names": list(self.feature_names_),
            "n_features": self.n_features_in_,
            "sequence_length": self.sequence_length,
            "onnx": {"file": ONNX_FILE, "input": ONNX_INPUT, "output": ONNX_OUTPUT},
            "native_files": native,
            "library_versions": self.library_versions(),
            "training": self.training_,
        }
        (directory / META_FILE).write_bytes(dump_json_bytes(meta))
        return [*native, ONNX_FILE, SCALER_FILE, META_FILE]

    @classmethod
    def load(cls, directory: Path, *, feature_hash: str) -> Self:
        """Rebuild a fitted model from ``directory`` (native artifact); no code from the files runs.

        Refuses (before reading the native file) a model of another kind, another
        feature spec, or a different major version of the kind's main library.
        """
        directory = Path(directory)
        meta = read_meta(directory)
        if meta["kind"] != cls.kind:
            raise ArtifactError(
                f"{directory / META_FILE}: holds a {meta['kind']!r} model, not {cls.kind!r}"
            )
        check_feature_hash(meta["feature_hash"], feature_hash, directory / META_FILE)
        current = cls.library_versions()
        for lib in cls.major_libraries:
            saved = str(meta["library_versions"].get(lib, "?"))
            if major_version(saved) != major_version(current[lib]):
                raise ArtifactError(
                    f"{directory / META_FILE}: trained with {lib} {saved}, running "
                    f"{current[lib]}: another major version cannot read it; retrain"
                )
        try:
            model = cls(**meta["hyperparams"])
        except TypeError as exc:
            raise ArtifactError(
                f"{directory / META_FILE}: hyperparameters refused ({exc})"
            ) from exc
        n_features = meta["n_features"]
        if model.sequence_length != meta["sequence_length"]:
            raise ArtifactError(
                f"{directory / META_FILE}: sequence_length {meta['sequence_length']} disagrees "
                f"with the hyperparameters ({model.sequence_length})"
            )
        mean, scale, identity = read_scaler(directory, n_features)
        model._load_native(directory, n_features, mean, scale, identity)
        model.n_features_in_ = n_features
        model.feature_hash_ = meta["feature_hash"]
        model.feature_names_ = tuple(meta["feature_names"])
        model.classes_ = np.arange(N_CLASSES)
        model.training_ = dict(meta.get("training") or {})
        return model

    # ------------------------------------------------------------- kind hooks

    @classmethod
    @abstractmethod
    def library_versions(cls) -> dict[str, str]:
        """Versions of every library that shaped the artifact files (goes into the meta)."""

    @abstractmethod
    def _fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        X_val: np.ndarray | None,
        y_val: np.ndarray | None,
    ) -> dict[str, Any]:
        """Set the kind's fitted attributes; return its JSON training record."""

    @abstractmethod
    def _predict_proba(self, X: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def _scaler(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """(mean, scale, is_identity) applied before the model, float32 vectors."""

    @abstractmethod
    def _save_native(self, directory: Path) -> list[str]: ...

    @abstractmethod
    def _onnx_bytes(self) -> bytes: ...

    @abstractmethod
    def _load_native(
        self,
        directory: Path,
        n_features: int,
        mean: np.ndarray,
        scale: np.ndarray,
        identity: bool,
    ) -> None: ...


def keep_only_output(model: Any, name: str = ONNX_OUTPUT) -> None:
    """Drop every graph output of an ``onnx.ModelProto`` except ``name`` (the class label).

    Converters for tree ensembles also emit a ``label`` output; the daemon reads
    probabilities only, and one output per graph keeps the serving contract simple.
    """
    outputs = [o for o in model.graph.output if o.name == name]
    if len(outputs) != 1:
        found = [o.name for o in model.graph.output]
        raise RuntimeError(f"converted graph has outputs {found}, expected one named {name!r}")
    del model.graph.output[:]
    model.graph.output.extend(outputs)


def finite_or_none(value: float | None) -> float | None:
    """A float that can go into JSON (None for missing or non-finite)."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)
