"""``xgb``: XGBoost gradient-boosted trees (hist, multi:softprob) on the feature rows.

Native artifact ``model.ubj``: the Booster's own UBJSON (``save_raw("ubj")``),
which holds trees and numbers only (loading it runs no code, and UBJ loads ~10x
faster than JSON). ONNX via onnxmltools (it carries xgboost 3's per-class base
scores). Imbalanced labels: "balanced" sample weights.

Validation data: used only when ``early_stopping_rounds`` is set, to stop
early inside the ``n_estimators`` budget; the kept booster is cut to the best
iteration, so native, saved and ONNX predictions all use the same trees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import onnxmltools
import xgboost
from onnxmltools import convert_xgboost
from onnxmltools.convert.common.data_types import FloatTensorType

from ml.kinds.base import (
    N_CLASSES,
    ONNX_INPUT,
    ArtifactError,
    ModelKind,
    balanced_class_weights,
    keep_only_output,
)

NATIVE_FILE = "model.ubj"
# onnxmltools 1.16 converts xgboost with opsets up to 15.
_ONNX_OPSET = 15


class XGBoostModel(ModelKind):
    kind: ClassVar[str] = "xgb"
    major_libraries: ClassVar[tuple[str, ...]] = ("xgboost",)

    def __init__(
        self,
        *,
        n_estimators: int = 100,
        max_depth: int = 4,
        learning_rate: float = 0.2,
        subsample: float = 0.8,
        colsample_bytree: float = 0.8,
        min_child_weight: float = 1.0,
        reg_lambda: float = 1.0,
        class_weight: str | None = "balanced",
        early_stopping_rounds: int | None = None,
        n_jobs: int = 1,
        random_state: int = 0,
    ) -> None:
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.learning_rate = learning_rate
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.min_child_weight = min_child_weight
        self.reg_lambda = reg_lambda
        self.class_weight = class_weight
        self.early_stopping_rounds = early_stopping_rounds
        self.n_jobs = n_jobs
        self.random_state = random_state

    @classmethod
    def library_versions(cls) -> dict[str, str]:
        return {
            "xgboost": xgboost.__version__,
            "onnxmltools": onnxmltools.__version__,
            "onnx": onnx.__version__,
            "numpy": np.__version__,
        }

    def _fit(
        self,
        X: np.ndarray,
        y: np.ndarray,
        X_val: np.ndarray | None,
        y_val: np.ndarray | None,
    ) -> dict[str, Any]:
        if self.class_weight not in (None, "balanced"):
            raise ValueError(f"class_weight must be 'balanced' or None, got {self.class_weight!r}")
        early = self.early_stopping_rounds if X_val is not None else None
        clf = xgboost.XGBClassifier(
            tree_method="hist",
            objective="multi:softprob",
            eval_metric="mlogloss",
            n_estimators=self.n_estimators,
            max_depth=self.max_depth,
            learning_rate=self.learning_rate,
            subsample=self.subsample,
            colsample_bytree=self.colsample_bytree,
            min_child_weight=self.min_child_weight,
            reg_lambda=self.reg_lambda,
            early_stopping_rounds=early,
            n_jobs=self.n_jobs,
            random_state=self.random_state,
        )
        weights = None
        if self.class_weight == "balanced":
            weights = balanced_class_weights(y)[y]
        fit_kwargs: dict[str, Any] = {"sample_weight": weights, "verbose": False}
        if early is not None:
            fit_kwargs["eval_set"] = [(X_val, y_val)]
        clf.fit(X, y, **fit_kwargs)
        booster = clf.get_booster()
        best_iteration: int | None = None
        if early is not None:
            best_iteration = int(clf.best_iteration)
            booster = booster[: best_iteration + 1]
        # Serving and native prediction run single-threaded, like the daemon.
        booster.set_param({"nthread": 1})
        self.booster_ = booster
        return {"n_rounds": int(booster.num_boosted_rounds()), "best_iteration": best_iteration}

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.booster_.inplace_predict(X), dtype=np.float64)

    def _scaler(self) -> tuple[np.ndarray, np.ndarray, bool]:
        n = self.n_features_in_
        return np.zeros(n, np.float32), np.ones(n, np.float32), True

    def _save_native(self, directory: Path) -> list[str]:
        (directory / NATIVE_FILE).write_bytes(bytes(self.booster_.save_raw(raw_format="ubj")))
        return [NATIVE_FILE]

    def _onnx_bytes(self) -> bytes:
        model = convert_xgboost(
            self.booster_,
            name="xgb",  # the default is a random uuid4, which would change the file's hash
            initial_types=[(ONNX_INPUT, FloatTensorType([None, self.n_features_in_]))],
            target_opset=_ONNX_OPSET,
        )
        keep_only_output(model)
        return bytes(model.SerializeToString())

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
        booster = xgboost.Booster()
        try:
            booster.load_model(bytearray(raw))
        except xgboost.core.XGBoostError as exc:
            raise ArtifactError(f"{path}: not a valid XGBoost model ({exc})") from exc
        if booster.num_features() != n_features:
            raise ArtifactError(
                f"{path}: booster has {booster.num_features()} features, meta says {n_features}"
            )
        probe = booster.inplace_predict(np.zeros((1, n_features), np.float32))
        if np.shape(probe) != (1, N_CLASSES):
            raise ArtifactError(f"{path}: booster does not output {N_CLASSES} class probabilities")
        booster.set_param({"nthread": 1})
        self.booster_ = booster
