"""A CRNN text recogniser (conv features, then a bidirectional LSTM): the convs before the LSTM
prune, the LSTM keeps its hidden size (its input width stays whole, with the reason), and the
compacted model exports with a dynamic batch axis although the example batch holds one sample."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import structadmm as sa


class CRNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cnn = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d((2, 1)),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.rnn = nn.LSTM(32 * 4, 24, bidirectional=True, batch_first=True)
        self.fc = nn.Linear(48, 11)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.cnn(x)
        b, c, h, w = features.shape
        return self.fc(self.rnn(features.permute(0, 3, 1, 2).reshape(b, w, c * h))[0])


def test_a_crnn_prunes_around_its_lstm_and_exports_with_a_dynamic_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = CRNN().eval(), torch.randn(1, 1, 16, 32)
    plan = sa.PruningPlan.uniform(model, x, "filter", 0.5)
    assert [u.name for u in plan.units] == ["cnn.0", "cnn.4"]
    assert ("cnn.8 (filter)", "'lstm' in 'rnn'") in plan.skipped  # the LSTM reads it: kept whole, with why
    plan.project(model)
    small = sa.compact(model, x)
    assert small.rnn.hidden_size == 24 and small.cnn[0].out_channels == 8
    sa.export_onnx(small, x, tmp_path / "crnn.onnx")  # checked at batch 1 and at another batch size
    sa.verify_onnx(model, tmp_path / "crnn.onnx", torch.randn(5, 1, 16, 32))
