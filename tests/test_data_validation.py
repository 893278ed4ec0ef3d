"""Data the model cannot learn from is refused before any work: one line naming the split and
the sample, exit status 2, no traceback, nothing written (not even the default runs/ folder);
classes the training data lacks get a warning."""

from __future__ import annotations

import json

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, SubsetRandomSampler, TensorDataset
from typer.testing import CliRunner

import structadmm as sa
from cli_checks import ended_cleanly
from structadmm.cli import app
from structadmm.models import get_spec
from structadmm.models.data import load_data
from structadmm.models.validate import check_data

runner = CliRunner()

FAST = """
dense_epochs = 1
admm_rounds = 1
admm_epochs = 1
retrain_epochs = 1
bench_min_seconds = 0.0
bench_min_runs = 3
bench_batches = [1]
"""

USER_CODE = """
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def _digits(n=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 16, 16, generator=gen), torch.arange(n) % 10


def empty_val():
    x, y = _digits()
    return TensorDataset(x, y), TensorDataset(x[:0], y[:0])


def float_labels():
    x, y = _digits()
    return TensorDataset(x, y.float()), None


def no_labels():
    x, _ = _digits()
    return TensorDataset(x), None


def shuffled_loader_with_nan():
    x, y = _digits()
    x[13, 0, 2, 5] = float("nan")
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True), None


def no_nines():
    x, y = _digits()
    keep = y != 9
    return TensorDataset(x[keep], y[keep]), TensorDataset(x[:10], y[:10])


def five_classes():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 5))
"""


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working folder, the current one, so a default runs/ folder would land in it."""
    (tmp_path / "fast.toml").write_text(FAST)
    (tmp_path / "user.py").write_text(USER_CODE)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if "__pycache__" not in p.parts)


def refused(workdir: Path, *args: str) -> str:
    """Run the CLI without --out and expect one line, exit 2, and nothing written; the message. A
    model given as user code is announced first, in one warning line of its own (it runs that code)."""
    before = listing(workdir)
    result = runner.invoke(app, ["run", "--config", "fast.toml", *args])
    assert result.exit_code == 2, result.output
    ended_cleanly(result)
    lines = result.output.strip().splitlines()
    model = args[args.index("--model") + 1] if "--model" in args else ""
    if ".py:" in model:
        assert re.match(r"warning: --model \S+ runs the code in ", lines[0]), result.output
        lines = lines[1:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert listing(workdir) == before and not (workdir / "runs").exists()
    return lines[0]


def write_npz(path: Path, n: int = 40, **arrays: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.random((n, 1, 16, 16)).astype(np.float32)
    y = np.arange(n) % 10
    np.savez(path, **{"x": x, "y": y, **arrays})
    return x, y


# --- through the CLI -----------------------------------------------------------------------------


def test_labels_outside_the_models_classes(workdir: Path) -> None:
    x, _ = write_npz(workdir / "d.npz")
    np.savez(workdir / "d.npz", x=x, y=95 + np.arange(40) % 10)
    line = refused(workdir, "--data", "d.npz")
    assert "but digits-cnn gives 10 class scores, so labels must be 0..9" in line
    # the first training sample, named by its row in the file (which row depends on the seeded split)
    row, label = re.search(r"training sample 0 \(sample (\d+) of the data it was split from\) has label (\d+)", line).groups()
    assert int(label) == 95 + int(row) % 10


@pytest.mark.parametrize("value, word", [(np.nan, "NaN"), (np.inf, "inf"), (-np.inf, "inf")])
def test_non_finite_input(workdir: Path, value: float, word: str) -> None:
    x, y = write_npz(workdir / "d.npz")
    x[17, 0, 3, 4] = value
    np.savez(workdir / "d.npz", x=x, y=y)
    line = refused(workdir, "--data", "d.npz")
    # the seeded split holds out some rows; the sample is named by its row in the file either way
    assert f"(sample 17 of the data it was split from) has {word} in its inputs" in line
    assert line.startswith(("error: training sample", "error: held-out sample"))


def test_non_finite_held_out_input(workdir: Path) -> None:
    x, y = write_npz(workdir / "d.npz")
    x_val = x[:6].copy()
    x_val[3, 0, 0, 0] = np.inf
    np.savez(workdir / "d.npz", x=x, y=y, x_val=x_val, y_val=y[:6])
    assert "held-out sample 3 has inf in its inputs" in refused(workdir, "--data", "d.npz")


def test_built_in_digits_with_too_few_outputs(workdir: Path) -> None:
    line = refused(workdir, "--model", "user.py:five_classes", "--input-shape", "1x16x16", "--data", "digits")
    assert re.match(r"error: training sample \d+ has label [5-9], but user:five_classes gives 5 class scores, so "
                    r"labels must be 0\.\.4; relabel the data", line), line


@pytest.mark.parametrize("function, message", [
    ("empty_val", "the held-out data is empty; give it samples, or no held-out data at all"),
    ("float_labels", "the training data's labels are float32; they must be integer class indices 0..9"),
    # a shuffling DataLoader is read again in order: the sample is named by its place in the data set
    ("shuffled_loader_with_nan", "training sample 13 has NaN in its inputs"),
])
def test_data_from_user_code(workdir: Path, function: str, message: str) -> None:
    assert message in refused(workdir, "--data", f"user.py:{function}")


def test_labels_asked_of_data_without_them(workdir: Path) -> None:
    line = refused(workdir, "--data", "user.py:no_labels", "--objective", "labels")
    assert 'objective = "labels" but the training data has no labels' in line, line


def write_images(root: Path, classes: int, per_class: int = 2, sizes=((16, 16),)) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            width, height = sizes[(c * per_class + i) % len(sizes)]
            Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L").save(
                root / f"c{c:02d}" / f"{i}.png")


@pytest.mark.parametrize("content", [b"these are notes, not an image", "truncated"])
def test_unreadable_image(workdir: Path, content: bytes | str) -> None:
    write_images(workdir / "pics", 10)
    bad = workdir / "pics" / "c07" / "zz.png"  # not the first image: it is read only when checked
    good = (workdir / "pics" / "c07" / "0.png").read_bytes()
    bad.write_bytes(good[: len(good) // 2] if content == "truncated" else content)
    line = refused(workdir, "--data", "pics")
    assert "cannot read image pics/c07/zz.png" in line and "replace or remove the file" in line


def test_image_folder_with_more_classes_than_outputs(workdir: Path) -> None:
    write_images(workdir / "pics", 11)
    line = refused(workdir, "--data", "pics")
    assert "training image pics/c10/" in line and "has label 10, but digits-cnn gives 10 class scores" in line


def test_missing_training_class_is_a_warning(workdir: Path) -> None:
    plan = workdir / "plan.toml"  # the run then stops at the plan, before training: the warning came first
    plan.write_text('[layers."backbone.*"]\nsparsity = "filter"\nratio = 0.5\n')
    result = runner.invoke(app, ["run", "--config", "fast.toml", "--data", "user.py:no_nines", "--plan", str(plan)])
    assert result.exit_code == 2, result.output
    warning, error = result.output.strip().splitlines()
    assert warning == ("warning: the training data has no samples of class 9 (of the 10 that digits-cnn scores); "
                       "the model cannot learn it")
    assert error.startswith("error: ") and "matches no Conv or Linear layer" in error


# --- the library ---------------------------------------------------------------------------------


def test_compress_refuses_before_writing(workdir: Path) -> None:
    x, y = torch.rand(30, 1, 16, 16), torch.arange(30) % 10
    x[3, 0, 1, 1] = float("nan")
    before = listing(workdir)
    for out_dir in (None, workdir / "run"):
        with pytest.raises(sa.StructADMMError, match=r"^training sample 3 has NaN in its inputs"):
            sa.compress(get_spec("digits-cnn").build(), TensorDataset(x, y), None, out_dir=out_dir)
        assert listing(workdir) == before
    with pytest.raises(sa.StructADMMError, match=r"^training sample 0 has label 12, but DigitsCNN gives 10"):
        sa.compress(get_spec("digits-cnn").build(), (torch.rand(4, 1, 16, 16), torch.tensor([12, 0, 1, 2])), None)
    assert listing(workdir) == before


def test_missing_class_warning() -> None:
    x, y = torch.rand(20, 3), torch.arange(20) % 3
    with pytest.warns(sa.StructADMMWarning, match=r"no samples of classes 3, 4 \(of the 5 that Linear scores\)"):
        check_data(nn.Linear(3, 5), TensorDataset(x, y), None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every class present: no warning
        check_data(nn.Linear(3, 3), TensorDataset(x, y), TensorDataset(x[:2], y[:2]))


def bn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 14 * 14, 10))


def test_checking_leaves_model_and_random_state_alone() -> None:
    net = bn_net()
    net[2].eval()  # a mixture of modes, kept module by module
    state = {k: v.clone() for k, v in net.state_dict().items()}
    modes = [m.training for m in net.modules()]
    x, y = torch.rand(50, 1, 16, 16), torch.arange(50) % 10
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))
    odd = DataLoader(TensorDataset(x, y), batch_size=8, sampler=SubsetRandomSampler(range(0, 50, 2),
                                                                                  generator=torch.Generator().manual_seed(2)))
    loader_state, odd_state, rng_state = loader.generator.get_state(), odd.sampler.generator.get_state(), torch.get_rng_state()
    check_data(net, loader, odd)
    assert [m.training for m in net.modules()] == modes
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())  # BatchNorm statistics too
    assert torch.equal(loader.generator.get_state(), loader_state) and torch.equal(odd.sampler.generator.get_state(), odd_state)
    assert torch.equal(torch.get_rng_state(), rng_state)


def test_a_loader_with_its_own_sampler_is_read_as_given() -> None:
    x, y = torch.rand(50, 1, 16, 16), torch.arange(50) % 10
    x[20, 0, 0, 0] = float("nan")
    odd = DataLoader(TensorDataset(x, y), batch_size=8, sampler=SubsetRandomSampler(range(0, 50, 2),
                                                                                  generator=torch.Generator().manual_seed(2)))
    state = odd.sampler.generator.get_state()
    position = list(odd.sampler).index(20)  # where the next pass over the loader meets row 20
    odd.sampler.generator.set_state(state)
    with pytest.raises(sa.StructADMMError,
                       match=rf"^training sample {position} \(counted in the order its DataLoader yields\) has NaN"):
        check_data(bn_net(), odd, None)


class Counted(Dataset):
    """A data set that counts how often each sample is read."""

    def __init__(self, n: int):
        self.reads = [0] * n

    def __len__(self) -> int:
        return len(self.reads)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        self.reads[i] += 1
        return torch.full((1, 16, 16), i / len(self.reads)), i % 10


def test_every_sample_is_read_once_batch_by_batch() -> None:
    train, val = Counted(600), Counted(30)
    check_data(bn_net(), train, val)
    assert set(train.reads) == {1} and set(val.reads) == {1}


def test_model_that_does_not_give_class_scores() -> None:
    x, y = torch.rand(6, 3), torch.arange(6) % 2
    with pytest.raises(sa.StructADMMError, match=r"^Flatten returns a tensor of shape 6, not class scores"):
        check_data(nn.Flatten(0), TensorDataset(x, y), None)
    with pytest.raises(sa.StructADMMError, match=r"^Linear cannot run on the training data's 3 samples: mat1 and mat2 shapes cannot be multiplied"):
        check_data(nn.Linear(4, 2), TensorDataset(x, y), None)


def test_mixed_image_sizes_are_resized(tmp_path: Path) -> None:
    write_images(tmp_path / "pics", 3, per_class=3, sizes=((16, 16), (20, 12), (9, 31)))
    for shape in ((1, 16, 16), None):  # to the model's input, else to the first image's size
        data = load_data(str(tmp_path / "pics"), input_shape=shape)
        assert data.input_shape == (1, 16, 16)
        assert {tuple(data.train[i][0].shape) for i in range(len(data.train))} == {(1, 16, 16)}
        check_data(nn.Sequential(nn.Flatten(), nn.Linear(256, 3)), data.train, data.val)


def test_unlabeled_data_with_reconstruct_runs_and_reports_the_refit(workdir: Path) -> None:
    # 40 inputs without labels: the run distils, and --reconstruct refits the kept layers after the prune
    result = runner.invoke(app, ["run", "--config", "fast.toml", "--data", "user.py:no_labels", "--reconstruct",
                                 "--out", "run"])
    assert result.exit_code == 0, result.output
    report = json.loads((workdir / "run" / "report.json").read_text())
    done = report["reconstruction"]
    assert report["objective"]["mode"] == "distill" and done["layers"] >= 2 and not done["skipped"]
    assert done["error_after"] < done["error_before"]
