"""``mlp``: the "orderflow" dense network on one standardised feature row.

Three hidden layers (``hidden_1`` -> ``hidden_2`` -> ``hidden_3``, 64-32-16),
ReLU and dropout, then 3 logits. It reads the whole feature row; the name says
what it is for: the tick-volume, spread and range-pressure features that a
tree splits coarsely and a small dense net combines smoothly. Training,
budget, determinism, validation and artifacts: see ``ml.kinds._torch``.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from ml.kinds._torch import TorchKind


class MLPModel(TorchKind):
    kind: ClassVar[str] = "mlp"

    def __init__(
        self,
        *,
        hidden_1: int = 64,
        hidden_2: int = 32,
        hidden_3: int = 16,
        dropout: float = 0.1,
        max_steps: int = 2000,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        class_weight: str | None = "balanced",
        eval_every: int = 100,
        max_train_seconds: float | None = 300.0,
        seed: int = 0,
    ) -> None:
        self.hidden_1 = hidden_1
        self.hidden_2 = hidden_2
        self.hidden_3 = hidden_3
        self.dropout = dropout
        self.max_steps = max_steps
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.class_weight = class_weight
        self.eval_every = eval_every
        self.max_train_seconds = max_train_seconds
        self.seed = seed

    def _check_params(self) -> None:
        super()._check_params()
        if min(self.hidden_1, self.hidden_2, self.hidden_3) < 1:
            raise ValueError("hidden layer sizes must be >= 1")

    def _build_net(self, n_features: int) -> nn.Module:
        return nn.Sequential(
            nn.Linear(n_features, self.hidden_1),
            nn.ReLU(),
            nn.Dropout(self.dropout),
            nn.Linear(self.hidden_1, self.hidden_2),
            nn.ReLU(),
            nn.Dropout(self.dropout),
            nn.Linear(self.hidden_2, self.hidden_3),
            nn.ReLU(),
            nn.Linear(self.hidden_3, 3),
        )
