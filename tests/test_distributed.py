"""Multi-process training: two gloo ranks on CPU reach the masks and weights of one process.

The equality is exact in exact arithmetic, by construction: the model has no BatchNorm (whose
per-rank batch statistics would differ from the whole batch's), the loss is a mean, DDP
averages the ranks' gradients, and each global batch is the same samples in both runs — the
single process reads a DistributedSampler over one replica with the same seed, whose
permutation the two ranks split between them.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from structadmm.pipeline import CompressConfig, compress
from structadmm.pipeline.distributed import DistContext, setup, shard

CONFIG = dict(dense_epochs=1, admm_rounds=2, admm_epochs=1, retrain_epochs=1, batch_size=16, rho=0.5,
              rho_growth=2.0, bench_batches=[1], bench_min_runs=3, bench_min_seconds=0.0, bench_isolate=False)
WORLD = 2


def no_bn_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )


def _digits() -> list[torch.Tensor]:
    """64 training and 32 held-out samples of the digits set: x, y, x_val, y_val."""
    from structadmm.models import load_digits_split

    train, test = load_digits_split()
    return [t[:64] for t in train.tensors] + [t[:32] for t in test.tensors]


def _run(out: Path, digits: list[torch.Tensor]) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = no_bn_net()
    small = TensorDataset(*digits[:2])
    # one process reads the permutation the ranks split between them (see the module docstring)
    order = DistributedSampler(small, num_replicas=1, rank=0, shuffle=True, seed=0)
    train = DataLoader(small, batch_size=CONFIG["batch_size"], sampler=order)
    result = compress(model, train, TensorDataset(*digits[2:]), CompressConfig(**CONFIG), out_dir=out,
                      model_name="no-bn")
    return model, result


def _worker(rank: int, port: int, tmp: str, digits: list[torch.Tensor]) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    model, result = _run(Path(tmp) / "ddp", digits)
    torch.save({"masks": result.masks, "weights": model.state_dict(), "report": result.report,
                "rank": result.rank, "run_dir": str(result.run_dir),
                "group_left": torch.distributed.is_initialized()}, Path(tmp) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(tmp: Path, digits: list[torch.Tensor], timeout: float = 120.0) -> None:
    context = mp.start_processes(_worker, args=(_free_port(), str(tmp), digits), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail("the two ranks did not finish in time (a collective waiting for a rank?)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def test_two_ranks_match_one_process(tmp_path: Path) -> None:
    digits = _digits()
    _spawn(tmp_path, digits)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single_model, single = _run(tmp_path / "single", digits)
    finally:
        torch.set_num_threads(threads)

    zero, one = ranks
    # Z/U rounds and masks come from synchronised weights: identical bit for bit on every rank
    assert zero["masks"].keys() == one["masks"].keys() and zero["masks"]
    for name in zero["masks"]:
        assert torch.equal(zero["masks"][name], one["masks"][name]), name
    for name in zero["weights"]:
        assert torch.equal(zero["weights"][name], one["weights"][name]), name
    # ... and the same as one process on the same global batches
    for name, mask in single.masks.items():
        assert torch.equal(mask, zero["masks"][name]), name
    torch.manual_seed(0)
    initial = no_bn_net().state_dict()
    for name, weight in single_model.state_dict().items():
        # float sums in another order: ~1e-8 apart, while training moved every tensor far more
        torch.testing.assert_close(zero["weights"][name], weight, atol=1e-6, rtol=1e-5)
        assert (weight - initial[name]).abs().max() > 1e-3, name
    for ddp_round, one_round in zip(zero["report"]["admm"], single.report["admm"], strict=True):
        assert ddp_round["primal_residual"] == pytest.approx(one_round["primal_residual"], rel=1e-4)
    assert zero["report"]["groups"] == single.report["groups"]

    # rank 0 alone wrote one finished folder; every rank got its report, and the group is gone
    assert [zero["rank"], one["rank"]] == [0, 1] and zero["report"] == one["report"]
    assert zero["run_dir"] == one["run_dir"] == str(tmp_path / "ddp")
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [
        "accuracy.png", "dense.onnx", "latency.png", "pruned.onnx", "report.json", "report.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "rank0.pt", "rank1.pt", "single"]
    assert not zero["group_left"] and not one["group_left"]


def test_shards_are_disjoint_and_make_up_the_global_batch() -> None:
    data = TensorDataset(torch.arange(40))
    global_order = DataLoader(data, batch_size=8, sampler=DistributedSampler(data, 1, 0, shuffle=True, seed=3))
    shards = [shard(global_order, DistContext(rank, WORLD)) for rank in range(WORLD)]
    assert all(s.batch_size == 4 for s in shards)
    for epoch in range(3):
        for loader in (global_order, *shards):
            loader.sampler.set_epoch(epoch)
        for whole, *parts in zip(global_order, *shards, strict=True):
            pieces = [p[0] for p in parts]
            assert sorted(torch.cat(pieces).tolist()) == sorted(whole[0].tolist())
            assert not set(pieces[0].tolist()) & set(pieces[1].tolist())


def test_without_torchrun_it_is_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = setup("cpu")
    assert (ctx.rank, ctx.world_size, ctx.active, ctx.owns_group) == (0, 1, False, False)
    loader = DataLoader(TensorDataset(torch.arange(8)), batch_size=4, shuffle=True)
    assert shard(loader, ctx) is loader
    assert not torch.distributed.is_initialized()


def test_a_batch_that_does_not_split_is_a_clear_error() -> None:
    from structadmm.errors import StructADMMError

    loader = DataLoader(TensorDataset(torch.arange(10)), batch_size=5)
    with pytest.raises(StructADMMError, match="batch_size 5 does not split evenly over 2 processes"):
        shard(loader, DistContext(0, 2))
