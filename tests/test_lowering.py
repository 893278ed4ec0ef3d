"""Shape lowering: a LoweredConv computes its column-pruned conv's function with only the kept
columns' MACs, exports to ONNX with parity, traces with torch.fx, and is only used where it pays."""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx
from torch import nn

from nets import chain2d, randomize_bn
from structadmm.errors import StructADMMError
from structadmm.exporters import count_onnx, export_onnx, verify_onnx
from structadmm.prune.lowering import LoweredConv, lower_conv, lower_convs, lowering_gain, min_gain_for
from structadmm.prune.plan import PruningPlan
from structadmm.prune.sparsity import project_columns
from structadmm.prune.surgery import check_same_function

# (conv, input shape): every spatial rank, stride, padding form, dilation and bias setting.
CASES = {
    "1d": (lambda: nn.Conv1d(5, 4, 5, padding=2), (2, 5, 17)),
    "1d-stride-dilation-valid": (lambda: nn.Conv1d(6, 3, 3, stride=2, dilation=2, padding="valid"),
                                 (2, 6, 16)),
    "1d-same-dilated-nobias": (lambda: nn.Conv1d(5, 4, 4, padding="same", dilation=3, bias=False),
                               (2, 5, 19)),
    "2d": (lambda: nn.Conv2d(8, 6, 3, padding=1), (2, 8, 9, 9)),
    "2d-mixed": (lambda: nn.Conv2d(8, 6, (3, 5), stride=(2, 3), padding=(2, 1), dilation=(1, 2), bias=False),
                 (2, 8, 11, 13)),
    "2d-same-even": (lambda: nn.Conv2d(6, 5, 4, padding="same"), (2, 6, 7, 10)),
    "2d-stride2-nopad": (lambda: nn.Conv2d(8, 6, 3, stride=2), (2, 8, 10, 9)),
    "2d-overpadded": (lambda: nn.Conv2d(4, 3, 3, padding=3), (2, 4, 5, 5)),
    "2d-pointwise": (lambda: nn.Conv2d(7, 5, 1), (2, 7, 6, 6)),
    "2d-kernel-beyond-input": (lambda: nn.Conv2d(4, 3, 5, padding=(2, 1)), (2, 4, 1, 3)),
    "3d": (lambda: nn.Conv3d(4, 3, 3, padding=1), (2, 4, 5, 6, 7)),
    "3d-mixed": (lambda: nn.Conv3d(4, 3, (2, 3, 3), stride=(1, 2, 2), padding=(0, 1, 2), dilation=(2, 1, 1)),
                 (2, 4, 6, 7, 8)),
}


def _masked(build, seed: int, keep: float) -> nn.Module:
    """The conv with a random set of its GEMM columns zeroed (about ``keep`` of them kept)."""
    torch.manual_seed(seed)
    conv = build().eval()
    columns = conv.weight.shape[1:]
    with torch.no_grad():
        conv.weight.mul_((torch.rand(columns) < keep).to(conv.weight.dtype))
        if conv.bias is not None:
            conv.bias.normal_()
    return conv


def _kept_columns(conv: nn.Module) -> int:
    return int(conv.weight.ne(0).any(0).sum())


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seed, keep", [(0, 0.3), (1, 0.6), (2, 0.9)])
def test_lowered_conv_equals_masked_conv(case: str, seed: int, keep: float) -> None:
    build, shape = CASES[case]
    conv = _masked(build, seed, keep)
    lowered = LoweredConv(conv)
    x = torch.randn(shape)
    with torch.no_grad():
        expected, got = conv(x), lowered(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert lowered.kept_columns == max(_kept_columns(conv), 1)


def test_special_column_sets() -> None:
    """Taps keeping contiguous ranges or scattered channels, and an input channel that no tap
    reads (channel pruning removes those first, but lowering must stay exact with them)."""
    conv = nn.Conv2d(6, 4, 3, padding=1).eval()
    mask = torch.zeros(6, 3, 3)
    mask[:, 1, 1] = 1
    mask[2:5, 0, 0] = 1
    mask[[0, 3], 2, 1] = 1  # scattered
    mask[5] = 0  # channel 5 is read by no tap
    with torch.no_grad():
        conv.weight.mul_(mask)
    lowered = LoweredConv(conv)
    selects = {tap.offset: tap.select for tap in lowered._taps}
    assert selects == {(0, 0): "range", (1, 1): "range", (2, 1): "index"}
    x = torch.randn(2, 6, 5, 5)
    with torch.no_grad():
        assert torch.allclose(lowered(x), conv(x), atol=1e-5)
    assert lowered.kept_columns == 3 + 5 + 2


def test_all_channels_tap_needs_no_gather() -> None:
    conv = nn.Conv2d(4, 3, 3, padding=1).eval()
    with torch.no_grad():
        conv.weight[:, :, 0, :] = 0
    lowered = LoweredConv(conv)
    assert {tap.select for tap in lowered._taps} == {"all"}
    assert not list(lowered.buffers())
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        assert torch.allclose(lowered(x), conv(x), atol=1e-5)


def test_all_zero_weight_keeps_one_column() -> None:
    conv = nn.Conv2d(4, 3, 3, padding=1).eval()
    with torch.no_grad():
        conv.weight.zero_()
    lowered = LoweredConv(conv)
    assert lowered.kept_columns == 1
    assert lowering_gain(conv) == 4 * 9
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        assert torch.allclose(lowered(x), conv(x))


@pytest.mark.parametrize("case", ["1d", "2d-mixed", "2d-kernel-beyond-input", "3d"])
def test_export_parity_and_macs(case: str, tmp_path) -> None:
    build, shape = CASES[case]
    conv = _masked(build, 0, 0.4)
    lowered = LoweredConv(conv)
    x = torch.randn(shape)
    path = tmp_path / "lowered.onnx"
    result = export_onnx(lowered, x, path)  # raises unless ORT matches torch at batch 2 and 3
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    assert verify_onnx(conv, path, torch.randn(5, *shape[1:])) < 1e-4  # and the original conv
    with torch.no_grad():
        output = conv(x[:1])
    cost = count_onnx(path)
    assert cost.macs == output.numel() * _kept_columns(conv)
    assert [layer.op_type for layer in cost.layers if layer.macs] == ["Conv"]


def test_lowering_gain_is_the_mac_ratio() -> None:
    conv = nn.Conv2d(8, 4, 3, padding=1)
    assert lowering_gain(conv) == 1.0
    with torch.no_grad():
        conv.weight.mul_(project_columns(conv.weight, 0.75).float())
    assert lowering_gain(conv) == pytest.approx(72 / 18)


def test_lower_conv_respects_threshold() -> None:
    conv = nn.Conv2d(8, 8, 3, padding=1)
    assert lower_conv(conv, min_gain=1.0) is conv  # no zero column: nothing to remove
    with torch.no_grad():
        conv.weight.mul_(project_columns(conv.weight, 0.25).float())  # gain 72/54 = 1.33
    assert lower_conv(conv, min_gain=2.0) is conv
    assert lower_conv(conv) is conv  # the default threshold is above 1.33 too
    assert isinstance(lower_conv(conv, min_gain=1.3), LoweredConv)


def test_the_default_threshold_rises_as_the_filter_count_falls() -> None:
    """min_gain_for(F) = max(2.5, 32 / sqrt(F)): where the isolated sweeps found lowering to pay off."""
    assert [min_gain_for(f) for f in (16, 64, 256, 512)] == [8.0, 4.0, 2.5, 2.5]
    assert min_gain_for(32) == pytest.approx(5.657, abs=1e-3) and min_gain_for(128) == pytest.approx(2.828, abs=1e-3)

    def pruned(filters: int, ratio: float) -> nn.Conv2d:
        conv = nn.Conv2d(16, filters, 3, padding=1)
        with torch.no_grad():
            conv.weight.mul_(project_columns(conv.weight, ratio).float())
        return conv

    # 50 % pruned (gain 2): kept whatever the filter count; 60 % (gain 2.5): lowered with 256 filters,
    # kept with 64 and 128 ...
    assert not any(isinstance(lower_conv(pruned(f, 0.5)), LoweredConv) for f in (64, 256, 512))
    assert isinstance(lower_conv(pruned(256, 0.6)), LoweredConv)
    assert not isinstance(lower_conv(pruned(128, 0.6)), LoweredConv)
    assert not isinstance(lower_conv(pruned(64, 0.6)), LoweredConv)
    # ... 70 % (gain 3.3): 128 filters too; 75 % (gain 4): 64 filters too, 16 not; 87.5 % (gain 8): 16 as well
    assert isinstance(lower_conv(pruned(128, 0.7)), LoweredConv)
    assert not isinstance(lower_conv(pruned(64, 0.7)), LoweredConv)
    assert isinstance(lower_conv(pruned(64, 0.75)), LoweredConv)
    assert not isinstance(lower_conv(pruned(16, 0.75)), LoweredConv)
    assert isinstance(lower_conv(pruned(16, 0.875)), LoweredConv)
    # a ratio's rounding does not stop it: 60 % of 256 * 9 columns pruned keeps 922 of 2304, a gain of 2.499
    wide = nn.Conv2d(256, 256, 3, padding=1)
    with torch.no_grad():
        wide.weight.mul_(project_columns(wide.weight, 0.6).float())
    assert lowering_gain(wide) < 2.5 and isinstance(lower_conv(wide), LoweredConv)
    # a number passed in replaces the rule for every conv
    assert isinstance(lower_conv(pruned(16, 0.75), min_gain=2.0), LoweredConv)
    assert not isinstance(lower_conv(pruned(256, 0.6), min_gain=3.0), LoweredConv)


@pytest.mark.parametrize(
    "conv",
    [nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
     nn.ConvTranspose2d(4, 4, 3), nn.Linear(4, 4)],
    ids=["grouped", "reflect", "transposed", "linear"],
)
def test_unsupported_modules_are_left_alone(conv: nn.Module) -> None:
    with torch.no_grad():
        conv.weight.zero_()
    assert lower_conv(conv, min_gain=1.0) is conv


def test_lowered_conv_rejects_grouped_conv() -> None:
    with pytest.raises(StructADMMError, match="groups"):
        LoweredConv(nn.Conv2d(4, 4, 3, groups=2))


def _shape_pruned_chain(ratio: float) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = randomize_bn(chain2d()).eval()
    x = torch.randn(2, 3, 8, 8)
    PruningPlan.uniform(model, x, "shape", ratio).project(model)
    return model, x


def test_lower_convs_keeps_the_function_and_traces(tmp_path) -> None:
    model, x = _shape_pruned_chain(0.7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lowered, names = lower_convs(model, min_gain=1.0)
    assert names == ["0", "4", "7"]
    assert all(isinstance(lowered.get_submodule(n), LoweredConv) for n in names)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # original untouched
    check_same_function(model, lowered, x, atol=1e-4, rtol=1e-4, what="shape lowering")
    traced = torch.fx.symbolic_trace(lowered)
    check_same_function(model, traced, x, atol=1e-4, rtol=1e-4, what="fx trace of the lowered model")
    export_onnx(lowered, x, tmp_path / "lowered.onnx")


def test_lower_convs_threshold_and_shared_modules() -> None:
    model, x = _shape_pruned_chain(0.7)
    assert lower_convs(model, min_gain=1e9)[1] == []
    shared = nn.Sequential(model[0], nn.ReLU(), nn.Conv2d(8, 8, 1))
    shared.again = shared[0]
    lowered, names = lower_convs(shared, min_gain=1.0)
    assert names == ["0", "again"]
    assert lowered[0] is lowered.again and isinstance(lowered[0], LoweredConv)
    assert isinstance(lowered[2], nn.Conv2d)  # no zero column


def test_lower_convs_on_a_bare_conv() -> None:
    conv = _masked(CASES["2d"][0], 0, 0.3)
    lowered, names = lower_convs(conv, min_gain=1.0)
    assert names == [""] and isinstance(lowered, LoweredConv)
    assert math.isclose(lowering_gain(conv), 72 / lowered.kept_columns)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter, on purpose
def test_torchscript_export_keeps_spatial_sizes_static(tmp_path) -> None:
    """A size-dependent op after a lowered conv (VGG-16's adaptive pool) needs the padded
    tensors' sizes during export; the fast TorchScript exporter must not lose them."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 64, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(project_columns(conv.weight, 0.75).float())
    model = nn.Sequential(LoweredConv(conv), nn.AdaptiveAvgPool2d(2)).eval()
    x = torch.randn(2, 3, 8, 8)
    torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=False, input_names=["input"],
                      dynamic_axes={"input": {0: "batch"}})
    assert verify_onnx(model, tmp_path / "m.onnx", torch.randn(3, 3, 8, 8)) < 1e-4


def test_compact_lowers_column_pruned_convs_and_removes_empty_channels() -> None:
    """compact() = channel surgery, then shape lowering, checked end to end."""
    from structadmm.prune.lowering import LoweredConv
    from structadmm.prune.plan import PruningPlan
    from structadmm.prune.surgery import compact

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 4, 1)).eval()
    x = torch.randn(2, 8, 10, 10)
    PruningPlan.from_dict(model, x, {"2": {"sparsity": "shape", "ratio": 0.875}}).project(model)
    with torch.no_grad():
        model[2].weight[:, 5] = 0  # every column of input channel 5: removable as a channel
    small = compact(model, x)
    assert isinstance(small[2], LoweredConv)
    read = model[2].weight.ne(0).flatten(2).any(2).any(0)  # input channels with any kept column
    assert not read[5] and small[0].out_channels == int(read.sum()) < 32  # those left the producer too
    assert not isinstance(compact(model, x, lower=False)[2], LoweredConv)
