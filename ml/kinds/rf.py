"""``rf``: scikit-learn RandomForestClassifier on the feature rows.

Native artifact ``model.skops``: skops' zip format, rewritten canonically
(object ids renumbered in document order, struct padding zeroed, fixed zip
timestamps) so that a
retrain of the same configuration gives identical bytes. Loading it never
runs code from the file: every node of its schema must be one of the
(module, class, loader) triples in :data:`ALLOWED_SKOPS_NODES`, written here,
and skops then loads with ``trusted=`` :data:`TRUSTED_TYPES`, also written
here; nothing the file says about its own types is ever trusted. The daemon
serves ``model.onnx`` (skl2onnx, ``TreeEnsembleClassifier``); ``model.skops``
is for inspection and retraining.

``sklearn.tree._tree.Tree`` is trusted only together with
:func:`check_forest`, which bounds-checks every tree's node array (what skops
cannot do, and why it does not trust ``Tree`` by default).

Validation data is not used: a forest has no iterative budget to stop early in.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnx
import skl2onnx
import sklearn
import skops
import skops.io as sio
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.ensemble import RandomForestClassifier
from sklearn.tree import DecisionTreeClassifier

from ml.kinds.base import ONNX_INPUT, ArtifactError, ModelKind, keep_only_output

NATIVE_FILE = "model.skops"
_ONNX_OPSETS = {"": 17, "ai.onnx.ml": 3}

# Every node a fitted forest's skops schema may hold. Anything else is refused
# before skops builds a single object.
ALLOWED_SKOPS_NODES: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("sklearn.ensemble._forest", "RandomForestClassifier", "ObjectNode"),
        ("sklearn.tree._classes", "DecisionTreeClassifier", "ObjectNode"),
        ("sklearn.tree._tree", "Tree", "TreeNode"),
        ("numpy", "ndarray", "NdArrayNode"),
        ("numpy", "int64", "NdArrayNode"),
        ("numpy", "float64", "NdArrayNode"),
        ("builtins", "dict", "DictNode"),
        ("builtins", "list", "ListNode"),
        ("builtins", "tuple", "TupleNode"),
        ("builtins", "str", "TypeNode"),
        ("builtins", "str", "JsonNode"),
        ("builtins", "int", "JsonNode"),
        ("builtins", "float", "JsonNode"),
        ("builtins", "bool", "JsonNode"),
        ("builtins", "NoneType", "JsonNode"),
    }
)
# Types skops does not trust by default but a forest needs; passed as ``trusted``.
TRUSTED_TYPES: tuple[str, ...] = ("sklearn.tree._tree.Tree",)

_NPY_NAME = re.compile(r"\d+\.npy")
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


def _zero_padding(npy: bytes) -> bytes:
    """Re-save a structured ``.npy`` array with its padding bytes zeroed.

    A tree's node array is a structured dtype of 57 bytes of fields padded to
    64; the padding holds whatever memory the allocator handed out, which
    would make equal trees hash differently.
    """
    arr = np.load(io.BytesIO(npy), allow_pickle=False)
    names = arr.dtype.names
    if not names or sum(arr.dtype.fields[n][0].itemsize for n in names) == arr.dtype.itemsize:
        return npy
    clean = np.zeros(arr.shape, dtype=arr.dtype)
    for name in names:
        clean[name] = arr[name]
    out = io.BytesIO()
    np.save(out, clean, allow_pickle=False)
    return out.getvalue()


def canonical_skops(data: bytes) -> bytes:
    """Rewrite a ``skops.io.dumps`` archive so equal models give equal bytes.

    skops names objects by ``id()`` (in the schema and in the ``<id>.npy``
    member names) and stamps zip members with the wall clock. Ids are renumbered
    1, 2, ... in document order (one-to-one, so shared references stay shared;
    skops ignores an id of 0), padding bytes inside structured arrays are
    zeroed, and every member gets the same timestamp.
    """
    with zipfile.ZipFile(io.BytesIO(data)) as zin:
        schema = json.loads(zin.read("schema.json"))
        mapping: dict[int, int] = {}
        renames: dict[str, str] = {}

        def new_id(old: int) -> int:
            return mapping.setdefault(old, len(mapping) + 1)

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                for key, value in node.items():
                    if key == "__id__" and isinstance(value, int):
                        node[key] = new_id(value)
                    elif key == "file" and isinstance(value, str) and _NPY_NAME.fullmatch(value):
                        renamed = renames.setdefault(value, f"{new_id(int(value[:-4]))}.npy")
                        node[key] = renamed
                    else:
                        walk(value)
            elif isinstance(node, list):
                for item in node:
                    walk(item)

        walk(schema)
        members: dict[str, bytes] = {}
        for name in zin.namelist():
            if name == "schema.json":
                continue
            if name not in renames:
                raise RuntimeError(f"skops archive member {name!r} is not referenced by its schema")
            members[renames[name]] = _zero_padding(zin.read(name))

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zout:
        entries = [("schema.json", json.dumps(schema, indent=2).encode("utf-8"))]
        entries += sorted(members.items())
        for name, payload in entries:
            info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3
            info.external_attr = 0o644 << 16
            zout.writestr(info, payload, compresslevel=6)
    return out.getvalue()


def audit_skops(path: Path) -> None:
    """Refuse ``path`` unless it is a skops archive made only of allowed nodes."""
    try:
        with zipfile.ZipFile(path) as zin:
            schema = json.loads(zin.read("schema.json"))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing") from None
    except (zipfile.BadZipFile, KeyError, OSError, UnicodeDecodeError, ValueError) as exc:
        raise ArtifactError(f"{path}: not a skops archive ({exc})") from exc

    found: set[tuple[str, str, str]] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "__loader__" in node or "__class__" in node:
                found.add(
                    (
                        str(node.get("__module__")),
                        str(node.get("__class__")),
                        str(node.get("__loader__")),
                    )
                )
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(schema)
    refused = sorted(found - ALLOWED_SKOPS_NODES)
    if refused:
        listed = ", ".join(f"{m}.{c} ({loader})" for m, c, loader in refused)
        raise ArtifactError(f"{path}: refused, it holds types outside the trusted list: {listed}")
    top = (
        str(schema.get("__module__")),
        str(schema.get("__class__")),
    )
    if top != ("sklearn.ensemble._forest", "RandomForestClassifier"):
        raise ArtifactError(f"{path}: top-level object is {top[0]}.{top[1]}, not a forest")


def check_forest(forest: RandomForestClassifier, n_features: int, path: Path) -> None:
    """Refuse a forest whose trees could index out of bounds at predict time.

    skops leaves ``sklearn.tree._tree.Tree`` untrusted by default for this
    reason: scikit-learn follows the child and feature indices of the node
    array without bounds checks, so a crafted file could crash the process
    on its first prediction. Trees written by scikit-learn always number a
    child after its parent, which also rules out cycles.
    """
    problems: list[str] = []
    if list(getattr(forest, "classes_", [])) != [0, 1, 2] or forest.n_outputs_ != 1:
        problems.append(f"classes {list(getattr(forest, 'classes_', []))}, expected [0, 1, 2]")
    if getattr(forest, "n_features_in_", None) != n_features:
        problems.append(
            f"{getattr(forest, 'n_features_in_', '?')} features, meta says {n_features}"
        )
    estimators = getattr(forest, "estimators_", None)
    if not isinstance(estimators, list) or not estimators:
        problems.append("no fitted trees")
        estimators = []
    for i, est in enumerate(estimators):
        tree = getattr(est, "tree_", None)
        if not isinstance(est, DecisionTreeClassifier) or tree is None:
            problems.append(f"tree {i} is not a fitted DecisionTreeClassifier")
            break
        n = int(tree.node_count)
        left = np.asarray(tree.children_left)
        right = np.asarray(tree.children_right)
        feature = np.asarray(tree.feature)
        index = np.arange(n)
        leaf = left == -1
        internal = ~leaf
        ok = (
            n >= 1
            and left.shape == right.shape == feature.shape == (n,)
            and np.array_equal(leaf, right == -1)
            and bool(np.all((left[internal] > index[internal]) & (left[internal] < n)))
            and bool(np.all((right[internal] > index[internal]) & (right[internal] < n)))
            and bool(np.all((feature[internal] >= 0) & (feature[internal] < n_features)))
            and np.asarray(tree.value).shape == (n, 1, 3)
            and int(tree.n_features) == n_features
        )
        if not ok:
            problems.append(f"tree {i} has an inconsistent node array")
            break
    if problems:
        raise ArtifactError(f"{path}: refused, " + "; ".join(problems))


class RandomForestModel(ModelKind):
    kind: ClassVar[str] = "rf"
    major_libraries: ClassVar[tuple[str, ...]] = ("scikit-learn",)

    def __init__(
        self,
        *,
        n_estimators: int = 60,
        max_depth: int | None = 8,
        min_samples_leaf: int = 5,
        max_features: str | float | int = "sqrt",
        class_weight: str | None = "balanced_subsample",
        n_jobs: int = 1,
        random_state: int = 0,
    ) -> None:
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.min_samples_leaf = min_samples_leaf
        self.max_features = max_features
        self.class_weight = class_weight
        self.n_jobs = n_jobs
        self.random_state = random_state

    @classmethod
    def library_versions(cls) -> dict[str, str]:
        return {
            "scikit-learn": sklearn.__version__,
            "skops": skops.__version__,
            "skl2onnx": skl2onnx.__version__,
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
        forest = RandomForestClassifier(
            n_estimators=self.n_estimators,
            max_depth=self.max_depth,
            min_samples_leaf=self.min_samples_leaf,
            max_features=self.max_features,
            class_weight=self.class_weight,
            n_jobs=self.n_jobs,
            random_state=self.random_state,
        )
        forest.fit(X, y)
        # Trees do not depend on n_jobs; a forest kept with n_jobs > 1 predicts
        # single rows 3-4x slower (thread pool start-up), so the kept one uses 1.
        forest.set_params(n_jobs=1)
        self.estimator_ = forest
        return {"n_estimators": len(forest.estimators_)}

    def _predict_proba(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.estimator_.predict_proba(X))

    def _scaler(self) -> tuple[np.ndarray, np.ndarray, bool]:
        n = self.n_features_in_
        return np.zeros(n, np.float32), np.ones(n, np.float32), True

    def _save_native(self, directory: Path) -> list[str]:
        (directory / NATIVE_FILE).write_bytes(canonical_skops(sio.dumps(self.estimator_)))
        return [NATIVE_FILE]

    def _onnx_bytes(self) -> bytes:
        model = to_onnx(
            self.estimator_,
            initial_types=[(ONNX_INPUT, FloatTensorType([None, self.n_features_in_]))],
            options={id(self.estimator_): {"zipmap": False}},
            target_opset=_ONNX_OPSETS,
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
        audit_skops(path)
        try:
            forest = sio.load(path, trusted=list(TRUSTED_TYPES))
        except Exception as exc:  # any failure of a foreign file is a refusal
            raise ArtifactError(f"{path}: skops refused or failed to load it ({exc})") from exc
        if not isinstance(forest, RandomForestClassifier):
            raise ArtifactError(f"{path}: loaded a {type(forest).__name__}, not a forest")
        check_forest(forest, n_features, path)
        self.estimator_ = forest
