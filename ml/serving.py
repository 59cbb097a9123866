"""Serve a saved model's ``model.onnx`` with ONNX Runtime: the daemon's hot path.

Imports numpy, onnxruntime and light project modules only (never torch,
xgboost, scikit-learn or skops), so the serving process starts in about half
a second. :class:`OnnxPredictor` implements the daemon's ``Predictor``
protocol (``strategy.baseline``) for one symbol:

- one ``InferenceSession`` on one intra-op and one inter-op thread,
  sequential execution, thread-pool spinning off (a spinning pool burns a
  core between bars), full graph optimisation;
- the input and output buffers are allocated once and bound to the session
  with an ``IOBinding``; a call scales the row into the bound buffer, runs,
  and copies the (3,) output: no other allocation;
- a sequence model keeps the last ``seq_len`` scaled rows in a ring buffer of
  ``2 * seq_len`` rows: each row is written twice (at ``p`` and ``p + L``),
  so the current window is always the contiguous block ``[p + 1, p + L]``,
  and one binding per ring position is prepared at load.

An instance is not thread-safe: one symbol, one caller (the bar loop).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ml.kinds.base import (
    N_CLASSES,
    ONNX_FILE,
    ONNX_INPUT,
    ONNX_OUTPUT,
    ArtifactError,
    FeatureMismatchError,
    check_feature_hash,
    read_meta,
    read_scaler,
)
from strategy.baseline import PredictorNotReady

__all__ = [
    "ArtifactError",
    "FeatureMismatchError",
    "OnnxPredictor",
    "PredictorNotReady",
    "session_options",
]

# Windows per session.run in predict_proba_batch for sequence models: bounds
# the temporary (chunk, L, F) copy (256 x 60 x 40 float32 = 2.5 MB).
BATCH_WINDOWS = 256


def session_options() -> ort.SessionOptions:
    """The daemon's session settings: 1 thread, sequential, no spinning, all optimisations."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3  # warnings about unused initialisers are noise here
    return options


class OnnxPredictor:
    """Class probabilities (down, flat, up) for one symbol from a saved model directory.

    Build it with :meth:`load`. ``predict_proba(row)`` answers one bar (a
    sequence model first appends the row to its window and raises
    ``PredictorNotReady`` until ``seq_len`` rows have been seen); ``observe``
    appends without predicting; ``predict_proba_batch`` answers many rows for
    backtests without touching the window.
    """

    def __init__(
        self,
        *,
        session: ort.InferenceSession,
        kind: str,
        version: str,
        feature_hash: str,
        feature_names: tuple[str, ...],
        sequence_length: int,
        mean: np.ndarray,
        scale: np.ndarray,
        scaler_is_identity: bool,
        meta: dict[str, Any],
    ) -> None:
        self.kind = kind
        self.version = version
        # The store stage this version serves as: "production", or "previous" after
        # a fallback (set by whoever loaded it; journaled with every prediction).
        self.stage = "production"
        self.feature_hash = feature_hash
        self.feature_names = feature_names
        self.n_features = len(feature_names)
        self.sequence_length = sequence_length
        self.meta = meta
        self._session = session
        self._mean = np.ascontiguousarray(mean, dtype=np.float32)
        self._scale = np.ascontiguousarray(scale, dtype=np.float32)
        self._identity = scaler_is_identity
        self._output_names = [ONNX_OUTPUT]
        f = self.n_features
        self._out = np.zeros((1, N_CLASSES), dtype=np.float32)
        out_value = ort.OrtValue.ortvalue_from_numpy(self._out)
        self._count = 0
        if sequence_length:
            seq = sequence_length
            self._ring = np.zeros((2 * seq, f), dtype=np.float32)
            self._ring_rows = [self._ring[i] for i in range(2 * seq)]
            # The OrtValues wrap the ring's memory (no copy): keep the views alive.
            self._windows = [self._ring[p + 1 : p + 1 + seq][np.newaxis] for p in range(seq)]
            self._bindings = [self._bind(w, out_value) for w in self._windows]
            self._row = np.zeros(f, dtype=np.float32)  # scratch: the scaled row, then copied twice
            warm_input = np.zeros((1, seq, f), dtype=np.float32)
        else:
            self._input = np.zeros((1, f), dtype=np.float32)
            self._binding = self._bind(self._input, out_value)
            self._row = self._input[0]  # a row model scales straight into the bound input
            warm_input = np.zeros((1, f), dtype=np.float32)
        self._warm_input = warm_input
        self._warm_out = np.zeros((1, N_CLASSES), dtype=np.float32)
        self._warm_binding = self._bind(
            warm_input, ort.OrtValue.ortvalue_from_numpy(self._warm_out)
        )

    def _bind(self, inp: np.ndarray, out: ort.OrtValue) -> ort.IOBinding:
        binding = self._session.io_binding()
        binding.bind_ortvalue_input(ONNX_INPUT, ort.OrtValue.ortvalue_from_numpy(inp))
        binding.bind_ortvalue_output(ONNX_OUTPUT, out)
        return binding

    # ------------------------------------------------------------- loading

    @classmethod
    def load(cls, directory: Path, *, feature_hash: str, kind: str, version: str) -> OnnxPredictor:
        """Load ``model.onnx`` + ``scaler.json`` + ``model_meta.json`` from ``directory``.

        Refuses (``FeatureMismatchError``) a model built on another feature spec
        and (``ArtifactError``) a model of another kind or a graph whose input
        and output do not match the meta. The store checks file hashes first.
        """
        directory = Path(directory)
        meta = read_meta(directory)
        meta_path = directory / "model_meta.json"
        if meta["kind"] != kind:
            raise ArtifactError(f"{meta_path}: holds a {meta['kind']!r} model, not {kind!r}")
        check_feature_hash(meta["feature_hash"], feature_hash, meta_path)
        n_features = int(meta["n_features"])
        seq = int(meta["sequence_length"])
        mean, scale, identity = read_scaler(directory, n_features)
        onnx_path = directory / ONNX_FILE
        if not onnx_path.is_file():
            raise ArtifactError(f"{onnx_path}: missing")
        try:
            session = ort.InferenceSession(
                str(onnx_path), sess_options=session_options(), providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises several private types
            raise ArtifactError(f"{onnx_path}: ONNX Runtime cannot load it ({exc})") from exc
        _check_signature(session, onnx_path, n_features, seq)
        return cls(
            session=session,
            kind=kind,
            version=version,
            feature_hash=feature_hash,
            feature_names=tuple(str(n) for n in meta["feature_names"]),
            sequence_length=seq,
            mean=mean,
            scale=scale,
            scaler_is_identity=identity,
            meta=meta,
        )

    # ------------------------------------------------------------- hot path

    def _push(self, row: np.ndarray) -> int:
        """Scale ``row`` into the input buffer (ring for sequences); return the ring position."""
        if row.shape != (self.n_features,):
            raise ValueError(
                f"{self.kind} {self.version}: row has shape {row.shape}, "
                f"the model expects ({self.n_features},)"
            )
        if not math.isfinite(row.sum()):
            if self.sequence_length:
                self.reset()  # a window with a hole is not what the model was trained on
            raise ValueError(f"{self.kind} {self.version}: row has non-finite features")
        buf = self._row
        np.copyto(buf, row, casting="same_kind")
        if not self._identity:
            np.subtract(buf, self._mean, out=buf)
            np.divide(buf, self._scale, out=buf)
        if not self.sequence_length:
            return 0
        seq = self.sequence_length
        pos = self._count % seq
        np.copyto(self._ring_rows[pos], buf)
        np.copyto(self._ring_rows[pos + seq], buf)
        self._count += 1
        return pos

    def observe(self, row: np.ndarray) -> None:
        """Feed a history row without predicting (fills a sequence model's window)."""
        if self.sequence_length:
            self._push(row)
        elif row.shape != (self.n_features,):
            raise ValueError(
                f"{self.kind} {self.version}: row has shape {row.shape}, "
                f"the model expects ({self.n_features},)"
            )

    def predict_proba(self, row: np.ndarray) -> np.ndarray:
        """(3,) float32 probabilities down/flat/up for this bar's feature row."""
        pos = self._push(row)
        if self.sequence_length:
            if self._count < self.sequence_length:
                raise PredictorNotReady(
                    f"{self.kind} {self.version}: {self._count}/{self.sequence_length} rows seen"
                )
            self._session.run_with_iobinding(self._bindings[pos])
        else:
            self._session.run_with_iobinding(self._binding)
        return self._out[0].copy()

    @property
    def ready(self) -> bool:
        """True once a prediction can be made (always for row models)."""
        return self._count >= self.sequence_length

    def reset(self) -> None:
        """Forget the window (a sequence model then needs ``seq_len`` rows again)."""
        self._count = 0
        if self.sequence_length:
            self._ring.fill(0.0)

    def warmup(self, rounds: int = 3) -> None:
        """Run dummy predictions of every input shape; the window is left untouched."""
        for _ in range(rounds):
            self._session.run_with_iobinding(self._warm_binding)
        zeros = np.zeros((max(self.sequence_length, 1) + 1, self.n_features), np.float32)
        self.predict_proba_batch(zeros)

    # ------------------------------------------------------------- backtests

    def scale(self, X: np.ndarray) -> np.ndarray:
        """The model's input rows: ``(X - mean) / scale`` in float32 (as in training)."""
        Xf = np.ascontiguousarray(X, dtype=np.float32)
        if self._identity:
            return Xf
        return np.divide(np.subtract(Xf, self._mean, dtype=np.float32), self._scale)

    def predict_proba_batch(self, X: np.ndarray) -> np.ndarray:
        """(n, 3) float32 probabilities for consecutive rows ``X`` (n, f).

        Row models: one ``session.run`` over the matrix. Sequence models: row
        ``i`` from the window ending at ``i``, NaN for the first ``seq_len - 1``
        rows. Rows with non-finite features, and windows holding one, are NaN
        (where the live path raises or is not ready). Stateless: the live
        window is neither read nor changed.
        """
        Xf = np.asarray(X)
        if Xf.ndim != 2 or Xf.shape[1] != self.n_features:
            raise ValueError(
                f"{self.kind} {self.version}: X has shape {Xf.shape}, "
                f"expected (n, {self.n_features})"
            )
        Xs = self.scale(Xf)
        n = Xs.shape[0]
        seq = self.sequence_length
        # Rows the live path refuses (non-finite) get NaN, and so do the windows
        # that contain them: live, such a row restarts the window.
        bad = ~np.isfinite(Xs).all(axis=1)
        if bad.any():
            Xs = np.where(bad[:, None], np.float32(0), Xs).astype(np.float32)
        out = np.full((n, N_CLASSES), np.nan, dtype=np.float32)
        if not seq:
            if n:
                out[:] = self._session.run(self._output_names, {ONNX_INPUT: Xs})[0]
                out[bad] = np.nan
            return out
        if n < seq:
            return out
        windows = np.lib.stride_tricks.sliding_window_view(Xs, (seq, self.n_features))[:, 0]
        for start in range(0, windows.shape[0], BATCH_WINDOWS):
            chunk = np.ascontiguousarray(windows[start : start + BATCH_WINDOWS])
            probs = self._session.run(self._output_names, {ONNX_INPUT: chunk})[0]
            out[seq - 1 + start : seq - 1 + start + chunk.shape[0]] = probs
        for row in np.flatnonzero(bad):
            out[row : row + seq] = np.nan
        return out

    def __repr__(self) -> str:
        return (
            f"OnnxPredictor(kind={self.kind!r}, version={self.version!r}, "
            f"features={self.n_features}, seq_len={self.sequence_length})"
        )


def _check_signature(session: ort.InferenceSession, path: Path, n_features: int, seq: int) -> None:
    """The graph must take "input" (batch[, seq], f) float and give "probabilities" (batch, 3)."""
    inputs = session.get_inputs()
    outputs = session.get_outputs()
    expected_in: list[int | None] = [None, seq, n_features] if seq else [None, n_features]
    problems: list[str] = []
    if len(inputs) != 1 or inputs[0].name != ONNX_INPUT or inputs[0].type != "tensor(float)":
        problems.append(f"inputs {[(i.name, i.type) for i in inputs]}")
    elif len(inputs[0].shape) != len(expected_in) or any(
        want is not None and got != want
        for got, want in zip(inputs[0].shape, expected_in, strict=True)
    ):
        problems.append(f"input shape {inputs[0].shape}, meta says {expected_in}")
    if len(outputs) != 1 or outputs[0].name != ONNX_OUTPUT or outputs[0].type != "tensor(float)":
        problems.append(f"outputs {[(o.name, o.type) for o in outputs]}")
    elif len(outputs[0].shape) != 2 or outputs[0].shape[1] != N_CLASSES:
        problems.append(f"output shape {outputs[0].shape}, expected [batch, {N_CLASSES}]")
    if problems:
        raise ArtifactError(
            f"{path}: graph does not match the serving contract "
            f"(input {ONNX_INPUT!r}, output {ONNX_OUTPUT!r}): " + "; ".join(problems)
        )
