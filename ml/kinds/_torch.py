"""What the PyTorch kinds (``lstm``, ``mlp``) share: budgeted training, scaler, artifacts.

Training budget
    A fixed number of optimiser steps (``max_steps`` mini-batches of
    ``batch_size``), never a duration, so two runs on the same data and
    settings produce the same weights: ``torch.manual_seed(seed)`` before the
    network is built, batches drawn from ``numpy.random.default_rng(seed)``
    epoch permutations, one intra-op thread (``torch.set_num_threads(1)``) and
    ``torch.use_deterministic_algorithms(True)``, all restored on exit.
    ``max_train_seconds`` is a wall-clock guard (a training worker's watchdog,
    not a budget): a run that exceeds it raises :class:`TrainingError` rather
    than returning a model cut short.

Validation data
    When given and ``eval_every > 0``, the validation loss (unweighted
    cross-entropy on at most 2,048 evenly spaced samples; a sequence kind's
    windows lie inside ``X_val``) is computed every
    ``eval_every`` steps and after the last one; the weights of the best
    evaluation (earliest on ties) are kept. The budget is never extended.
    Without validation data the weights after ``max_steps`` are kept.

Imbalanced labels
    ``class_weight="balanced"`` weights the cross-entropy by
    ``n / (3 * count(class))``.

Artifacts
    ``model.safetensors`` (the ``state_dict``, tensors only: no code runs on
    load), ``scaler.json`` (per-feature mean/std of the training rows) and
    ``model.onnx`` exported by the TorchScript exporter (``dynamo=False``:
    the default dynamo exporter of torch 2.13 needs ``onnxscript``). The
    exported graph includes the softmax and takes the scaled rows.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import safetensors
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ml.kinds.base import (
    ONNX_INPUT,
    ONNX_OUTPUT,
    ArtifactError,
    ModelKind,
    TrainingError,
    balanced_class_weights,
    finite_or_none,
    window_ends,
)

NATIVE_FILE = "model.safetensors"
ONNX_OPSET = 17
MAX_VAL_SAMPLES = 2048
PREDICT_CHUNK = 1024
# Features with a smaller spread than this are left unscaled (scale 1).
_MIN_STD = 1e-8


@contextmanager
def torch_runtime() -> Iterator[None]:
    """One intra-op thread and deterministic kernels for the block; previous settings restored."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def standardiser(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std (computed in float64) as float32 vectors."""
    mean = X.mean(axis=0, dtype=np.float64)
    std = X.std(axis=0, dtype=np.float64)
    std = np.where(std > _MIN_STD, std, 1.0)
    scale = std.astype(np.float32)
    scale[scale <= 0] = 1.0
    return mean.astype(np.float32), scale


def scale_rows(X: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``(X - mean) / scale`` in float32: the exact operation ``ml.serving`` repeats."""
    return np.divide(np.subtract(X, mean, dtype=np.float32), scale, dtype=np.float32)


def gather(Xs: np.ndarray, ends: np.ndarray, seq_len: int) -> np.ndarray:
    """Rows ``ends`` (row models) or the windows ending at ``ends``: (B, L, F)."""
    if seq_len == 0:
        return np.ascontiguousarray(Xs[ends])
    offsets = np.arange(1 - seq_len, 1, dtype=np.int64)
    return np.ascontiguousarray(Xs[ends[:, None] + offsets[None, :]])


class _Probabilities(torch.nn.Module):
    """The network plus the softmax: what native prediction and the ONNX graph compute."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=-1)


class _Sampler:
    """Deterministic mini-batches: successive slices of seeded epoch permutations."""

    def __init__(self, ends: np.ndarray, batch_size: int, seed: int) -> None:
        self._ends = ends
        self._batch = batch_size
        self._rng = np.random.default_rng(seed)
        self._perm = self._rng.permutation(ends)
        self._ptr = 0

    def next(self) -> np.ndarray:
        if len(self._ends) <= self._batch:
            return self._rng.permutation(self._ends)
        if self._ptr + self._batch > len(self._perm):
            self._perm = self._rng.permutation(self._ends)
            self._ptr = 0
        batch = self._perm[self._ptr : self._ptr + self._batch]
        self._ptr += self._batch
        return batch


class TorchKind(ModelKind):
    """Base of the PyTorch kinds. Subclasses store the shared hyperparameters below."""

    major_libraries: ClassVar[tuple[str, ...]] = ("torch",)

    max_steps: int
    batch_size: int
    lr: float
    weight_decay: float
    dropout: float
    class_weight: str | None
    eval_every: int
    max_train_seconds: float | None
    seed: int

    @abstractmethod
    def _build_net(self, n_features: int) -> torch.nn.Module:
        """A fresh network mapping (B, F) or (B, L, F) float32 to (B, 3) logits."""

    def _check_params(self) -> None:
        """Raise ValueError for hyperparameters the kind cannot train with."""
        if self.max_steps < 1 or self.batch_size < 1:
            raise ValueError("max_steps and batch_size must be >= 1")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.class_weight not in (None, "balanced"):
            raise ValueError(f"class_weight must be 'balanced' or None, got {self.class_weight!r}")

    @classmethod
    def library_versions(cls) -> dict[str, str]:
        return {
            "torch": str(torch.__version__),
            "safetensors": safetensors.__version__,
            "onnx": onnx.__version__,
            "numpy": np.__version__,
        }

    # ------------------------------------------------------------- training

    def _fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        X_val: np.ndarray | None,
        y_val: np.ndarray | None,
    ) -> dict[str, Any]:
        self._check_params()
        seq_len = self.sequence_length
        mean, scale = standardiser(X)
        Xs = scale_rows(X, mean, scale)
        ends = window_ends(X.shape[0], seq_len)

        val: tuple[torch.Tensor, torch.Tensor] | None = None
        if X_val is not None and y_val is not None and self.eval_every > 0:
            v_ends = window_ends(X_val.shape[0], seq_len)
            if len(v_ends) == 0:
                raise ValueError(
                    f"validation data too short: {X_val.shape[0]} rows, no full window of {seq_len}"
                )
            if len(v_ends) > MAX_VAL_SAMPLES:
                pick = np.linspace(0, len(v_ends) - 1, MAX_VAL_SAMPLES).round().astype(np.int64)
                v_ends = v_ends[np.unique(pick)]
            Xvs = scale_rows(X_val, mean, scale)
            val = (
                torch.from_numpy(gather(Xvs, v_ends, seq_len)),
                torch.from_numpy(y_val[v_ends]),
            )

        with torch_runtime():
            torch.manual_seed(self.seed)
            net = self._build_net(X.shape[1])
            optimiser = torch.optim.Adam(
                net.parameters(), lr=self.lr, weight_decay=self.weight_decay
            )
            weight = None
            if self.class_weight == "balanced":
                weight = torch.from_numpy(balanced_class_weights(y[ends]).astype(np.float32))
            loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
            sampler = _Sampler(ends, self.batch_size, self.seed)
            labels = torch.from_numpy(y)
            recent: list[float] = []
            best: tuple[int, float, dict[str, torch.Tensor]] | None = None
            started = time.monotonic()
            for step in range(1, self.max_steps + 1):
                batch = sampler.next()
                xb = torch.from_numpy(gather(Xs, batch, seq_len))
                yb = labels[torch.from_numpy(batch)]
                net.train()
                optimiser.zero_grad(set_to_none=True)
                loss = loss_fn(net(xb), yb)
                loss_value = float(loss.detach())
                if not np.isfinite(loss_value):
                    raise TrainingError(
                        f"{self.kind}: training loss became {loss_value} at step {step} "
                        f"(lr={self.lr}): lower the learning rate or check the features"
                    )
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=1.0)
                optimiser.step()
                recent.append(loss_value)
                del recent[:-50]
                elapsed_s = time.monotonic() - started
                if self.max_train_seconds is not None and elapsed_s > self.max_train_seconds:
                    raise TrainingError(
                        f"{self.kind}: {step}/{self.max_steps} steps took {elapsed_s:.1f} s, over "
                        f"max_train_seconds={self.max_train_seconds}: lower max_steps (or raise "
                        "the cap); the run is refused rather than cut short"
                    )
                if val is not None and (step % self.eval_every == 0 or step == self.max_steps):
                    net.eval()
                    with torch.inference_mode():
                        val_loss = float(torch.nn.functional.cross_entropy(net(val[0]), val[1]))
                    if best is None or val_loss < best[1]:
                        state = {k: v.detach().clone() for k, v in net.state_dict().items()}
                        best = (step, val_loss, state)
            if best is not None:
                net.load_state_dict(best[2])
            net.eval()

        self.net_ = net
        self.scaler_mean_ = mean
        self.scaler_scale_ = scale
        return {
            "budget": "optimiser_steps",
            "max_steps": self.max_steps,
            "batch_size": self.batch_size,
            "steps_done": self.max_steps,
            "best_step": None if best is None else best[0],
            "val_loss": None if best is None else finite_or_none(best[1]),
            "final_train_loss": finite_or_none(float(np.mean(recent))),
        }

    # ------------------------------------------------------------- prediction

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        seq_len = self.sequence_length
        Xs = scale_rows(X, self.scaler_mean_, self.scaler_scale_)
        out = np.full((X.shape[0], 3), np.nan, dtype=np.float64)
        ends = window_ends(X.shape[0], seq_len)
        model = _Probabilities(self.net_).eval()
        with torch_runtime(), torch.inference_mode():
            for start in range(0, len(ends), PREDICT_CHUNK):
                chunk = ends[start : start + PREDICT_CHUNK]
                probs = model(torch.from_numpy(gather(Xs, chunk, seq_len)))
                out[chunk] = probs.numpy()
        return out

    def _scaler(self) -> tuple[np.ndarray, np.ndarray, bool]:
        return self.scaler_mean_, self.scaler_scale_, False

    # ------------------------------------------------------------- persistence

    def _save_native(self, directory: Path) -> list[str]:
        tensors = {k: v.detach().contiguous() for k, v in self.net_.state_dict().items()}
        (directory / NATIVE_FILE).write_bytes(save_safetensors(tensors))
        return [NATIVE_FILE]

    def _input_shape(self, batch: int) -> tuple[int, ...]:
        if self.sequence_length:
            return (batch, self.sequence_length, self.n_features_in_)
        return (batch, self.n_features_in_)

    def _onnx_bytes(self) -> bytes:
        model = _Probabilities(self.net_).eval()
        with (
            tempfile.TemporaryDirectory(prefix="onnx-export-") as tmp,
            warnings.catch_warnings(),
            torch_runtime(),
        ):
            path = Path(tmp) / "model.onnx"
            # The TorchScript exporter warns that it is deprecated, that it traces
            # (fine: the graphs have no data-dependent control flow) and that an
            # LSTM with a dynamic batch needs h0/c0 (they default to zeros of the
            # batch size in the exported graph; tests check batch > 1).
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (torch.zeros(self._input_shape(1)),),
                path,
                dynamo=False,
                input_names=[ONNX_INPUT],
                output_names=[ONNX_OUTPUT],
                dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
                opset_version=ONNX_OPSET,
                do_constant_folding=True,
            )
            return path.read_bytes()

    def _load_native(
        self,
        directory: Path,
        n_features: int,
        mean: np.ndarray,
        scale: np.ndarray,
        identity: bool,
    ) -> None:
        path = directory / NATIVE_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise ArtifactError(f"{path}: missing") from None
        try:
            tensors = load_safetensors(raw)
        except Exception as exc:  # safetensors raises its own error types
            raise ArtifactError(f"{path}: not a safetensors file ({exc})") from exc
        self._check_params()
        with torch_runtime():
            torch.manual_seed(self.seed)
            net = self._build_net(n_features)
        try:
            net.load_state_dict(tensors, strict=True)
        except RuntimeError as exc:
            raise ArtifactError(f"{path}: weights do not fit the architecture ({exc})") from exc
        net.eval()
        self.net_ = net
        self.scaler_mean_ = mean
        self.scaler_scale_ = scale
