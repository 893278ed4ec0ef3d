"""The ``structadmm`` command line: parses flags, calls the library, prints.

User mistakes (:class:`StructADMMError`) print one line and exit with status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import StructADMMError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    help="Structured pruning with ADMM: prune, compact, export to ONNX and benchmark against the dense model.",
)
out = Console()
err = Console(stderr=True)

DebugOpt = typer.Option(False, "--debug", help="Show full tracebacks on errors.")


def _friendly(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user errors into one red line and exit status 2 (unless --debug)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("debug", False)
        try:
            return func(*args, **kwargs)
        except StructADMMError as exc:
            if debug:
                raise
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            if debug:
                raise
            err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                      highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def _progress() -> Progress:
    return Progress(TextColumn("{task.description:>18}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=True, disable=not err.is_terminal)


ModelOpt = typer.Option("digits-cnn", "--model", "-m", help=(
    "A zoo name (see `structadmm models`), module:function or file.py:function returning an nn.Module "
    "(this runs that code), or a torch.export .pt2 file."))
CheckpointOpt = typer.Option(None, "--checkpoint", help="Weights for the model: .safetensors or a torch state_dict "
                                                      "(loaded with weights_only=True).")
InputShapeOpt = typer.Option(None, "--input-shape", help="Shape of one sample, e.g. 3x32x32, when the model does not say.")


@app.command()
@_friendly
def run(
    model: str = ModelOpt,
    data: str = typer.Option("digits", "--data", help=(
        "'digits' or 'mnist1d' (built in), an .npz with x and y arrays, an image folder with one sub-folder per class, "
        "or module:function returning datasets (this runs that code).")),
    checkpoint: Optional[Path] = CheckpointOpt,
    input_shape: Optional[str] = InputShapeOpt,
    sparsity: Optional[str] = typer.Option(None, "--sparsity", "-s",
                                           help="filter | channel | shape | irregular, or a combination like filter+shape."),
    ratio: Optional[float] = typer.Option(None, "--ratio", "-r", help="Fraction of groups to remove, in (0, 1)."),
    plan: Optional[Path] = typer.Option(None, "--plan", help="TOML plan file with per-layer settings."),
    target_macs: Optional[float] = typer.Option(None, "--target-macs", help=(
        "Choose per-layer ratios for this MAC reduction (e.g. 4 for 4x fewer), by layer sensitivity.")),
    target_latency: Optional[float] = typer.Option(None, "--target-latency", help=(
        "Choose per-layer ratios for this measured ONNX Runtime CPU speedup over dense (e.g. 3).")),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML file with any of the settings."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: a new folder under ./runs)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (training device)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed."),
    resume: Optional[Path] = typer.Option(None, "--resume", help=(
        "Continue the interrupted run whose --out folder was DIR from its last checkpoint; give the same "
        "model, data and settings it was started with.")),
    debug: bool = DebugOpt,
) -> None:
    """Run the whole pipeline: train, ADMM-prune, compact, export, benchmark, report."""
    import torch

    from .bench import render_table
    from .models.data import check_compatible, load_data
    from .pipeline import CompressConfig, compress

    if resume is not None and out_dir is not None and out_dir.resolve() != resume.resolve():
        raise StructADMMError(f"--resume {resume} continues the run in that folder; leave out --out {out_dir}")
    overrides = {k: v for k, v in dict(sparsity=sparsity, ratio=ratio, device=device, seed=seed,
                                         target_macs=target_macs, target_latency=target_latency,
                                         plan=str(plan) if plan else None).items() if v is not None}
    cfg = CompressConfig.from_toml(config, overrides) if config else CompressConfig.from_mapping(overrides, "flags")
    torch.manual_seed(cfg.seed)  # before building, so a model's initial weights are the same every run
    loaded = _load_model(model, checkpoint, input_shape)
    dataset = load_data(data, input_shape=loaded.input_shape, seed=cfg.seed)
    check_compatible(loaded.input_shape, dataset.input_shape, loaded.name, dataset.name)
    with _progress() as progress:
        result = compress(loaded.module, dataset.train, dataset.val, cfg, out_dir=resume or out_dir,
                          model_name=loaded.name, progress=progress, resume=resume is not None)
    if result.rank != 0:  # under torchrun, rank 0 speaks for the job
        return
    out.print(render_table(result.report))
    out.print(f"run folder: [bold]{result.run_dir}[/] (dense.onnx, pruned.onnx, report.json, report.md, latency.png, accuracy.png)")


def _load_model(model: str, checkpoint: Optional[Path], input_shape: Optional[str]):
    from .models.data import parse_shape
    from .models.loading import load_model

    loaded = load_model(model, checkpoint=checkpoint)
    if input_shape:
        loaded.input_shape = parse_shape(input_shape)
    return loaded


@app.command()
@_friendly
def bench(
    dense: Path = typer.Argument(..., help="Baseline ONNX file."),
    pruned: Path = typer.Argument(..., help="ONNX file to compare against the baseline."),
    batch: list[int] = typer.Option([1, 64], "--batch", "-b", help="Batch size (repeatable)."),
    threads: int = typer.Option(2, "--threads", help="ONNX Runtime intra-op threads."),
    min_seconds: float = typer.Option(3.0, "--min-seconds", help="Minimum timing time per batch size."),
    min_runs: int = typer.Option(30, "--min-runs", help="Minimum timed runs per model and batch size."),
    warmup: int = typer.Option(10, "--warmup", help="Untimed runs per model before timing."),
    provider: Optional[list[str]] = typer.Option(
        None, "--provider", "-p",
        help="Execution provider (repeatable), e.g. CPUExecutionProvider; default: CPU, CUDA and TensorRT where usable."),
    opt_level: str = typer.Option("all", "--opt-level", help="Graph optimisation: disable, basic, extended or all."),
    spinning: str = typer.Option("run", "--spinning",
                                 help="Pool threads spin: run (within a run, the default), off, or on (ORT's default)."),
    debug: bool = DebugOpt,
) -> None:
    """Benchmark two ONNX files with ONNX Runtime, interleaved, and print the speedup."""
    from .bench import benchmark
    from .exporters import count_onnx

    report = benchmark({"dense": dense, "pruned": pruned}, batch_sizes=batch, threads=threads, min_seconds=min_seconds,
                       min_runs=min_runs, max_runs=max(10_000, min_runs), warmup=warmup, providers=provider,
                       optimization=opt_level, spinning=spinning)
    dense_cost, pruned_cost = count_onnx(dense), count_onnx(pruned)
    mac_ratio = dense_cost.macs / max(pruned_cost.macs, 1)
    table = Table(title=f"{dense.name} vs {pruned.name}: {mac_ratio:.2f}x fewer MACs")
    for col in ("provider", "batch", "dense ms", "pruned ms", "speedup", "efficiency"):
        table.add_column(col, justify="right")
    for row in report.to_rows(dense="dense", pruned="pruned", mac_ratio=mac_ratio):
        table.add_row(str(row["provider"]).replace("ExecutionProvider", ""), str(row["batch"]),
                      f"{row['dense_ms']:.3f}", f"{row['pruned_ms']:.3f}", f"{row['speedup']:.2f}x",
                      f"{row['efficiency']:.2f}")
    out.print(table)
    for provider, reason in report.skipped:
        out.print(f"[dim]skipped {provider}: {reason}[/]")


@app.command()
@_friendly
def inspect(
    model: str = ModelOpt,
    checkpoint: Optional[Path] = CheckpointOpt,
    input_shape: Optional[str] = InputShapeOpt,
    sparsity: str = typer.Option("filter", "--sparsity", "-s", help="Sparsity type(s)."),
    ratio: float = typer.Option(0.5, "--ratio", "-r", help="Fraction of groups to remove."),
    plan: Optional[Path] = typer.Option(None, "--plan", help="TOML plan file."),
    debug: bool = DebugOpt,
) -> None:
    """Show the model's coupled channel groups and what a plan would prune."""
    from .pipeline import PruningPlan

    loaded = _load_model(model, checkpoint, input_shape)
    net, example = loaded.module.eval(), loaded.example_input(1)
    pruning = (PruningPlan.from_file(net, example, plan, keep_ends=True) if plan
               else PruningPlan.uniform(net, example, sparsity, ratio, keep_ends=True))  # as `run` plans by default
    table = Table(title=f"{loaded.name}: {len(pruning.units)} pruning units")
    for col in ("unit", "sparsity", "ratio", "channels"):
        table.add_column(col)
    for row in pruning.summary():
        table.add_row(row["unit"], row["sparsity"], f"{row['ratio']:.3f}", str(row["channels"] or "-"))
    out.print(table)
    for layer, reason in pruning.skipped:
        out.print(f"[dim]left alone: {layer}: {reason}[/]")


@app.command()
def models() -> None:
    """List the model zoo."""
    from .models import get_spec, model_names

    table = Table(title="model zoo")
    for col in ("name", "input", "classes", "description"):
        table.add_column(col)
    for name in model_names():
        spec = get_spec(name)
        table.add_row(name, "x".join(map(str, spec.input_shape)), str(spec.num_classes), spec.description)
    out.print(table)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
