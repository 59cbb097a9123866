"""One conformance suite over every model kind in the registry (plus the BiLSTM variant).

Data: seeded random float32 rows with a learnable rule (class from the sign
and size of ``x0 + x1``); tiny hyperparameters keep the file fast. A kind
added to ``ml.kinds.KINDS`` is picked up here with its default
hyperparameters unless it gets a line in ``SMALL``.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ml.kinds import KINDS, UnknownKindError, get_kind
from ml.kinds.base import (
    META_FILE,
    ONNX_FILE,
    SCALER_FILE,
    ArtifactError,
    FeatureMismatchError,
    ModelKind,
    NotFittedError,
    TrainingError,
)
from ml.serving import OnnxPredictor

ROOT = Path(__file__).resolve().parents[1]
FEATURE_HASH = "a1b2c3d4e5f60718"
OTHER_HASH = "ffffffffffffffff"
N_ROWS, N_FEATURES, N_TRAIN = 600, 12, 450
NAMES = tuple(f"f{i}" for i in range(N_FEATURES))

SMALL: dict[str, dict[str, Any]] = {
    "rf": {"n_estimators": 20, "max_depth": 6},
    "xgb": {"n_estimators": 20, "max_depth": 3},
    "lstm": {
        "seq_len": 10,
        "hidden_size_1": 16,
        "hidden_size_2": 8,
        "max_steps": 30,
        "batch_size": 64,
        "lr": 1e-2,
        "eval_every": 10,
    },
    "mlp": {"max_steps": 30, "batch_size": 64, "lr": 1e-2, "eval_every": 10},
}
CASES = [pytest.param(kind, SMALL.get(kind, {}), id=kind) for kind in sorted(KINDS)] + [
    pytest.param(
        "lstm", {**SMALL["lstm"], "architecture": "bilstm_attention"}, id="lstm-bilstm_attention"
    )
]
# The same cases as single values, for the module-scoped fixture.
FIXTURE_CASES = [pytest.param(tuple(c.values), id=c.id) for c in CASES]
TORCH_KINDS = ["lstm", "mlp"]


def make_data(seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N_ROWS, N_FEATURES)).astype(np.float32)
    signal = X[:, 0] + X[:, 1]
    y = np.where(signal > 0.6, 2, np.where(signal < -0.6, 0, 1)).astype(np.int64)
    return X, y


X_ALL, Y_ALL = make_data()
X_TRAIN, Y_TRAIN = X_ALL[:N_TRAIN], Y_ALL[:N_TRAIN]
X_TEST, Y_TEST = X_ALL[N_TRAIN:], Y_ALL[N_TRAIN:]


def fit_new(kind: str, params: dict[str, Any], **fit_kwargs: Any) -> ModelKind:
    return get_kind(kind)(**params).fit(
        X_TRAIN, Y_TRAIN, feature_hash=FEATURE_HASH, feature_names=NAMES, **fit_kwargs
    )


def sha256s(directory: Path, names: list[str]) -> dict[str, str]:
    return {n: hashlib.sha256((directory / n).read_bytes()).hexdigest() for n in names}


@pytest.fixture(scope="module", params=FIXTURE_CASES)
def saved(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, dict[str, Any], ModelKind, Path, list[str]]:
    """(kind, params, fitted model, its saved directory, file names) per case, built once."""
    kind, params = request.param
    model = fit_new(kind, params)
    directory = tmp_path_factory.mktemp(f"{kind}-model")
    files = model.save(directory)
    return kind, params, model, directory, files


# ----------------------------------------------------------------------------- registry


def test_every_registry_entry_resolves_to_a_model_kind_of_that_name() -> None:
    assert set(KINDS) >= {"rf", "xgb", "lstm", "mlp"}
    for name in KINDS:
        cls = get_kind(name)
        assert issubclass(cls, ModelKind)
        assert cls.kind == name


def test_unknown_kind_is_refused_with_the_known_ones_named() -> None:
    with pytest.raises(UnknownKindError, match="known kinds: lstm, mlp, rf, xgb"):
        get_kind("svm")


def test_importing_the_registry_and_base_loads_no_heavy_library() -> None:
    code = (
        "import sys, ml.kinds, ml.kinds.base; "
        "heavy = {'torch', 'xgboost', 'sklearn', 'skops', 'onnx', 'onnxruntime'}; "
        "assert not heavy & set(sys.modules), heavy & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


# ----------------------------------------------------------------------------- estimator contract


@pytest.mark.parametrize(("kind", "params"), CASES)
def test_init_only_stores_hyperparameters(kind: str, params: dict[str, Any]) -> None:
    model = get_kind(kind)(**params)
    got = model.get_params()
    assert {k: got[k] for k in params} == params
    assert get_kind(kind)(**got).get_params() == got
    assert not [k for k in vars(model) if k.endswith("_") and not k.startswith("_")]
    json.dumps(got)  # hyperparameters are JSON values (they go into model_meta.json)


@pytest.mark.parametrize(("kind", "params"), CASES)
def test_unfitted_model_raises_not_fitted(
    kind: str, params: dict[str, Any], tmp_path: Path
) -> None:
    model = get_kind(kind)(**params)
    for use in (
        lambda: model.predict_proba(X_TEST),
        lambda: model.save(tmp_path),
        model.warmup,
    ):
        with pytest.raises(NotFittedError, match="not fitted"):
            use()
    assert issubclass(NotFittedError, ValueError) and issubclass(NotFittedError, AttributeError)
    assert not any(tmp_path.iterdir())


def test_fit_returns_self_with_fitted_attributes(
    saved: tuple[str, dict[str, Any], ModelKind, Path, list[str]],
) -> None:
    kind, params, model, _, _ = saved
    assert isinstance(model, get_kind(kind))
    again = get_kind(kind)(**params)
    assert again.fit(X_TRAIN, Y_TRAIN, feature_hash=FEATURE_HASH, feature_names=NAMES) is again
    assert list(model.classes_) == [0, 1, 2]
    assert model.n_features_in_ == N_FEATURES
    assert model.feature_hash_ == FEATURE_HASH
    assert model.feature_names_ == NAMES
    assert model.training_["n_rows"] == N_TRAIN


def test_fit_is_idempotent(saved: tuple[str, dict[str, Any], ModelKind, Path, list[str]]) -> None:
    model = saved[2]
    first = model.predict_proba(X_TEST)
    model.fit(X_TRAIN, Y_TRAIN, feature_hash=FEATURE_HASH, feature_names=NAMES)
    np.testing.assert_array_equal(model.predict_proba(X_TEST), first)


def test_probabilities_have_nan_exactly_before_the_first_full_window(
    saved: tuple[str, dict[str, Any], ModelKind, Path, list[str]],
) -> None:
    _, _, model, _, _ = saved
    proba = model.predict_proba(X_TEST)
    seq = model.sequence_length
    assert proba.shape == (len(X_TEST), 3)
    assert np.isnan(proba[: max(seq - 1, 0)]).all()
    valid = proba[max(seq - 1, 0) :]
    assert np.isfinite(valid).all()
    np.testing.assert_allclose(valid.sum(axis=1), 1.0, atol=1e-5)


def test_learns_the_rule_better_than_chance_on_held_out_rows(
    saved: tuple[str, dict[str, Any], ModelKind, Path, list[str]],
) -> None:
    _, _, model, _, _ = saved
    predicted = model.predict(X_TEST)
    scored = predicted >= 0
    accuracy = float((predicted[scored] == Y_TEST[scored]).mean())
    majority = float(np.bincount(Y_TEST[scored]).max() / scored.sum())
    assert accuracy > majority + 0.1, (accuracy, majority)


def test_warmup_runs_every_input_shape_and_changes_nothing(
    saved: tuple[str, dict[str, Any], ModelKind, Path, list[str]],
) -> None:
    model = saved[2]
    before = model.predict_proba(X_TEST[:80])
    model.warmup()
    np.testing.assert_array_equal(model.predict_proba(X_TEST[:80]), before)


# ----------------------------------------------------------------------------- artifacts


def test_save_writes_native_onnx_scaler_and_meta(
    saved: tuple[str, dict[str, Any], ModelKind, Path, list[str]],
) -> None:
    kind, params, model, directory, files = saved
    assert sorted(p.name for p in directory.iterdir()) == sorted(files)
    assert {ONNX_FILE, SCALER_FILE, META_FILE} < set(files) and len(files) == 4
    meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    assert meta["kind"] == kind
    assert meta["feature_hash"] == FEATURE_HASH
    assert meta["feature_names"] == list(NAMES)
    assert meta["n_features"] == N_FEATURES
    assert meta["sequence_length"] == model.sequence_length
    assert meta["hyperparams"] == model.get_params()
    assert meta["library_versions"]
    if kind in TORCH_KINDS:
        assert meta["training"]["budget"] == "optimiser_steps"
        assert meta["training"]["max_steps"] == params["max_steps"]
    scaler = json.loads((directory / SCALER_FILE).read_text(encoding="utf-8"))
    assert scaler["type"] == ("standard" if kind in TORCH_KINDS else "identity")
    assert len(scaler["mean"]) == len(scaler["scale"]) == N_FEATURES


def test_save_load_round_trips_to_identical_probabilities(
    saved: tuple[str, dict[str, Any], ModelKind, Path, list[str]],
) -> None:
    kind, _, model, directory, _ = saved
    loaded = get_kind(kind).load(directory, feature_hash=FEATURE_HASH)
    assert loaded.get_params() == model.get_params()
    assert loaded.feature_names_ == NAMES and loaded.n_features_in_ == N_FEATURES
    np.testing.assert_array_equal(loaded.predict_proba(X_TEST), model.predict_proba(X_TEST))
    loaded.warmup()


@pytest.mark.parametrize(("kind", "params"), CASES)
def test_training_twice_gives_byte_identical_artifacts(
    kind: str, params: dict[str, Any], tmp_path: Path
) -> None:
    files_a = fit_new(kind, params).save(tmp_path / "a")
    files_b = fit_new(kind, params).save(tmp_path / "b")
    assert files_a == files_b
    assert sha256s(tmp_path / "a", files_a) == sha256s(tmp_path / "b", files_b)


def test_loading_and_saving_again_writes_the_same_bytes(
    saved: tuple[str, dict[str, Any], ModelKind, Path, list[str]], tmp_path: Path
) -> None:
    kind, _, _, directory, files = saved
    assert get_kind(kind).load(directory, feature_hash=FEATURE_HASH).save(tmp_path) == files
    assert sha256s(tmp_path, files) == sha256s(directory, files)


def test_artifacts_are_byte_identical_across_processes(
    saved: tuple[str, dict[str, Any], ModelKind, Path, list[str]],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A retrain in a fresh worker process must reproduce the hashes (no ids, clocks, uuids)."""
    kind, params, _, directory, files = saved
    out = tmp_path_factory.getbasetemp() / "other-process"
    if not out.exists():  # one subprocess trains every case, the first time it is needed
        script = (
            "import sys, json\n"
            "from pathlib import Path\n"
            "from tests.test_model_kinds import CASES, fit_new\n"
            "for case in CASES:\n"
            "    kind, params = case.values\n"
            "    fit_new(kind, params).save(Path(sys.argv[1]) / case.id)\n"
        )
        subprocess.run([sys.executable, "-c", script, str(out)], cwd=ROOT, check=True, timeout=120)
    case_id = next(c.id for c in CASES if c.values == (kind, params))
    assert sha256s(out / str(case_id), files) == sha256s(directory, files)


def test_native_and_onnx_agree(
    saved: tuple[str, dict[str, Any], ModelKind, Path, list[str]],
) -> None:
    kind, _, model, directory, _ = saved
    predictor = OnnxPredictor.load(directory, feature_hash=FEATURE_HASH, kind=kind, version="1.0.0")
    served = predictor.predict_proba_batch(X_TEST)
    native = model.predict_proba(X_TEST)
    assert np.array_equal(np.isnan(served), np.isnan(native))
    np.testing.assert_allclose(served, native, atol=1e-5, rtol=0, equal_nan=True)


def test_feature_spec_mismatch_is_refused_by_native_and_onnx_loaders(
    saved: tuple[str, dict[str, Any], ModelKind, Path, list[str]],
) -> None:
    kind, _, _, directory, _ = saved
    with pytest.raises(FeatureMismatchError) as native:
        get_kind(kind).load(directory, feature_hash=OTHER_HASH)
    with pytest.raises(FeatureMismatchError) as served:
        OnnxPredictor.load(directory, feature_hash=OTHER_HASH, kind=kind, version="1.0.0")
    for exc in (native.value, served.value):
        assert FEATURE_HASH in str(exc) and OTHER_HASH in str(exc)


def test_a_model_of_another_kind_is_refused(
    saved: tuple[str, dict[str, Any], ModelKind, Path, list[str]],
) -> None:
    kind, _, _, directory, _ = saved
    other = "mlp" if kind != "mlp" else "rf"
    with pytest.raises(ArtifactError, match=f"holds a '{kind}' model"):
        get_kind(other).load(directory, feature_hash=FEATURE_HASH)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_truncated_native_artifact_is_refused(kind: str, tmp_path: Path) -> None:
    model = fit_new(kind, SMALL.get(kind, {}))
    files = model.save(tmp_path)
    native = tmp_path / files[0]
    native.write_bytes(native.read_bytes()[: native.stat().st_size // 2])
    with pytest.raises(ArtifactError, match=files[0]):
        get_kind(kind).load(tmp_path, feature_hash=FEATURE_HASH)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bad_training_data_is_refused_with_a_reason(kind: str) -> None:
    model = get_kind(kind)(**SMALL.get(kind, {}))
    nan_rows = X_TRAIN.copy()
    nan_rows[5, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        model.fit(nan_rows, Y_TRAIN, feature_hash=FEATURE_HASH, feature_names=NAMES)
    with pytest.raises(ValueError, match="all three classes"):
        model.fit(X_TRAIN, np.ones_like(Y_TRAIN), feature_hash=FEATURE_HASH, feature_names=NAMES)
    with pytest.raises(ValueError, match="too short"):
        model.fit(X_TRAIN[:20], Y_TRAIN[:20], feature_hash=FEATURE_HASH, feature_names=NAMES)
    with pytest.raises(ValueError, match="feature names"):
        model.fit(X_TRAIN, Y_TRAIN, feature_hash=FEATURE_HASH, feature_names=NAMES[:-1])
    with pytest.raises(ValueError, match="classes are 0, 1, 2"):
        model.fit(X_TRAIN, Y_TRAIN + 1, feature_hash=FEATURE_HASH, feature_names=NAMES)
    with pytest.raises(NotFittedError):
        model.predict_proba(X_TEST)


def test_predicting_with_the_wrong_number_of_features_is_refused(
    saved: tuple[str, dict[str, Any], ModelKind, Path, list[str]],
) -> None:
    with pytest.raises(ValueError, match="expects 12"):
        saved[2].predict_proba(X_TEST[:, :5])


# ----------------------------------------------------------------------------- torch budgets


@pytest.mark.parametrize("kind", TORCH_KINDS)
def test_wall_clock_cap_fails_the_fit_instead_of_cutting_it_short(kind: str) -> None:
    model = get_kind(kind)(**{**SMALL[kind], "max_train_seconds": 0.0})
    with pytest.raises(TrainingError, match="max_train_seconds"):
        model.fit(X_TRAIN, Y_TRAIN, feature_hash=FEATURE_HASH, feature_names=NAMES)
    with pytest.raises(NotFittedError):
        model.predict_proba(X_TEST)


@pytest.mark.parametrize("kind", [*TORCH_KINDS, "xgb"])
def test_validation_data_picks_a_checkpoint_deterministically_within_the_budget(
    kind: str, tmp_path: Path
) -> None:
    params = {**SMALL[kind]}
    if kind == "xgb":
        params["early_stopping_rounds"] = 3
    val = {"X_val": X_TEST, "y_val": Y_TEST}
    first = fit_new(kind, params, **val)
    second = fit_new(kind, params, **val)
    np.testing.assert_array_equal(first.predict_proba(X_TEST), second.predict_proba(X_TEST))
    if kind == "xgb":
        best = first.training_["best_iteration"]
        assert best is not None and first.training_["n_rounds"] == best + 1 <= 20
    else:
        assert 1 <= first.training_["best_step"] <= params["max_steps"]
        assert first.training_["val_loss"] > 0
    # The cut model is what gets saved and served: native and ONNX still agree.
    first.save(tmp_path)
    served = OnnxPredictor.load(tmp_path, feature_hash=FEATURE_HASH, kind=kind, version="1.0.0")
    np.testing.assert_allclose(
        served.predict_proba_batch(X_TEST), first.predict_proba(X_TEST), atol=1e-5, equal_nan=True
    )


# ----------------------------------------------------------------------------- safe loading


class _WritesMarker:
    """Unpickling this opens (creates) ``path``: a stand-in for arbitrary code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def rf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("rf-clean")
    fit_new("rf", SMALL["rf"]).save(directory)
    return directory


def _planted(rf_dir: Path, tmp_path: Path, payload: bytes) -> Path:
    target = tmp_path / "planted"
    target.mkdir()
    for item in rf_dir.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    (target / "model.skops").write_bytes(payload)
    return target


def test_a_pickle_payload_in_place_of_the_skops_file_is_refused_and_never_runs(
    rf_dir: Path, tmp_path: Path
) -> None:
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(_WritesMarker(control)))  # noqa: S301 - proves the payload is live
    assert control.exists()

    marker = tmp_path / "marker"
    target = _planted(rf_dir, tmp_path, pickle.dumps(_WritesMarker(marker)))
    with pytest.raises(ArtifactError, match="not a skops archive"):
        get_kind("rf").load(target, feature_hash=FEATURE_HASH)
    assert not marker.exists()


def test_a_skops_file_with_an_untrusted_type_is_refused(rf_dir: Path, tmp_path: Path) -> None:
    import skops.io as sio

    marker = tmp_path / "marker"
    target = _planted(rf_dir, tmp_path, sio.dumps(_WritesMarker(marker)))
    with pytest.raises(ArtifactError, match="_WritesMarker"):
        get_kind("rf").load(target, feature_hash=FEATURE_HASH)
    assert not marker.exists()


def _skops_with(schema_edit: Any, base: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(base)) as zin:
        members = {n: zin.read(n) for n in zin.namelist()}
    schema = json.loads(members["schema.json"])
    schema_edit(schema)
    members["schema.json"] = json.dumps(schema).encode("utf-8")
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zout:
        for name, data in members.items():
            zout.writestr(name, data)
    return out.getvalue()


def _open_call(path: Path) -> dict[str, Any]:
    """A skops node that calls ``builtins.open(path, "w")`` when constructed."""
    import skops.io as sio

    with zipfile.ZipFile(io.BytesIO(sio.dumps((str(path), "w")))) as zin:
        args = json.loads(zin.read("schema.json"))
    for key in ("protocol", "_skops_version"):
        args.pop(key)
    return {
        "__class__": "open",
        "__module__": "builtins",
        "__loader__": "ConstructorFromReduceNode",
        "content": args,
        "__id__": 999_999_001,
    }


def test_a_code_running_node_planted_inside_a_real_forest_is_refused(
    rf_dir: Path, tmp_path: Path
) -> None:
    import skops.io as sio

    # The node really runs code when a loader trusts it...
    control = tmp_path / "control-marker"
    standalone = {**_open_call(control), "protocol": 2}
    with zipfile.ZipFile(buffer := io.BytesIO(), "w") as zout:
        zout.writestr("schema.json", json.dumps(standalone))
    sio.loads(buffer.getvalue(), trusted=["builtins.open"])
    assert control.exists()

    # ...but planted in our forest it is refused before anything is built.
    marker = tmp_path / "marker"
    payload = _skops_with(
        lambda s: s["content"]["content"].__setitem__("oob_score", _open_call(marker)),
        (rf_dir / "model.skops").read_bytes(),
    )
    target = _planted(rf_dir, tmp_path, payload)
    with pytest.raises(ArtifactError, match=r"builtins\.open \(ConstructorFromReduceNode\)"):
        get_kind("rf").load(target, feature_hash=FEATURE_HASH)
    assert not marker.exists()


def test_a_forest_with_out_of_bounds_tree_nodes_is_refused(rf_dir: Path, tmp_path: Path) -> None:
    import skops.io as sio

    from ml.kinds.rf import canonical_skops

    forest = sio.load(rf_dir / "model.skops", trusted=["sklearn.tree._tree.Tree"])
    state = forest.estimators_[0].tree_.__getstate__()
    nodes = state["nodes"].copy()
    internal = np.flatnonzero(nodes["left_child"] != -1)[0]
    nodes["feature"][internal] = 10_000  # would be read out of bounds at predict time
    state["nodes"] = nodes
    forest.estimators_[0].tree_.__setstate__(state)
    target = _planted(rf_dir, tmp_path, canonical_skops(sio.dumps(forest)))
    with pytest.raises(ArtifactError, match="inconsistent node array"):
        get_kind("rf").load(target, feature_hash=FEATURE_HASH)
