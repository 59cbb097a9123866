"""The ONNX serving path: import isolation, window handling, scaler, batch parity.

Hand-built graphs make the behaviour visible: an identity graph returns the
scaled row itself, a "first row of the window" graph shows which rows the
ring buffer hands to the model. Trained tiny models of every kind check that
batched and single-row probabilities agree.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from ml.kinds import KINDS, get_kind
from ml.kinds.base import (
    META_FILE,
    ONNX_FILE,
    SCALER_FILE,
    ArtifactError,
    FeatureMismatchError,
    dump_json_bytes,
    scaler_payload,
)
from ml.serving import OnnxPredictor, PredictorNotReady
from strategy.baseline import Predictor

ROOT = Path(__file__).resolve().parents[1]
HASH = "0123456789abcdef"
F = 3
MEAN = np.array([1.0, -2.0, 0.5], dtype=np.float32)
SCALE = np.array([2.0, 0.25, 3.0], dtype=np.float32)


def _write_model(
    directory: Path,
    graph: onnx.GraphProto,
    *,
    kind: str,
    seq_len: int,
    identity: bool = False,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    (directory / ONNX_FILE).write_bytes(model.SerializeToString())
    mean, scale = (np.zeros(F), np.ones(F)) if identity else (MEAN, SCALE)
    (directory / SCALER_FILE).write_bytes(
        dump_json_bytes(scaler_payload(mean, scale, identity=identity))
    )
    meta = {
        "format": 1,
        "kind": kind,
        "feature_hash": HASH,
        "feature_names": ["a", "b", "c"],
        "n_features": F,
        "sequence_length": seq_len,
        "hyperparams": {},
        "library_versions": {},
    }
    (directory / META_FILE).write_bytes(dump_json_bytes(meta))
    return directory


def identity_model(directory: Path, *, identity_scaler: bool = False) -> Path:
    """A row "model" whose probabilities are its (scaled) input row."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["probabilities"])],
        "identity",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", F])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", F])],
    )
    return _write_model(directory, graph, kind="ident", seq_len=0, identity=identity_scaler)


def first_of_window_model(directory: Path, seq_len: int) -> Path:
    """A sequence "model" returning the first (oldest) scaled row of its window."""
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["zero"], value_int=0),
            helper.make_node("Gather", ["input", "zero"], ["probabilities"], axis=1),
        ],
        "first_of_window",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", seq_len, F])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", F])],
    )
    return _write_model(directory, graph, kind="window", seq_len=seq_len)


def scaled(row: np.ndarray) -> np.ndarray:
    return (row.astype(np.float32) - MEAN) / SCALE


def rows(n: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, F)).astype(np.float32) * 5


# ----------------------------------------------------------------------------- isolation


def test_serving_imports_neither_torch_xgboost_nor_sklearn() -> None:
    code = (
        "import ml.serving, sys; "
        "assert not {'torch','xgboost','sklearn'} & set(sys.modules), "
        "{'torch','xgboost','sklearn'} & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


# ----------------------------------------------------------------------------- behaviour


def test_the_scaler_is_applied_before_the_graph(tmp_path: Path) -> None:
    predictor = OnnxPredictor.load(
        identity_model(tmp_path), feature_hash=HASH, kind="ident", version="1.2.3"
    )
    assert isinstance(predictor, Predictor)
    assert (predictor.kind, predictor.version, predictor.feature_hash) == ("ident", "1.2.3", HASH)
    X = rows(20)
    for row in X:
        np.testing.assert_array_equal(predictor.predict_proba(row), scaled(row))
    np.testing.assert_array_equal(predictor.predict_proba_batch(X), scaled(X))
    # A float64 row is cast to float32 first, as training did.
    np.testing.assert_array_equal(predictor.predict_proba(X[0].astype(np.float64)), scaled(X[0]))


def test_an_identity_scaler_passes_rows_through(tmp_path: Path) -> None:
    predictor = OnnxPredictor.load(
        identity_model(tmp_path, identity_scaler=True), feature_hash=HASH, kind="ident", version="1"
    )
    X = rows(5)
    np.testing.assert_array_equal(predictor.predict_proba(X[1]), X[1])


def test_the_returned_probabilities_are_not_overwritten_by_the_next_call(tmp_path: Path) -> None:
    predictor = OnnxPredictor.load(
        identity_model(tmp_path), feature_hash=HASH, kind="ident", version="1"
    )
    X = rows(2)
    first = predictor.predict_proba(X[0])
    predictor.predict_proba(X[1])
    np.testing.assert_array_equal(first, scaled(X[0]))


def test_a_sequence_model_is_not_ready_until_its_window_is_full(tmp_path: Path) -> None:
    seq = 4
    predictor = OnnxPredictor.load(
        first_of_window_model(tmp_path, seq), feature_hash=HASH, kind="window", version="1"
    )
    X = rows(12)
    predictor.observe(X[0])
    for i in (1, 2):
        with pytest.raises(PredictorNotReady):
            predictor.predict_proba(X[i])
        assert not predictor.ready
    # The 4th row fills the window: rows 0..3, whose oldest is row 0.
    np.testing.assert_array_equal(predictor.predict_proba(X[3]), scaled(X[0]))
    assert predictor.ready
    # From then on every bar slides the window by one, across ring wrap-arounds.
    for i in range(4, 12):
        if i % 3 == 0:
            predictor.observe(X[i])
            continue
        np.testing.assert_array_equal(predictor.predict_proba(X[i]), scaled(X[i - seq + 1]))


def test_batch_windows_match_the_live_window_and_leave_it_alone(tmp_path: Path) -> None:
    seq = 4
    predictor = OnnxPredictor.load(
        first_of_window_model(tmp_path, seq), feature_hash=HASH, kind="window", version="1"
    )
    X = rows(10)
    batch = predictor.predict_proba_batch(X)
    assert np.isnan(batch[: seq - 1]).all()
    np.testing.assert_array_equal(batch[seq - 1 :], scaled(X[: len(X) - seq + 1]))
    with pytest.raises(PredictorNotReady):  # the batch did not fill the live window
        predictor.predict_proba(X[0])
    assert np.isnan(predictor.predict_proba_batch(X[:2])).all()


def test_warmup_does_not_touch_the_window(tmp_path: Path) -> None:
    seq = 3
    predictor = OnnxPredictor.load(
        first_of_window_model(tmp_path, seq), feature_hash=HASH, kind="window", version="1"
    )
    X = rows(4)
    predictor.observe(X[0])
    predictor.observe(X[1])
    predictor.warmup()
    np.testing.assert_array_equal(predictor.predict_proba(X[2]), scaled(X[0]))


def test_a_non_finite_row_is_refused_and_restarts_the_window(tmp_path: Path) -> None:
    seq = 3
    predictor = OnnxPredictor.load(
        first_of_window_model(tmp_path, seq), feature_hash=HASH, kind="window", version="1"
    )
    X = rows(8)
    for row in X[:3]:
        predictor.observe(row)
    bad = X[3].copy()
    bad[1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        predictor.predict_proba(bad)
    with pytest.raises(PredictorNotReady):
        predictor.predict_proba(X[4])
    predictor.observe(X[5])
    np.testing.assert_array_equal(predictor.predict_proba(X[6]), scaled(X[4]))


@pytest.mark.parametrize("seq", [0, 3])
def test_batches_give_nan_exactly_where_the_live_path_has_no_answer(
    seq: int, tmp_path: Path
) -> None:
    if seq:
        directory, kind = first_of_window_model(tmp_path, seq), "window"
    else:
        directory, kind = identity_model(tmp_path), "ident"
    live = OnnxPredictor.load(directory, feature_hash=HASH, kind=kind, version="1")
    X = rows(12)
    X[5, 2] = np.inf
    X[6, 0] = np.nan
    single = np.full((len(X), F), np.nan, dtype=np.float32)
    for i, row in enumerate(X):
        with contextlib.suppress(PredictorNotReady, ValueError):
            single[i] = live.predict_proba(row)
    batch = live.predict_proba_batch(X)
    np.testing.assert_array_equal(batch, single)  # NaN positions included
    assert np.isinf(X[5, 2]) and np.isnan(X[6, 0])  # the caller's rows are not modified


@pytest.mark.parametrize("maker", ["row", "window"])
def test_a_row_of_the_wrong_length_is_refused(maker: str, tmp_path: Path) -> None:
    if maker == "row":
        directory, kind = identity_model(tmp_path), "ident"
    else:
        directory, kind = first_of_window_model(tmp_path, 2), "window"
    predictor = OnnxPredictor.load(directory, feature_hash=HASH, kind=kind, version="1")
    for bad in (np.zeros(F + 1, np.float32), np.zeros(F - 1, np.float32), np.zeros((1, F))):
        with pytest.raises(ValueError, match=r"expects \(3,\)"):
            predictor.predict_proba(bad)
        with pytest.raises(ValueError, match=r"expects \(3,\)"):
            predictor.observe(bad)
    with pytest.raises(ValueError, match=r"expected \(n, 3\)"):
        predictor.predict_proba_batch(np.zeros((4, F + 1), np.float32))


def test_load_refuses_another_feature_spec_kind_or_graph(tmp_path: Path) -> None:
    directory = identity_model(tmp_path)
    with pytest.raises(FeatureMismatchError, match=f"{HASH}.*fedcba9876543210"):
        OnnxPredictor.load(directory, feature_hash="fedcba9876543210", kind="ident", version="1")
    with pytest.raises(ArtifactError, match="not 'lstm'"):
        OnnxPredictor.load(directory, feature_hash=HASH, kind="lstm", version="1")
    # A meta that disagrees with the graph's input shape.
    wrong = first_of_window_model(tmp_path / "w", 4)
    meta = (
        (wrong / META_FILE)
        .read_text(encoding="utf-8")
        .replace('"sequence_length": 4', '"sequence_length": 5')
    )
    (wrong / META_FILE).write_text(meta, encoding="utf-8")
    with pytest.raises(ArtifactError, match="input shape"):
        OnnxPredictor.load(wrong, feature_hash=HASH, kind="window", version="1")
    (directory / ONNX_FILE).write_bytes(b"not a graph")
    with pytest.raises(ArtifactError, match="ONNX Runtime cannot load it"):
        OnnxPredictor.load(directory, feature_hash=HASH, kind="ident", version="1")


def test_the_session_uses_one_thread_without_spinning(tmp_path: Path) -> None:
    predictor = OnnxPredictor.load(
        identity_model(tmp_path), feature_hash=HASH, kind="ident", version="1"
    )
    options = predictor._session.get_session_options()
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


# ----------------------------------------------------------------------------- trained kinds

SMALL: dict[str, dict[str, Any]] = {
    "rf": {"n_estimators": 10, "max_depth": 5},
    "xgb": {"n_estimators": 10, "max_depth": 3},
    "lstm": {"seq_len": 6, "hidden_size_1": 8, "hidden_size_2": 4, "max_steps": 10},
    "mlp": {"max_steps": 10},
}


@pytest.fixture(scope="module", params=sorted(KINDS))
def trained(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path, np.ndarray]:
    kind = request.param
    rng = np.random.default_rng(11)
    X = rng.standard_normal((300, 8)).astype(np.float32) * 3 + 1
    y = np.digitize(X[:, 0] - X[:, 1], [-2.0, 2.0])
    directory = tmp_path_factory.mktemp(kind)
    get_kind(kind)(**SMALL.get(kind, {})).fit(
        X[:200], y[:200], feature_hash=HASH, feature_names=[f"x{i}" for i in range(8)]
    ).save(directory)
    return kind, directory, X[200:]


def test_batched_probabilities_equal_single_row_ones(
    trained: tuple[str, Path, np.ndarray],
) -> None:
    kind, directory, X = trained
    predictor = OnnxPredictor.load(directory, feature_hash=HASH, kind=kind, version="1.0.0")
    predictor.warmup()
    batch = predictor.predict_proba_batch(X)
    single = np.full_like(batch, np.nan)
    for i, row in enumerate(X):
        try:
            single[i] = predictor.predict_proba(row)
        except PredictorNotReady:
            assert i < predictor.sequence_length - 1
    assert np.array_equal(np.isnan(batch), np.isnan(single))
    np.testing.assert_allclose(single, batch, atol=1e-6, rtol=0, equal_nan=True)
    valid = batch[max(predictor.sequence_length - 1, 0) :]
    np.testing.assert_allclose(valid.sum(axis=1), 1.0, atol=1e-5)
