"""ONNX export: parity at two batch sizes from one file, atomic writes, safe loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from structadmm.errors import ParityError, StructADMMError, StructADMMWarning
from structadmm.exporters import ExportResult, export_onnx, load_onnx, verify_onnx
from structadmm.exporters import onnx_export


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.stem(x))
        y = self.body(y) + y
        return self.head(y.mean(dim=(2, 3)))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 3)
        self.b = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x) + self.b(y), self.b(y)


class Doubling(torch.autograd.Function):
    """Computes 2x in torch but exports as Identity: an exporter bug on demand."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def symbolic(g: object, x: object) -> object:
        return g.op("Identity", x)


class MisExported(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Doubling.apply(x)


class BakedBatch(nn.Module):
    """Turns the batch size into a Python int, so tracing freezes it into the graph."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(int(x.shape[0]), -1) * 2


def conv_bn_linear() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 5),
    )


MODELS = {
    "conv2d_bn_linear": (conv_bn_linear, (3, 6, 6)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(2, 4, 5, stride=2), nn.ReLU(),
                                     nn.Conv1d(4, 4, 3, groups=4)), (2, 20)),
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.ReLU()), (2, 4, 5, 6)),
    "residual": (Residual, (3, 6, 6)),
}


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics, so folding BN into the conv is really exercised."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-1, 1)
    return model


def _ort_run(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


@pytest.mark.parametrize("name", list(MODELS))
def test_one_file_serves_batch_1_and_5(tmp_path: Path, name: str) -> None:
    torch.manual_seed(0)
    factory, sample_shape = MODELS[name]
    model = _randomise_bn(factory()).eval()
    path = tmp_path / f"{name}.onnx"

    result = export_onnx(model, torch.randn(1, *sample_shape), path)

    assert result == ExportResult(path, result.max_abs_diff, True, result.opset)
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    onnx.checker.check_model(onnx.load(path), full_check=True)
    for batch in (1, 5):
        x = torch.randn(batch, *sample_shape)
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(_ort_run(path, x), expected, rtol=1e-3, atol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left


def test_batch_axis_is_symbolic_in_inputs_and_outputs(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    export_onnx(TwoInputs(), (torch.randn(2, 6), torch.randn(2, 4)), path)
    graph = onnx.load(path).graph
    assert [v.name for v in graph.input] == ["input", "input_1"]
    assert [v.name for v in graph.output] == ["output", "output_1"]
    for value in [*graph.input, *graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param


def test_training_mode_is_restored(tmp_path: Path) -> None:
    model = conv_bn_linear().train()
    export_onnx(model, torch.randn(2, 3, 6, 6), tmp_path / "m.onnx")
    assert model.training


def test_without_simplify_and_verify(tmp_path: Path) -> None:
    result = export_onnx(conv_bn_linear(), torch.randn(1, 3, 6, 6), tmp_path / "m.onnx",
                         simplify=False, verify=False)
    assert (result.simplified, result.max_abs_diff) == (False, None)
    load_onnx(result.path)


def test_onnxsim_failure_keeps_the_unsimplified_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxsim

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("simulated onnxsim crash")

    monkeypatch.setattr(onnxsim, "simplify", broken)
    result = export_onnx(conv_bn_linear(), torch.randn(1, 3, 6, 6), tmp_path / "m.onnx")
    assert not result.simplified
    assert "simulated onnxsim crash" in (result.simplify_error or "")
    assert result.max_abs_diff is not None


def test_dynamo_fallback_when_torchscript_exporter_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def unavailable(*args: object, **kwargs: object) -> None:
        raise RuntimeError("TorchScript exporter removed")

    monkeypatch.setattr(onnx_export, "_export_torchscript", unavailable)
    torch.manual_seed(0)
    model = conv_bn_linear()
    result = export_onnx(model, torch.randn(2, 3, 6, 6), tmp_path / "m.onnx")
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    captured = capsys.readouterr()
    assert captured.out == "" and "torchvision" not in captured.err


def test_verify_with_another_model_raises_parity_error(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    path = export_onnx(conv_bn_linear(), x, tmp_path / "m.onnx").path
    with pytest.raises(ParityError, match=r"max abs diff .* m\.onnx|m\.onnx.*max abs diff"):
        verify_onnx(conv_bn_linear(), path, x)


def test_failed_parity_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.onnx"
    with pytest.raises(ParityError) as info:
        export_onnx(MisExported(), torch.randn(2, 4), path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and ".tmp" not in message
    assert "max abs diff" in message and "atol=0.0001" in message
    assert list(tmp_path.iterdir()) == []


def test_failed_parity_keeps_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    export_onnx(conv_bn_linear(), torch.randn(1, 3, 6, 6), path)
    before = path.read_bytes()
    with pytest.raises(ParityError):
        export_onnx(MisExported(), torch.randn(2, 4), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_batch_baked_in_by_tracing_is_caught_at_the_second_batch_size(tmp_path: Path) -> None:
    with pytest.raises(ParityError, match="shape"):
        export_onnx(BakedBatch(), torch.randn(1, 2, 3), tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_bad_example_inputs(tmp_path: Path) -> None:
    with pytest.raises(StructADMMError, match="tensor"):
        export_onnx(conv_bn_linear(), [1, 2], tmp_path / "m.onnx")


def test_load_onnx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(StructADMMError, match="no such ONNX file"):
        load_onnx(tmp_path / "nope.onnx")


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[: len(data) // 2], id="truncated"),
        pytest.param(lambda data: b"this is not a protobuf \x00\xff" * 20, id="garbage"),
        pytest.param(lambda data: b"", id="empty"),
    ],
)
def test_load_onnx_damaged_file(tmp_path: Path, damage: object) -> None:
    good = export_onnx(conv_bn_linear(), torch.randn(1, 3, 6, 6), tmp_path / "good.onnx").path
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(damage(good.read_bytes()))  # type: ignore[operator]
    with pytest.raises(StructADMMError) as info:
        load_onnx(bad)
    message = str(info.value)
    assert "bad.onnx" in message and "\n" not in message


def test_load_onnx_rejects_a_model_failing_the_checker(tmp_path: Path) -> None:
    node = onnx.helper.make_node("Relu", ["x"], ["y"])
    graph = onnx.helper.make_graph(
        [node], "g", [], [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]
    )  # "x" is neither an input nor an initializer
    path = tmp_path / "dangling.onnx"
    onnx.save(onnx.helper.make_model(graph), path)
    with pytest.raises(StructADMMError, match="dangling.onnx: invalid ONNX model"):
        load_onnx(path)


def test_a_failed_torchscript_export_prints_nothing_and_says_which_exporter_wrote_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    """The TorchScript exporter prints its IR from native code when it fails; none of it reaches
    the terminal, and one warning line names the exporter that wrote the file."""
    import os

    from structadmm.exporters import onnx_export

    def failing(*args, **kwargs) -> None:
        os.write(1, b"graph(%x.1 : Float(2, 3)):\n  IR DUMP FROM NATIVE CODE\n")
        os.write(2, b"more native noise\n")
        raise RuntimeError("Unsupported: the legacy exporter cannot export this")

    monkeypatch.setattr(onnx_export, "_export_torchscript", failing)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2)).eval()
    with pytest.warns(StructADMMWarning, match=r"m\.onnx was written by torch's dynamo exporter .*cannot export this"):
        export_onnx(model, torch.randn(2, 3), tmp_path / "m.onnx")
    printed = capfd.readouterr()
    assert "IR DUMP" not in printed.out + printed.err and "native noise" not in printed.out + printed.err
    assert (tmp_path / "m.onnx").exists()
