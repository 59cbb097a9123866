"""``lstm``: a recurrent network over the last ``seq_len`` feature rows.

``architecture="lstm"`` (default): two stacked LSTMs (``hidden_size_1`` ->
``hidden_size_2``, 128 -> 64) whose last hidden state feeds a linear layer to
3 logits. ``architecture="bilstm_attention"``: the same two layers
bidirectional, then additive attention over time (a learned score per step,
softmax over the window) and the linear head on the attended context.

Input: consecutive rows; ``predict_proba`` row ``i`` uses the window of rows
``i - seq_len + 1 .. i`` and rows without a full window are NaN. Training,
budget, determinism, validation and artifacts: see ``ml.kinds._torch``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ml.kinds._torch import TorchKind

ARCHITECTURES = ("lstm", "bilstm_attention")


class _StackedLSTM(nn.Module):
    def __init__(self, n_features: int, hidden_1: int, hidden_2: int, dropout: float) -> None:
        super().__init__()
        self.lstm1 = nn.LSTM(n_features, hidden_1, batch_first=True)
        self.lstm2 = nn.LSTM(hidden_1, hidden_2, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm1(x)
        h, _ = self.lstm2(self.drop(h))
        return self.head(self.drop(h[:, -1]))


class _BiLSTMAttention(nn.Module):
    def __init__(self, n_features: int, hidden_1: int, hidden_2: int, dropout: float) -> None:
        super().__init__()
        self.lstm1 = nn.LSTM(n_features, hidden_1, batch_first=True, bidirectional=True)
        self.lstm2 = nn.LSTM(2 * hidden_1, hidden_2, batch_first=True, bidirectional=True)
        self.drop = nn.Dropout(dropout)
        self.score = nn.Linear(2 * hidden_2, 1)
        self.head = nn.Linear(2 * hidden_2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm1(x)
        h, _ = self.lstm2(self.drop(h))  # (B, L, 2 * hidden_2)
        weights = torch.softmax(self.score(h), dim=1)  # (B, L, 1), sums to 1 over time
        context = (weights * h).sum(dim=1)
        return self.head(self.drop(context))


class LSTMModel(TorchKind):
    kind: ClassVar[str] = "lstm"

    def __init__(
        self,
        *,
        seq_len: int = 60,
        architecture: str = "lstm",
        hidden_size_1: int = 128,
        hidden_size_2: int = 64,
        dropout: float = 0.1,
        max_steps: int = 200,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        class_weight: str | None = "balanced",
        eval_every: int = 50,
        max_train_seconds: float | None = 900.0,
        seed: int = 0,
    ) -> None:
        self.seq_len = seq_len
        self.architecture = architecture
        self.hidden_size_1 = hidden_size_1
        self.hidden_size_2 = hidden_size_2
        self.dropout = dropout
        self.max_steps = max_steps
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.class_weight = class_weight
        self.eval_every = eval_every
        self.max_train_seconds = max_train_seconds
        self.seed = seed

    @property
    def sequence_length(self) -> int:
        return int(self.seq_len)

    def _check_params(self) -> None:
        super()._check_params()
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}"
            )
        if self.seq_len < 1 or self.hidden_size_1 < 1 or self.hidden_size_2 < 1:
            raise ValueError("seq_len and hidden sizes must be >= 1")

    def _build_net(self, n_features: int) -> nn.Module:
        cls = _StackedLSTM if self.architecture == "lstm" else _BiLSTMAttention
        return cls(n_features, self.hidden_size_1, self.hidden_size_2, self.dropout)
