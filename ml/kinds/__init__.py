"""Registry of model kinds: name -> "module:Class", resolved only when asked for.

Importing this package imports no heavy library (torch, xgboost, scikit-learn
load with the kind's module, in training workers). Adding a kind means one
module following ``ml.kinds.base.ModelKind`` and one line here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ml.kinds.base import ModelKind

KINDS: dict[str, str] = {
    "rf": "ml.kinds.rf:RandomForestModel",
    "xgb": "ml.kinds.xgb:XGBoostModel",
    "lstm": "ml.kinds.lstm:LSTMModel",
    "mlp": "ml.kinds.mlp:MLPModel",
}


class UnknownKindError(KeyError):
    """A kind name that is not in :data:`KINDS`."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def get_kind(name: str) -> type[ModelKind]:
    """The class of kind ``name`` (imports its module, and so its library)."""
    from ml.kinds.base import ModelKind

    try:
        target = KINDS[name]
    except KeyError:
        raise UnknownKindError(
            f"unknown model kind {name!r}; known kinds: {', '.join(sorted(KINDS))}"
        ) from None
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, ModelKind)) or cls.kind != name:
        raise TypeError(f"registry entry {name!r} -> {target} is not a ModelKind of that kind")
    return cls
