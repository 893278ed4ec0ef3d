#!/usr/bin/env bash
# The GPU check, ready for the first machine that has a GPU: the whole pipeline on CUDA, then dense,
# pruned and INT8 files timed with ONNX Runtime's CUDA and TensorRT execution providers.
#
#   benchmarks/gpu_check.sh [OUT]          # OUT: default benchmarks/results/gpu/<UTC time>
#
# Needs an NVIDIA GPU, a CUDA build of torch and onnxruntime-gpu (`make ORT=gpu`); TensorRT is timed
# where onnxruntime-gpu can load it and reported as skipped (with the reason) where it cannot.
# Without a usable GPU, CUDA torch or CUDA provider it stops at once, before writing anything, with
# one line on stderr and exit status 2.
#
# Settings (environment):
#   PYTHON        the interpreter with structadmm installed (default .venv/bin/python, else python3)
#   MODELS        what the latency step times (default "run resnet18"): "run" is the pipeline's own four
#                 files; a zoo name (resnet18, vgg16, mobilenetv2, ...) is built with random weights, pruned
#                 (filter 0.5, multiples of 16), exported and quantized (static QDQ) as benchmarks/int8.py does
#   BATCHES       batch sizes (default "1 64")
#   PROCESSES     rounds of isolated processes (default 6: the fewest whose interval covers the median 95 %)
#   STEP_TIMEOUT  seconds each step may take before it is stopped (default 2400)
#   NVIDIA_SMI    the nvidia-smi to ask (default nvidia-smi)
#
# Writes into OUT:
#   environment.txt             nvidia-smi -L and nvidia-smi, the interpreter, `structadmm doctor`
#   run/                        `structadmm run --device cuda --quantize int8` (train on the GPU, prune, export,
#                               INT8, and its own benchmark: CPU, CUDA and TensorRT rows in report.json/report.md)
#   gpu_latency.json, .md       every file of MODELS on CUDA and TensorRT, isolated (one model per process),
#                               median, p90, speedup over dense FP32, per-round interval and its coverage;
#                               TensorRT engines built before timing and cached beside the files
#                               (run/trt_engines, <model>/trt_engines), QDQ files with TensorRT's INT8 and FP16 flags
#   steps.log, <step>.out       what ran, when, and each step's output
#
# Expected time on one H100 with the defaults: some 20-30 minutes, most of it TensorRT engine builds and
# isolated processes (each loads CUDA). A short smoke test: MODELS=run PROCESSES=2 BATCHES=1 (its intervals
# then state their 50 % coverage).
set -euo pipefail

fail() {
    printf 'gpu_check: %s\n' "$*" >&2
    exit 2
}

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-.venv/bin/python}
if [[ ! -x $PYTHON ]]; then
    PYTHON=$(command -v python3 || true)
fi
[[ -n $PYTHON ]] || fail "no Python found; set PYTHON to the interpreter that has structadmm installed"
NVIDIA_SMI=${NVIDIA_SMI:-nvidia-smi}
MODELS=${MODELS:-run resnet18}
BATCHES=${BATCHES:-1 64}
PROCESSES=${PROCESSES:-6}
STEP_TIMEOUT=${STEP_TIMEOUT:-2400}
OUT=${1:-benchmarks/results/gpu/$(date -u +%Y%m%dT%H%M%SZ)}

# --- fail fast: a GPU, then onnxruntime's CUDA provider and torch's CUDA, before anything is written ---
command -v "$NVIDIA_SMI" >/dev/null 2>&1 || fail "no NVIDIA GPU here ($NVIDIA_SMI not found); run this on a CUDA machine"
gpus=$("$NVIDIA_SMI" -L 2>/dev/null) || fail "$NVIDIA_SMI finds no usable GPU (is the driver loaded?)"
[[ $gpus == *GPU* ]] || fail "$NVIDIA_SMI lists no GPU"
if ! why=$("$PYTHON" - 2>&1 <<'PY'
import sys

try:
    import onnxruntime as ort
except ImportError as exc:
    sys.exit(f"onnxruntime cannot be imported ({exc}); install onnxruntime-gpu (make ORT=gpu)")
if "CUDAExecutionProvider" not in ort.get_available_providers():
    sys.exit(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (the CPU build?); "
             "fix: pip uninstall -y onnxruntime && pip install onnxruntime-gpu")
try:
    import torch
except ImportError as exc:
    sys.exit(f"torch cannot be imported ({exc})")
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device (a CPU-only build?); --device cuda needs a CUDA build")
import structadmm  # noqa: F401  (the package this check runs)
PY
); then
    fail "$(printf '%s\n' "$why" | grep -v '^[[:space:]]*$' | tail -n 1)"
fi
STRUCTADMM=$(dirname "$PYTHON")/structadmm
if [[ ! -x $STRUCTADMM ]]; then
    STRUCTADMM=$(command -v structadmm || true)
fi
[[ -n $STRUCTADMM ]] || fail "no structadmm command beside $PYTHON or on PATH (pip install -e .)"

# --- the run ---------------------------------------------------------------------------------------
mkdir -p "$OUT"
log() {
    printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$OUT/steps.log" >&2
}
step() {  # step NAME COMMAND...: the command's output in OUT/NAME.out, stopped after STEP_TIMEOUT seconds
    local name=$1
    shift
    log "start $name: $*"
    if ! timeout "$STEP_TIMEOUT" "$@" >"$OUT/$name.out" 2>&1; then
        tail -n 15 "$OUT/$name.out" >&2
        fail "step $name failed or ran past $STEP_TIMEOUT s; its output: $OUT/$name.out"
    fi
    log "done $name"
}

{
    printf '%s\n\n' "$gpus"
    "$NVIDIA_SMI"
    printf '\nPython: %s\n\n' "$PYTHON"
} >"$OUT/environment.txt"
step doctor "$STRUCTADMM" doctor
cat "$OUT/doctor.out" >>"$OUT/environment.txt"

step pipeline "$STRUCTADMM" run --device cuda --quantize int8 --out "$OUT/run"

step latency "$PYTHON" - "$OUT" "$MODELS" "$BATCHES" "$PROCESSES" <<'PY'
"""Dense FP32, pruned FP32, pruned INT8 and dense INT8 on CUDA and TensorRT, isolated; gpu_latency.json and .md."""
import json
import sys
from dataclasses import asdict
from pathlib import Path

import onnxruntime
import torch

from structadmm import PruningPlan, benchmark, compact, count_onnx, export_onnx, quantize_onnx
from structadmm.models import get_spec

out, models, batches, processes = Path(sys.argv[1]), sys.argv[2].split(), [int(b) for b in sys.argv[3].split()], int(sys.argv[4])
PROVIDERS = ["CUDAExecutionProvider", "TensorrtExecutionProvider"]


def run_files(run: Path) -> dict[str, Path]:
    """The pipeline's files; a pruned INT8 file that failed its gate is timed under a name that says so."""
    files = {"dense FP32": run / "dense.onnx", "pruned FP32": run / "pruned.onnx"}
    for name, label in (("pruned-int8.onnx", "pruned INT8"), ("pruned-int8.rejected.onnx", "pruned INT8 (rejected)"),
                        ("dense-int8.onnx", "dense INT8")):
        if (run / name).exists():
            files[label] = run / name
    return files


def zoo_files(name: str, folder: Path) -> dict[str, Path]:
    """Random weights (latency does not depend on them), filter 0.5 with multiples of 16, static QDQ INT8."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = get_spec(name)
    torch.manual_seed(0)
    model = spec.build().eval()
    x = spec.example_input(2)
    files = {"dense FP32": folder / "dense.onnx", "pruned FP32": folder / "pruned.onnx",
             "pruned INT8": folder / "pruned-int8.onnx", "dense INT8": folder / "dense-int8.onnx"}
    export_onnx(model, x, files["dense FP32"])
    PruningPlan.uniform(model, x, "filter", 0.5, multiple=16).project(model)
    export_onnx(compact(model, x), x, files["pruned FP32"])
    calibration = torch.randn(8, *x.shape[1:], generator=torch.Generator().manual_seed(1))
    for fp32, int8 in (("dense FP32", "dense INT8"), ("pruned FP32", "pruned INT8")):
        quantize_onnx(files[fp32], files[int8], calibration, mode="static", batches=2, batch_size=4)
    return files


def per_round(e: dict) -> str:
    return f"{e['round_speedup']:.2f}x ({e['round_speedup_low']:.2f}–{e['round_speedup_high']:.2f}, {100 * e['ci_coverage']:.1f} %)"


results = {"command": "benchmarks/gpu_check.sh", "providers": PROVIDERS, "batches": batches, "processes": processes,
           "mode": "isolated", "onnxruntime": onnxruntime.__version__, "available": onnxruntime.get_available_providers(),
           "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "models": {}}
for name in models:
    files = run_files(out / "run") if name == "run" else zoo_files(name, out / name)
    report = benchmark(files, batch_sizes=batches, providers=PROVIDERS, processes=processes, baseline="dense FP32")
    macs = {label: count_onnx(path).macs for label, path in files.items()}
    results["models"][name] = {"files": {k: str(v) for k, v in files.items()}, "macs": macs,
                               "entries": [asdict(e) for e in report.entries],
                               "skipped": [{"provider": p, "reason": r} for p, r in report.skipped]}
    lines = [f"# ONNX Runtime GPU latency on {results['gpu']}: isolated, each model alone in its own process, "
             f"{processes} rounds of processes; medians", "",
             f"onnxruntime {results['onnxruntime']}, torch {results['torch']}. Speedup = dense FP32 median / this "
             "median; per round = median of the round-by-round ratios (interval, the probability it holds the true "
             "median). TensorRT: FP32 files as FP32 engines, QDQ files with INT8 and FP16 enabled; every engine built "
             "before timing and cached beside the files. No thread count: the rows are GPU rows.", ""]
    for model, part in results["models"].items():
        lines += [f"## {model}", "", "| provider | batch | file | MACs | median ms | p90 ms | speedup | per round |",
                  "|---|---:|---|---:|---:|---:|---:|---:|"]
        for e in part["entries"]:
            lines.append(f"| {e['provider'].removesuffix('ExecutionProvider')} | {e['batch']} | {e['name']} "
                         f"| {part['macs'][e['name']]:,} | {e['median_ms']:.3f} | {e['p90_ms']:.3f} | {e['speedup']:.2f}x "
                         f"| {per_round(e)} |")
        lines += [f"\nskipped {s['provider']}: {s['reason']}" for s in part["skipped"]] + [""]
    (out / "gpu_latency.json").write_text(json.dumps(results, indent=1) + "\n")  # after every model
    (out / "gpu_latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
PY

log "figures in $OUT: run/report.md (pipeline, CPU, CUDA and TensorRT rows), gpu_latency.md"
