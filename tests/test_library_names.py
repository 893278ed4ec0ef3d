"""Models by the names users already type: timm:NAME, torchvision:NAME, hf:FOLDER_OR_TYPE and
ultralytics:CONFIG.yaml, with the input shape taken from the library's own metadata."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli_checks import ended_cleanly
from structadmm.cli import app
from structadmm.errors import StructADMMError
from structadmm.models.loading import load_model

runner = CliRunner()


def test_timm_and_torchvision_names_know_their_input_shape() -> None:
    pytest.importorskip("timm")
    loaded = load_model("timm:resnet18")
    assert loaded.input_shape == (3, 224, 224) and loaded.num_classes == 1000
    assert load_model("timm.models:resnet18").input_shape == (3, 224, 224)  # module:function reads it too
    vision = load_model("torchvision:mobilenet_v3_small")
    assert vision.input_shape == (3, 224, 224) and vision.num_classes == 1000
    assert vision.module(vision.example_input(1)).shape == (1, 1000)


def test_a_transformers_type_builds_its_default_config_and_takes_token_ids() -> None:
    pytest.importorskip("transformers")
    loaded = load_model("hf:gpt2")
    assert type(loaded.module).__name__ == "GPT2LMHeadModel" and loaded.vocab_size == 50257
    tokens = loaded.example_input(2)
    assert tokens.dtype == torch.int64 and tokens.shape == (2, 32) and int(tokens.max()) < 50257


def test_a_local_transformers_folder_loads_its_safetensors_weights(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64)
    saved = transformers.BertModel(config).eval()
    saved.save_pretrained(tmp_path / "bert", safe_serialization=True)
    loaded = load_model(f"hf:{tmp_path / 'bert'}")
    x = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x).last_hidden_state, saved(x).last_hidden_state)


def test_a_yolo_config_builds_at_its_input_size() -> None:
    pytest.importorskip("ultralytics")
    loaded = load_model("ultralytics:yolov8n.yaml")
    assert loaded.input_shape == (3, 640, 640) and loaded.name == "yolov8n"


@pytest.mark.parametrize("ref, message", [
    ("timm:no_such_net", "timm has no model 'no_such_net'"),
    ("torchvision:no_such_net", "torchvision has no model 'no_such_net'"),
    ("hf:no_such_type", "neither a local model folder nor a transformers model type"),
    ("ultralytics:yolov8n.pt", "give a model config such as yolov8n.yaml"),
    ("timm:", "names no model"),
    ("timm:../../etc/passwd", "is not a model name"),
])
def test_unknown_names_are_one_line_refusals(ref: str, message: str) -> None:
    pytest.importorskip("timm")
    pytest.importorskip("transformers")
    pytest.importorskip("ultralytics")
    with pytest.raises(StructADMMError, match=message):
        load_model(ref)
    result = runner.invoke(app, ["inspect", "--model", ref])
    assert result.exit_code == 2 and message.split("'")[0] in result.output
    ended_cleanly(result)


def test_inspect_takes_a_timm_name_without_an_input_shape() -> None:
    pytest.importorskip("timm")
    result = runner.invoke(app, ["inspect", "--model", "timm:resnet18"])
    assert result.exit_code == 0, result.output
    ended_cleanly(result)
    assert "layer1.0.conv1" in result.output
