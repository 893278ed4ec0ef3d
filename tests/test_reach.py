"""A requested ratio the plan does not reach is said, with the figures and the plan's reasons per group."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from structadmm import PruningPlan, StructADMMWarning
from structadmm.cli import app
from structadmm.pipeline import CompressConfig, compress
from structadmm.prune.reach import AT_LEAST_ONE, BLOCKS, WHOLE_CHANNELS, check_reach, multiple_reason

from nets import two_convs

X = torch.randn(2, 3, 8, 8)
# two_convs on 3x8x8: conv0 3*32*9*64, conv1 32*64*9*64, classifier 64*10 MACs
DENSE = 3 * 32 * 9 * 64 + 32 * 64 * 9 * 64 + 64 * 10


def _reach(model: nn.Module, ratio: float, multiple: int = 1, keep_ends: bool = False, x: torch.Tensor = X):
    model.eval()
    return check_reach(model, x, PruningPlan.uniform(model, x, "filter", ratio, multiple=multiple,
                                                     keep_ends=keep_ends), ratio)


def test_channel_multiple_makes_0875_keep_what_075_keeps_and_says_so() -> None:
    model = two_convs()
    at_75, at_875 = _reach(model, 0.75, 16), _reach(model, 0.875, 16)
    assert [g.kept for g in at_75.groups] == [g.kept for g in at_875.groups] == [16, 16]  # the same model
    assert not at_875.reached
    short = at_875.to_dict()
    assert short["channels"] == {"total": 96, "requested_kept": 12.0, "kept": 32, "requested_removed": 0.875,
                                 "removed": pytest.approx(2 / 3)}
    # asked: conv0 keeps 4/32, conv1 8/64 of its outputs and 4/32 of its inputs, the classifier 8/64 inputs
    requested = 3 * 4 * 9 * 64 + 4 * 8 * 9 * 64 + 8 * 10
    reached = 3 * 16 * 9 * 64 + 16 * 16 * 9 * 64 + 16 * 10
    assert (short["macs"]["dense"], short["macs"]["requested"], short["macs"]["reached"]) == (DENSE, requested, reached)
    assert short["macs"]["reduction"] == pytest.approx(DENSE / reached)  # 7.05x, where 48.6x was asked
    rows = [(g["group"], g["channels"], g["requested_kept"], g["kept"], g["ratio"], g["reasons"])
            for g in short["groups"]]
    assert rows == [("0", 32, 4.0, 16, 0.5, [multiple_reason(16)]), ("3", 64, 8.0, 16, 0.75, [multiple_reason(16)])]
    assert short["message"] == ("ratio 0.875 not reached: 0.667 of the channels removed (0.875 asked), 7.05x fewer "
                                "MACs (48.60x asked); rounded up to a multiple of channel_multiple = 16: 0, 3")
    # at 0.75 only the 32-channel conv is short (8 asked, 16 kept); the 64-channel one keeps the 16 asked
    assert [(g.group, g.reached, g.reasons) for g in at_75.groups] == [("0", False, [multiple_reason(16)]),
                                                                       ("3", True, [])]


def test_a_ratio_reached_reports_nothing() -> None:
    reach = _reach(two_convs(), 0.875)
    assert reach.reached and all(g.reached and not g.reasons for g in reach.groups)
    assert reach.macs == reach.requested_macs == 3 * 4 * 9 * 64 + 4 * 8 * 9 * 64 + 8 * 10
    assert reach.short_groups() == []


class _FixedView(nn.Module):
    """conv b's channels meet a count written in forward(): the graph freezes them."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(torch.relu(self.a(x))).mean((2, 3)).view(-1, 16))


def _grouped() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))


def test_every_reason_is_the_plans_own() -> None:
    # a frozen group: left whole, with the graph's reason
    frozen = _reach(_FixedView(), 0.5)
    assert [(g.group, g.kept, g.reached) for g in frozen.groups] == [("a", 4, True), ("b", 16, False)]
    assert frozen.groups[1].reasons == ["frozen: 'view' at node 'view' gives these channels a fixed count "
                                        "(hard-coded in forward())"]
    # equal-count blocks of a grouped conv (3 of 8 asked: 2 per block of 4), whole channels, at least one
    blocks = {g.group: (g.requested_kept, g.kept, g.reasons) for g in _reach(_grouped(), 0.625).groups}
    assert blocks == {"0": (3.0, 4, [BLOCKS]), "2": (3.0, 4, [BLOCKS]), "6": (1.5, 2, [WHOLE_CHANNELS])}
    tiny = {g.group: (g.kept, g.reasons) for g in _reach(_grouped(), 0.9).groups}
    assert tiny["6"] == (1, [AT_LEAST_ONE]) and tiny["0"] == (2, [BLOCKS])
    # the first layer kept whole by keep_ends is the plan's default, asked to stay whole: no shortfall
    # (the classifier's outputs are the model's: never counted)
    ends = _reach(two_convs(), 0.875, keep_ends=True)
    assert [(g.group, g.requested_kept, g.kept, g.reasons) for g in ends.groups] == [("3", 8.0, 8, []),
                                                                                   ("0", 32.0, 32, [])]
    assert ends.reached and ends.requested_macs == ends.macs


FAST = dict(dense_epochs=1, admm_rounds=2, admm_epochs=1, retrain_epochs=1, batch_size=32, rho=0.5, rho_growth=2.0,
            bench_batches=[4], bench_min_runs=2, bench_min_seconds=0.0, bench_isolate=False, prune_ends=True)


def _data(n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 3


def _run(tmp_path: Path, **settings) -> tuple[dict, list[warnings.WarningMessage], str]:
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = compress(two_convs(1, 3), _data(), _data(48), CompressConfig(**{**FAST, **settings}),
                          out_dir=tmp_path / "run")
    said = [w for w in caught if issubclass(w.category, StructADMMWarning)]
    return result.report, said, (result.run_dir / "report.md").read_text()


def test_the_run_reports_a_ratio_it_does_not_reach(tmp_path: Path) -> None:
    report, said, markdown = _run(tmp_path, ratio=0.875, channel_multiple=16)
    short = report["ratio_shortfall"]
    # conv0 4 of 32 asked (1 input channel), conv1 8 of 64, the classifier 8 of 64 inputs (3 outputs)
    requested, reached = 1 * 4 * 9 * 64 + 4 * 8 * 9 * 64 + 8 * 3, 1 * 16 * 9 * 64 + 16 * 16 * 9 * 64 + 16 * 3
    assert (short["macs"]["requested"], short["macs"]["reached"]) == (requested, reached)
    assert short["macs"]["reached"] == report["pruned"]["macs"]  # the plan's count is the exported model's
    assert [(g["group"], g["kept"]) for g in short["groups"]] == [("0", 16), ("3", 16)]
    assert [str(w.message) for w in said] == [short["message"]]  # one warning, the report's line
    assert "## Requested ratio not reached" in markdown and short["message"] in markdown
    assert "| 0 | 32 | 0.875 | 4.00 | 16 | 0.500 | rounded up to a multiple of channel_multiple = 16 |" in markdown


def test_a_run_that_reaches_its_ratio_says_nothing(tmp_path: Path) -> None:
    report, said, markdown = _run(tmp_path, ratio=0.875, channel_multiple=1)
    assert report["ratio_shortfall"] is None and said == [] and "not reached" not in markdown
    assert [(g["group"], g["kept"]) for g in report["groups"]] == [("0", 4), ("3", 8)]


MODEL = """\
from torch import nn


def build() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 3),
    )
"""


def test_the_cli_prints_one_warning_line(tmp_path: Path) -> None:
    import numpy as np

    (tmp_path / "tiny.py").write_text(MODEL)
    x, y = _data()
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy(), x_val=x[:48].numpy(), y_val=y[:48].numpy())
    (tmp_path / "cfg.toml").write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in FAST.items()) + "\n")
    result = CliRunner().invoke(app, ["run", "--model", f"{tmp_path / 'tiny.py'}:build", "--data",
                                      str(tmp_path / "d.npz"), "--config", str(tmp_path / "cfg.toml"),
                                      "--ratio", "0.875", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "not reached" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: ratio 0.875 not reached: 0.667 of the channels removed")
