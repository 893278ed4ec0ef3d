"""The ``structadmm`` command line: parses flags, calls the library, prints.

User mistakes (:class:`StructADMMError`) print one line and exit with status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import StructADMMError, StructADMMWarning

app = typer.Typer(
    add_completion=False,
    no_args_is_help=False,
    help="Structured pruning with ADMM: prune, compact, export to ONNX and benchmark against the dense model.",
)
out = Console()
err = Console(stderr=True)

DebugOpt = typer.Option(False, "--debug", help="Show full tracebacks on errors, and what the exporters printed.")


def _friendly(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user errors into one red line and exit status 2 (unless --debug)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = kwargs.get("debug", False)
        if debug:  # what the library logs at debug level (an exporter's output, say) is shown too
            logging.basicConfig(format="%(name)s: %(message)s")
            logging.getLogger("structadmm").setLevel(logging.DEBUG)
        try:
            return func(*args, **kwargs)
        except StructADMMError as exc:
            if debug:
                raise
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
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


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Show structadmm's warnings (:class:`StructADMMWarning`) as one yellow line each."""
    with warnings.catch_warnings():
        show = warnings.showwarning

        def one_line(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
            if not issubclass(category, StructADMMWarning):
                return show(message, category, *args, **kwargs)
            err.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)

        warnings.simplefilter("always", StructADMMWarning)
        warnings.showwarning = one_line
        yield


def _progress() -> Progress:
    return Progress(TextColumn("{task.description:>18}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=True, disable=not err.is_terminal)


ModelOpt = typer.Option("digits-cnn", "--model", "-m", help=(
    "A zoo name (see `structadmm models`), module:function or file.py:function returning an nn.Module "
    "(this runs that code), a torch.export .pt2 file, or an .onnx file (converted with onnx2torch)."))
CheckpointOpt = typer.Option(None, "--checkpoint", help="Weights for the model: .safetensors or a torch state_dict "
                                                      "(loaded with weights_only=True).")
InputShapeOpt = typer.Option(None, "--input-shape", help="Shape of one sample, e.g. 3x32x32, when the model does not say.")


@app.command()
@_friendly
def run(
    model: str = ModelOpt,
    data: str = typer.Option("digits", "--data", help=(
        "'digits' or 'mnist1d' (built in, labelled), 'photos' (built-in unlabeled photographs), an .npz with x (and y "
        "for labels), an image folder (one sub-folder per class, or images alone: unlabeled), or module:function "
        "returning data (this runs that code). Without labels the model distils from its dense self.")),
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
    objective: Optional[str] = typer.Option(None, "--objective", help=(
        "labels (cross-entropy on class labels), distill (the model as given is the teacher; every output matched, "
        "no labels used) or auto (the default: distill when the data has no labels or the model is no classifier).")),
    prune_method: Optional[str] = typer.Option(None, "--prune-method", help=(
        "admm (ADMM rounds, then the hard prune), oneshot (magnitude pruning of the dense weights, then masked "
        "retraining for the same epochs) or auto (the default: oneshot when distilling, else admm).")),
    reconstruct: Optional[bool] = typer.Option(None, "--reconstruct/--no-reconstruct", help=(
        "After the hard prune, refit each kept layer by least squares to reproduce the dense layer's output on a "
        "batch of training inputs (no labels needed; off by default).")),
    boxes: Optional[str] = typer.Option(None, "--boxes", help=(
        "yolo: the report also scores the pruned model's boxes against the dense model's (mAP@0.5), decoding an "
        "Ultralytics-style [batch, 4 + classes, anchors] output.")),
    quantize: Optional[str] = typer.Option(None, "--quantize", help=(
        "int8: also quantize pruned.onnx and dense.onnx with ONNX Runtime (static QDQ, per-channel, calibrated "
        "on training batches), measure them in ONNX Runtime and gate the pruned INT8 model.")),
    admm_stages: Optional[str] = typer.Option(None, "--admm-stages", help=(
        "Progressive stages before --ratio, e.g. 0.5,0.75,0.875: ADMM, hard prune and a short masked retrain at "
        "each, then ADMM at --ratio with what they pruned held at zero.")),
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
                                         target_macs=target_macs, target_latency=target_latency, quantize=quantize,
                                         objective=objective, prune_method=prune_method, reconstruct=reconstruct,
                                         boxes=boxes,
                                         plan=str(plan) if plan else None,
                                         admm_stages=_ratios(admm_stages, "--admm-stages")).items() if v is not None}
    cfg = CompressConfig.from_toml(config, overrides) if config else CompressConfig.from_mapping(overrides, "flags")
    torch.manual_seed(cfg.seed)  # before building, so a model's initial weights are the same every run
    loaded = _load_model(model, checkpoint, input_shape)
    dataset = load_data(data, input_shape=loaded.input_shape, seed=cfg.seed)
    check_compatible(loaded.input_shape, dataset.input_shape, loaded.name, dataset.name)
    if loaded.onnx_file is not None:
        from .models.onnx_input import check_data_feeds

        check_data_feeds(loaded.onnx_file, dataset.train, dataset.name)
    with _progress() as progress, _warnings_as_lines():
        result = compress(loaded.module, dataset.train, dataset.val, cfg, out_dir=resume or out_dir,
                          model_name=loaded.name, progress=progress, resume=resume is not None,
                          dense_onnx=loaded.onnx_file)
    if result.rank != 0:  # under torchrun, rank 0 speaks for the job
        return
    out.print(render_table(result.report))
    gate = (result.report.get("quantized") or {}).get("gate")
    if gate and not gate["ok"]:
        err.print(f"[bold yellow]warning:[/] the pruned INT8 model failed its gate ({'; '.join(gate['reasons'])}); "
                  f"kept as {result.report['quantized']['onnx']} for inspection, not shipped as pruned-int8.onnx",
                  highlight=False, soft_wrap=True)
    for slow in (result.report.get("quantized") or {}).get("slower_than_fp32") or []:
        err.print(f"[bold yellow]warning:[/] pruned INT8 took {slow['time_ratio']:.2f}x the time of pruned FP32 on "
                  f"{slow['provider']} at batch {slow['batch']}; pruned.onnx is the faster file there",
                  highlight=False, soft_wrap=True)
    out.print(f"run folder: [bold]{result.run_dir}[/] (dense.onnx, pruned.onnx, report.json, report.md, latency.png, accuracy.png)")


@app.command()
@_friendly
def compact(
    model: str = ModelOpt,
    checkpoint: Path = typer.Option(..., "--checkpoint", help=(
        "The pruned weights (zeros where pruned): .safetensors or a torch state_dict (loaded with weights_only=True).")),
    input_shape: Optional[str] = InputShapeOpt,
    data: Optional[str] = typer.Option(None, "--data", help=(
        "Labelled data for both accuracies and the parity check (as for `run`); default: random inputs, no accuracy.")),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML file; its bench_* settings and seed are used."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: a new folder under ./runs)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the random example inputs."),
    debug: bool = DebugOpt,
) -> None:
    """Compact a model pruned in your own loop: surgery, export, parity, benchmark, report."""
    from .bench import render_table
    from .models.data import check_compatible, load_data
    from .pipeline import CompressConfig, compact_run
    from .batches import first_batch, make_loader

    overrides = {"seed": seed} if seed is not None else {}
    cfg = CompressConfig.from_toml(config, overrides) if config else CompressConfig.from_mapping(overrides, "flags")
    loaded = _load_model(model, checkpoint, input_shape)
    held_out = None
    if data is not None:
        dataset = load_data(data, input_shape=loaded.input_shape, seed=cfg.seed)
        check_compatible(loaded.input_shape, dataset.input_shape, loaded.name, dataset.name)
        held_out = dataset.val if dataset.val is not None else dataset.train
        example = first_batch(make_loader(held_out, 8, shuffle=False))
    else:
        example = loaded.example_input(8, seed=cfg.seed)
    result = compact_run(loaded.module, example, cfg, val_data=held_out, out_dir=out_dir, model_name=loaded.name)
    out.print(render_table(result.report))
    out.print(f"run folder: [bold]{result.run_dir}[/] (dense.onnx, pruned.onnx, report.json, report.md, latency.png, accuracy.png)")


def _ratios(text: Optional[str], flag: str) -> Optional[list[float]]:
    """A comma-separated list of ratios (``0.5,0.75``); None when the flag is not given."""
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise StructADMMError(f"{flag} takes ratios separated by commas, e.g. 0.5,0.75,0.875; got {text!r}") from None


def _load_model(model: str, checkpoint: Optional[Path], input_shape: Optional[str]):
    from .models.data import parse_shape
    from .models.loading import load_model

    shape = parse_shape(input_shape) if input_shape else None
    with _warnings_as_lines():  # "this runs the file's code" for .py and .pt2 models
        loaded = load_model(model, checkpoint=checkpoint, input_shape=shape)
    if shape:
        loaded.input_shape = shape
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
    warmup: int = typer.Option(10, "--warmup", help="Untimed runs per model before timing (at least 1)."),
    provider: Optional[list[str]] = typer.Option(
        None, "--provider", "-p",
        help="Execution provider (repeatable), e.g. CPUExecutionProvider; default: CPU, CUDA and TensorRT where usable."),
    opt_level: str = typer.Option("all", "--opt-level", help="Graph optimisation: disable, basic, extended or all."),
    spinning: Optional[str] = typer.Option(None, "--spinning", help=(
        "Pool threads spin: on (ORT's default; the default with --isolate), run (within a run; the default "
        "in-process), or off.")),
    isolate: bool = typer.Option(True, "--isolate/--in-process", help=(
        "Time each model alone in its own process, dense and pruned processes alternating (the default), "
        "or both in this process, run by run.")),
    processes: int = typer.Option(6, "--processes", help="With --isolate: rounds of processes per batch size."),
    debug: bool = DebugOpt,
) -> None:
    """Benchmark two ONNX files with ONNX Runtime and print the speedup (see `structadmm doctor` for the ORT build)."""
    from .bench import benchmark
    from .exporters import count_onnx

    report = benchmark({"dense": dense, "pruned": pruned}, batch_sizes=batch, threads=threads, min_seconds=min_seconds,
                       min_runs=min_runs, max_runs=max(10_000, min_runs), warmup=warmup, providers=provider,
                       optimization=opt_level, spinning=spinning, isolate=isolate, processes=processes)
    dense_cost, pruned_cost = count_onnx(dense), count_onnx(pruned)
    mac_ratio = dense_cost.macs / max(pruned_cost.macs, 1)
    byte_ratios = {b: dense_cost.bytes_at(b) / max(pruned_cost.bytes_at(b), 1) for b in batch}
    table = Table(title=f"{dense.name} vs {pruned.name}: {mac_ratio:.2f}x fewer MACs")
    for col in ("provider", "batch", "dense ms", "pruned ms", "speedup", "MAC eff", "per round (interval, coverage)",
                "byte ratio", "roofline eff"):
        table.add_column(col, justify="right")
    for row in report.to_rows(dense="dense", pruned="pruned", mac_ratio=mac_ratio, byte_ratios=byte_ratios):
        table.add_row(str(row["provider"]).replace("ExecutionProvider", ""), str(row["batch"]),
                      f"{row['dense_ms']:.3f}", f"{row['pruned_ms']:.3f}", f"{row['speedup']:.2f}x",
                      f"{row['efficiency']:.2f}",
                      f"{row['speedup_per_round']:.2f}x ({row['speedup_low']:.2f}-{row['speedup_high']:.2f}, "
                      + (f"{100 * row['ci_coverage']:.1f} %)" if row.get("ci_coverage") is not None else "coverage n/a)"),
                      f"{row['byte_ratio']:.2f}x", f"{row['roofline_efficiency']:.2f}")
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
    from .prune import PruningPlan

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
def doctor() -> None:
    """Which ONNX Runtime build is installed, its providers, torch's CUDA; exit 1 if two ORT builds clash."""
    from .bench.runtime import runtime_facts

    facts = runtime_facts()
    packages = ", ".join(f"{name} {version}" for name, version in facts.ort_packages.items())
    say = functools.partial(out.print, markup=False, highlight=False, soft_wrap=True)
    say(f"onnxruntime package: {packages or 'none installed (pip install structadmm[cpu] or [gpu])'}")
    say(f"onnxruntime module:  {facts.ort_module_version or 'cannot be imported'} (device {facts.ort_device or 'n/a'})")
    say(f"providers:           {', '.join(facts.providers) or 'none'}")
    say(f"torch:               {facts.torch_version or 'not installed'}, CUDA "
        f"{'available' if facts.torch_cuda else 'not available'}")
    if facts.conflict:
        err.print(f"[bold red]warning:[/] {facts.conflict}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    if not facts.ort_packages:
        raise typer.Exit(1)
    out.print("one onnxruntime build: ok")


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
