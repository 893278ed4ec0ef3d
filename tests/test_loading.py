"""Loading a user's model and data: every kind of reference, and every mistake a user can make."""

from __future__ import annotations

import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from structadmm.errors import StructADMMError, StructADMMWarning
from structadmm.models.data import check_compatible, load_data, parse_shape
from structadmm.models.loading import LoadedModel, load_checkpoint, load_model

MODEL_FILE = """
import torch
from torch import nn

def build():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))

def build_with_shape():
    return build(), (1, 8, 8)

def bad_shape():
    return build(), (1, -8, 8)

def not_a_model():
    return 42

def needs_args(width):
    return build()

def broken():
    raise ValueError("no weights here")

NOT_CALLABLE = 3
"""


def tiny() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 3))


def trained_tiny() -> nn.Sequential:
    """A tiny model whose weights and BatchNorm statistics differ from a fresh one's."""
    torch.manual_seed(7)
    model = tiny()
    model.train()
    model(torch.randn(16, 1, 8, 8))  # moves the running statistics off their defaults
    return model.eval()


def fails(match: str):
    return pytest.raises(StructADMMError, match=match)


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_models.py"
    path.write_text(MODEL_FILE)
    return path


@pytest.fixture
def importable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Write a module into the current folder (tmp_path) and forget it after the test."""
    monkeypatch.chdir(tmp_path)
    names: list[str] = []

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(source)
        names.append(name)
        return name

    yield write
    for name in names:
        sys.modules.pop(name, None)


def same_outputs(a: nn.Module, b: nn.Module, shape=(2, 1, 8, 8)) -> bool:
    x = torch.randn(shape)
    return torch.equal(a.eval()(x), b.eval()(x))


# --- models --------------------------------------------------------------------------------------


def test_zoo_name() -> None:
    loaded = load_model("digits-cnn")
    assert isinstance(loaded, LoadedModel)
    assert (loaded.name, loaded.input_shape, loaded.num_classes) == ("digits-cnn", (1, 16, 16), 10)
    assert loaded.example_input(2).shape == (2, 1, 16, 16)


def test_unknown_zoo_name() -> None:
    with fails(r"unknown model 'no-such-net'.*digits-cnn.*module:function"):
        load_model("no-such-net")


def test_weights_file_given_as_model() -> None:
    with fails(r"weights\.pt holds weights, not a model.*--checkpoint"):
        load_model("weights.pt")


def test_python_file_without_function(model_file: Path) -> None:
    with fails(r"name the function .*my_models\.py:build"):
        load_model(str(model_file))


def test_file_function(model_file: Path) -> None:
    loaded = load_model(f"{model_file}:build")
    assert isinstance(loaded.module, nn.Sequential)
    assert (loaded.name, loaded.input_shape, loaded.num_classes) == ("my_models:build", None, None)
    with fails(r"does not say what input it takes.*--input-shape"):
        loaded.example_input()


def test_file_function_with_shape(model_file: Path) -> None:
    loaded = load_model(f"{model_file}:build_with_shape")
    assert loaded.input_shape == (1, 8, 8)
    assert loaded.module(loaded.example_input(2)).shape == (2, 3)


def test_dotted_module_from_current_folder(importable) -> None:
    importable("sa_test_zoo_a", "from my_helper import build\n")
    importable("my_helper", MODEL_FILE)  # imported by the module above: its folder is on sys.path
    assert isinstance(load_model("sa_test_zoo_a:build").module, nn.Sequential)
    assert str(Path.cwd()) not in sys.path  # only while importing and calling


@pytest.mark.parametrize("ref, message", [
    ("no_such_module_xyz:build", r"cannot import module 'no_such_module_xyz'.*file\.py:build"),
    ("{file}:missing", r"has no function 'missing'; it defines: .*build, build_with_shape"),
    ("{file}:NOT_CALLABLE", r"NOT_CALLABLE is an object of type int, not a function"),
    ("{file}:needs_args", r"needs_args needs arguments.*defaults"),
    ("{file}:broken", r"broken\(\) raised ValueError: no weights here"),
    ("{file}:not_a_model", r"not_a_model returned an object of type int, not an nn\.Module"),
    ("{file}:bad_shape", r"returned the input shape \(1, -8, 8\); it must be the positive sizes"),
    ("{dir}/absent.py:build", r"Python file .*absent\.py does not exist"),
    ("{file}:", r"is not module:function"),
])
def test_function_errors(model_file: Path, ref: str, message: str) -> None:
    with fails(message):
        load_model(ref.format(file=model_file, dir=model_file.parent))


def test_module_that_fails_to_import(importable) -> None:
    importable("sa_test_zoo_broken", "import no_such_dependency_xyz\n")
    with fails(r"importing sa_test_zoo_broken failed: ModuleNotFoundError: .*no_such_dependency_xyz"):
        load_model("sa_test_zoo_broken:build")
    (Path.cwd() / "syntax.py").write_text("def build(:\n")
    with fails(r"importing .*syntax\.py failed: SyntaxError"):
        load_model("syntax.py:build")


# --- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", [lambda sd: sd, lambda sd: {"state_dict": sd, "epoch": 3},
                                  lambda sd: {"model": sd, "optimizer": {"lr": 0.1}}])
def test_torch_checkpoint(tmp_path: Path, wrap) -> None:
    source = trained_tiny()
    path = tmp_path / "weights.pth"
    torch.save(wrap(source.state_dict()), path)
    target = tiny()
    assert not same_outputs(source, target)
    load_checkpoint(target, path)
    assert same_outputs(source, target)


def test_safetensors_checkpoint_through_load_model(tmp_path: Path, model_file: Path) -> None:
    source = load_model(f"{model_file}:build").module
    with torch.no_grad():
        for p in source.parameters():
            p.mul_(3.0)
    path = tmp_path / "weights.safetensors"
    save_file(source.state_dict(), path)
    loaded = load_model(f"{model_file}:build", checkpoint=path)
    assert same_outputs(source, loaded.module)


def test_checkpoint_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save(tiny().state_dict(), good)
    with fails(r"checkpoint .*absent\.pt does not exist"):
        load_checkpoint(tiny(), tmp_path / "absent.pt")

    truncated = tmp_path / "half.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with fails(r"cannot read checkpoint .*half\.pt: the file is truncated or not a torch checkpoint"):
        load_checkpoint(tiny(), truncated)

    safetensors = tmp_path / "good.safetensors"
    save_file(tiny().state_dict(), safetensors)
    half = tmp_path / "half.safetensors"
    half.write_bytes(safetensors.read_bytes()[: safetensors.stat().st_size // 2])
    with fails(r"cannot read .*half\.safetensors: the file is truncated or not safetensors"):
        load_checkpoint(tiny(), half)

    no_weights = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "lr": 0.1}, no_weights)
    with fails(r"holds a dict with keys epoch, lr but no weights; expected a state_dict"):
        load_checkpoint(tiny(), no_weights)


def test_checkpoint_with_python_objects_is_refused(tmp_path: Path, importable, monkeypatch) -> None:
    importable("sa_test_custom_box", "class Box:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import sa_test_custom_box

    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": tiny().state_dict(), "extra": sa_test_custom_box.Box()}, path)
    with fails(r"Python objects \(sa_test_custom_box\.Box\) .*weights_only=True.*state_dict\(\)"):
        load_checkpoint(tiny(), path)


def test_checkpoint_that_does_not_fit(tmp_path: Path) -> None:
    other = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    path = tmp_path / "other.pt"
    torch.save(other.state_dict(), path)
    with fails(r"other\.pt does not fit the model: missing keys 1\.weight, 1\.bias, 1\.running_mean "
               r"\(and 4 more\); unexpected keys 3\.weight, 3\.bias; check that the model"):
        load_checkpoint(tiny(), path)

    wide = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 8 * 8, 3))
    torch.save(wide.state_dict(), path)
    with fails(r"does not fit net: 7 shape mismatches: 0\.weight is 8x1x3x3 in the checkpoint but 4x1x3x3 "
               r"in the model, .*same widths"):
        load_checkpoint(tiny(), path, model_name="net")


# --- torch.export programs -----------------------------------------------------------------------


def export(model: nn.Module, path: Path, dynamic: bool = True) -> None:
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    program = torch.export.export(model.eval(), (torch.randn(2, 1, 8, 8),), dynamic_shapes=shapes)
    torch.export.save(program, path)


def test_exported_program(tmp_path: Path) -> None:
    source = trained_tiny()
    path = tmp_path / "tiny.pt2"
    export(source, path)
    loaded = load_model(str(path))
    assert (loaded.name, loaded.input_shape, loaded.num_classes) == ("tiny", (1, 8, 8), 3)
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(loaded.module(x), source(x))
    assert loaded.module(loaded.example_input(1)).shape == (1, 3)


def test_checkpoint_into_exported_program(tmp_path: Path) -> None:
    path, weights = tmp_path / "tiny.pt2", tmp_path / "w.pt"
    export(tiny(), path)
    source = trained_tiny()
    torch.save(source.state_dict(), weights)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(load_model(str(path), checkpoint=weights).module(x), source(x))


def test_exported_program_errors(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    with fails(r"torch\.export program .*absent\.pt2 does not exist"):
        load_model(str(tmp_path / "absent.pt2"))

    not_a_program = tmp_path / "weights.pt2"
    torch.save(tiny().state_dict(), not_a_program)
    with fails(r"weights\.pt2 is not a torch\.export program.*torch\.export\.save"):
        load_model(str(not_a_program))
    assert "Traceback" not in capfd.readouterr().err  # torch's logged traceback is kept quiet

    static = tmp_path / "static.pt2"
    export(tiny(), static, dynamic=False)
    with fails(r"exported for batch size 2 only.*Dim\('batch'\)"):
        load_model(str(static))


def test_models_that_run_code_say_so_in_one_warning_line(tmp_path: Path, model_file: Path) -> None:
    with pytest.warns(StructADMMWarning, match=r"runs the code in .*my_models\.py \(imported, then build\(\) called\)") as seen:
        load_model(f"{model_file}:build")
    assert len(seen) == 1 and "\n" not in str(seen[0].message)
    path = tmp_path / "tiny.pt2"
    export(tiny(), path)
    with pytest.warns(StructADMMWarning, match=r"tiny\.pt2 runs code from it .*unpickles") as seen:
        load_model(str(path))
    assert len(seen) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", StructADMMWarning)
        load_model("lenet5")  # the zoo's own models: no warning
    from typer.testing import CliRunner

    from structadmm.cli import app

    result = CliRunner().invoke(app, ["inspect", "--model", f"{model_file}:build", "--input-shape", "1x8x8"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "my_models.py" in line]
    assert len(lines) == 1 and lines[0].startswith("warning:") and "runs the code" in lines[0]


# --- data ----------------------------------------------------------------------------------------


def test_digits() -> None:
    data = load_data("digits")
    assert (data.name, data.input_shape, data.num_classes) == ("digits", (1, 16, 16), 10)
    assert len(data.train) + len(data.val) == 1797 and len(data.val) == 360


def write_npz(path: Path, n: int = 40, classes: int = 4, **extra) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 3, 5, 5)).astype(np.float64)
    y = np.arange(n) % classes
    np.savez(path, **{"x": x, "y": y, **extra})
    return x, y


def test_npz_with_seeded_stratified_split(tmp_path: Path) -> None:
    path = tmp_path / "set.npz"
    x, y = write_npz(path)
    data = load_data(str(path), seed=3)
    assert (data.name, data.input_shape, data.num_classes) == ("set", (3, 5, 5), 4)
    val_x, val_y = next(iter(DataLoader(data.val, batch_size=len(data.val))))
    assert (len(data.train), len(data.val)) == (32, 8)
    assert val_x.dtype == torch.float32 and val_y.dtype == torch.int64
    assert sorted(np.bincount(val_y.numpy()).tolist()) == [2, 2, 2, 2]  # stratified
    assert data.val.indices == load_data(str(path), seed=3).val.indices  # seeded
    assert not set(data.val.indices) & set(data.train.indices)
    row = data.val.indices[0]  # the splits index the file's arrays: held-out sample 0 is x[row]
    assert np.array_equal(val_x[0].numpy(), x[row].astype(np.float32)) and int(val_y[0]) == y[row]


def test_npz_with_held_out_arrays(tmp_path: Path) -> None:
    path = tmp_path / "set.npz"
    write_npz(path, x_val=np.zeros((6, 3, 5, 5), np.float32), y_val=np.full(6, 6))
    data = load_data(str(path))
    assert (len(data.train), len(data.val), data.num_classes) == (40, 6, 7)


@pytest.mark.parametrize("arrays, message", [
    ({"y": np.zeros(4, np.int64)}, r"has arrays y; it needs x .* and y .* or x alone"),
    ({"x": np.zeros((4, 2)), "y_val": np.zeros(2, np.int64)}, r"has y_val but no y"),
    ({"x": np.zeros((4, 2)), "y": np.zeros(3, np.int64)}, r"x in .* has 4 samples but y has 3 labels"),
    ({"x": np.zeros((4, 2)), "y": np.zeros(4, np.float32)}, r"labels y .* are float32 .* integer class indices"),
    ({"x": np.zeros((4, 2)), "y": np.zeros(4, np.int64), "x_val": np.zeros((2, 2))}, r"only one of x_val and y_val"),
    ({"x": np.zeros((4, 2)), "y": np.array([0, 1, -1, 0])}, r"include -1; they must be class indices"),
])
def test_npz_errors(tmp_path: Path, arrays: dict, message: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with fails(message):
        load_data(str(path))


def test_missing_or_unknown_data(tmp_path: Path) -> None:
    with fails(r"data file .*absent\.npz does not exist"):
        load_data(str(tmp_path / "absent.npz"))
    with fails(r"data .*no_dir does not exist"):
        load_data(str(tmp_path / "no_dir"))
    with fails(r"unknown data set 'cifar'; give 'digits', 'mnist1d', 'photos', an \.npz file"):
        load_data("cifar")
    with fails(r"test_fraction must be in \(0, 1\)"):
        load_data("digits", test_fraction=1.0)

    good = tmp_path / "good.npz"
    write_npz(good)
    half = tmp_path / "half.npz"
    half.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with fails(r"cannot read .*half\.npz: it is not an \.npz archive of numeric arrays"):
        load_data(str(half))


def write_images(root: Path, classes: dict[str, int], size=(12, 10), mode="RGB") -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            channels = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, channels, dtype=np.uint8), mode).save(root / name / f"{i}.png")


def test_image_folder(tmp_path: Path) -> None:
    write_images(tmp_path / "pics", {"cat": 5, "dog": 5})
    data = load_data(str(tmp_path / "pics"))
    assert (data.name, data.input_shape, data.num_classes) == ("pics", (3, 10, 12), 2)
    assert (len(data.train), len(data.val)) == (8, 2)
    x, label = data.train[0]
    assert x.shape == (3, 10, 12) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert sorted(int(data.val[i][1]) for i in range(2)) == [0, 1]  # stratified
    batch_x, batch_y = next(iter(DataLoader(data.train, batch_size=4)))
    assert batch_x.shape == (4, 3, 10, 12) and batch_y.dtype == torch.int64


def test_image_folder_resized_to_input_shape(tmp_path: Path) -> None:
    write_images(tmp_path / "pics", {"a": 3, "b": 3})
    data = load_data(str(tmp_path / "pics"), input_shape=(1, 8, 8))
    assert data.input_shape == (1, 8, 8) and data.train[0][0].shape == (1, 8, 8)
    with fails(r"an image folder gives 1xHxW or 3xHxW samples, but the input shape is 4x8x8"):
        load_data(str(tmp_path / "pics"), input_shape=(4, 8, 8))


def test_image_folder_with_train_and_val(tmp_path: Path) -> None:
    write_images(tmp_path / "pics" / "train", {"a": 3, "b": 4}, mode="L")
    write_images(tmp_path / "pics" / "val", {"b": 2})
    data = load_data(str(tmp_path / "pics"))
    assert data.input_shape == (1, 10, 12)  # grey, from the first training image
    assert (len(data.train), len(data.val), data.num_classes) == (7, 2, 2)
    assert [int(data.val[i][1]) for i in range(2)] == [1, 1]  # "b" is class 1 in training
    assert data.val[0][0].shape == (1, 10, 12)  # RGB held-out images converted to grey


def test_image_folder_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with fails(r"empty has no images and no class folders; put each class's images in a sub-folder"):
        load_data(str(empty))

    no_images = tmp_path / "notes"
    (no_images / "a").mkdir(parents=True)
    (no_images / "a" / "readme.txt").write_text("hi")
    with fails(r"found no images in the class folders of .*notes \(looked for \.png, \.jpg"):
        load_data(str(no_images))

    write_images(tmp_path / "pics", {"a": 2})
    (tmp_path / "pics" / "b").mkdir()
    with fails(r"class folder .*pics/b has no images \(looked for \.png"):
        load_data(str(tmp_path / "pics"))

    (tmp_path / "pics" / "b" / "0.png").write_bytes(b"not a png")
    data = load_data(str(tmp_path / "pics"))  # images are read on access
    with fails(r"cannot read image .*0\.png .*replace or remove the file"):
        [data.train[i] for i in range(len(data.train))] + [data.val[i] for i in range(len(data.val))]


def test_data_from_user_function(importable) -> None:
    importable("sa_test_data_a", textwrap.dedent("""
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        def pair():
            return TensorDataset(torch.randn(8, 2, 4), torch.arange(8) % 2), TensorDataset(torch.randn(4, 2, 4))

        def loaders():
            train, val = pair()
            return DataLoader(train, batch_size=3), None

        def single():
            return TensorDataset(torch.randn(10, 6), torch.zeros(10, dtype=torch.long))

        def tensors():
            return torch.randn(10, 1, 3, 3), torch.zeros(10, dtype=torch.long)

        def wrong():
            return "data"
    """))
    pair = load_data("sa_test_data_a:pair")
    assert (pair.name, pair.input_shape, pair.num_classes, len(pair.train), len(pair.val)) == (
        "sa_test_data_a:pair", (2, 4), None, 8, 4)
    loaders = load_data("sa_test_data_a:loaders")
    assert isinstance(loaders.train, DataLoader) and loaders.val is None and loaders.input_shape == (2, 4)
    single = load_data("sa_test_data_a:single", test_fraction=0.3)
    assert (len(single.train), len(single.val), single.input_shape) == (7, 3, (6,))
    assert load_data("sa_test_data_a:tensors").input_shape == (1, 3, 3)
    with fails(r"returned str; return \(train, val\) datasets or DataLoaders"):
        load_data("sa_test_data_a:wrong")
    with fails(r"has no function 'absent'"):
        load_data("sa_test_data_a:absent")


def test_check_compatible_and_shapes() -> None:
    check_compatible((1, 16, 16), (1, 16, 16), "digits-cnn", "digits")
    check_compatible(None, (3, 32, 32), "mine", "pics")
    with fails(r"^the data pics gives 3x32x32 samples but resnet20 takes 1x16x16; use data of 1x16x16"):
        check_compatible((1, 16, 16), (3, 32, 32), "resnet20", "pics")
    assert parse_shape("3x32x32") == (3, 32, 32) and parse_shape("1,8,8") == (1, 8, 8)
    with fails(r"input shape must be the positive sizes of one sample joined by x, like 3x32x32, got '3x0'"):
        parse_shape("3x0")


def test_exported_program_is_lifted_to_prunable_layers(tmp_path: Path) -> None:
    """A .pt2 file becomes real Conv/BatchNorm/Linear layers: same outputs, prunable, exact surgery."""
    from structadmm.models import get_spec
    from structadmm.prune import PruningPlan, compact

    spec = get_spec("resnet20")
    torch.manual_seed(0)
    model = spec.build().eval()
    x = spec.example_input(2)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "resnet20.pt2")
    loaded = load_model(str(tmp_path / "resnet20.pt2"))
    with torch.no_grad():
        assert torch.equal(loaded.module(x), model(x))
    convs = [sum(isinstance(m, nn.Conv2d) for m in net.modules()) for net in (loaded.module, model)]
    assert convs[0] == convs[1] > 0
    plan = PruningPlan.uniform(loaded.module, x, "filter", 0.5)
    native = PruningPlan.uniform(model, x, "filter", 0.5)
    assert len(plan.units) == len(native.units) == 12
    plan.project(loaded.module)
    compact(loaded.module, x)  # raises ParityError unless exact
