"""Decoder language models pruned at filter 0.5: MACs, parity and ONNX Runtime CPU latency.

    .venv/bin/python benchmarks/decoders.py                          # a Llama-style model and GPT-2
    .venv/bin/python benchmarks/decoders.py --models gpt2 --processes 6 --seconds 4

Each model is built from a transformers config of moderate size (random weights; nothing is
downloaded): ``llama`` is LlamaForCausalLM with hidden 512, 8 heads over 4 key/value heads
(grouped-query attention), MLP 1376, 4 layers; ``gpt2`` is GPT2LMHeadModel with hidden 512,
8 heads, MLP 2048, 4 layers; both with a vocabulary of 2048. It is pruned with README's library
flow (uniform filter plan at 0.5: half the heads of every attention, a key/value head with its
query group, and half the MLP neurons; the residual stream stays whole; one-shot projection, since
the speed of a structure does not depend on how its weights were chosen), compacted (checked
against the masked model), exported and checked in ONNX Runtime, then timed against its dense
export with the project's harness: isolated, each model alone in its own process, dense and
pruned processes alternating over ``--processes`` rounds, ORT CPU, 2 threads, one sequence of
128 tokens (batch 1), the key/value cache off (one full forward pass, the prompt's). The timed
model starts at the token embeddings (``inputs_embeds``; the harness feeds float inputs) and ends
at the logits. Reported: medians, the median of the per-round speedups with its distribution-free
interval and the coverage that interval reaches, and the MAC ratio (counted on the torch models). One model
per process of this script.

Writes benchmarks/results/decoders.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SEQUENCE = 128


def build(name: str):
    import transformers

    if name == "llama":
        config = transformers.LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1376,
                                          num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                                          max_position_embeddings=SEQUENCE)
        return transformers.LlamaForCausalLM(config).eval()
    if name == "gpt2":
        config = transformers.GPT2Config(vocab_size=2048, n_embd=512, n_layer=4, n_head=8, n_positions=SEQUENCE)
        return transformers.GPT2LMHeadModel(config).eval()
    raise SystemExit(f"unknown model {name!r}: llama or gpt2")


def measure(name: str, args: argparse.Namespace) -> dict:
    import torch

    import structadmm as sa
    from structadmm.bench.latency import benchmark
    from structadmm.exporters import count_torch

    class FromEmbeddings(torch.nn.Module):
        """The decoder from its token embeddings to its logits (ONNX Runtime's harness feeds floats)."""

        def __init__(self, decoder: torch.nn.Module) -> None:
            super().__init__()
            self.decoder = decoder

        def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
            mask = torch.ones(embeddings.shape[:2], dtype=torch.long, device=embeddings.device)  # no padding
            return self.decoder(inputs_embeds=embeddings, attention_mask=mask).logits

    torch.manual_seed(0)
    decoder = build(name)
    model, x = FromEmbeddings(decoder).eval(), torch.randn(1, SEQUENCE, decoder.config.hidden_size)
    plan = sa.PruningPlan.uniform(model, x, sparsity="filter", ratio=0.5)
    plan.project(model)
    small = sa.compact(model, x)
    folder = Path(tempfile.mkdtemp())
    sa.export_onnx(model, x, folder / "dense.onnx", verify=False)
    parity = sa.export_onnx(small, x, folder / "pruned.onnx").max_abs_diff
    masked_parity = sa.verify_onnx(model, folder / "pruned.onnx", x)
    dense_macs, pruned_macs = count_torch(model, x).macs, count_torch(small, x).macs
    report = benchmark({"dense": folder / "dense.onnx", "pruned": folder / "pruned.onnx"}, batch_sizes=[1],
                       threads=args.threads, min_seconds=args.seconds, isolate=True, processes=args.processes)
    row = report.to_rows(dense="dense", pruned="pruned", mac_ratio=dense_macs / pruned_macs)[0]
    return {"model": name, "units": len(plan.units), "dense_macs": dense_macs, "pruned_macs": pruned_macs,
            "mac_ratio": dense_macs / pruned_macs, "parity_compacted": parity, "parity_masked": masked_parity, **row}


def render(rows: list[dict], meta: dict) -> str:
    from structadmm.bench.report import speedup_interval

    lines = [
        f"# Decoder LMs at filter 0.5, ONNX Runtime CPU, isolated timing, {SEQUENCE} tokens, batch 1",
        "",
        f"Timing: isolated (each model alone in its own process, dense and pruned alternating), "
        f"{meta['processes']} rounds of processes, {meta['threads']} threads, medians; one forward pass over "
        f"the sequence (cache off), from the token embeddings to the logits. Random weights. CPU: {meta['cpu']}; "
        f"load average when it started: {meta['load']}, when it ended: {meta['load_after']} (a shared, "
        f"noisy machine). Command: `{meta['command']}`.",
        "",
        "| model | MACs dense → pruned | MAC ratio | dense ms | pruned ms | speedup (median of rounds, interval, "
        "coverage) | efficiency | parity vs masked |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dense_macs'] / 1e9:.2f} G → {r['pruned_macs'] / 1e9:.2f} G | {r['mac_ratio']:.2f}x | "
            f"{r['dense_ms']:.1f} | {r['pruned_ms']:.1f} | {speedup_interval(r)} | {r['efficiency']:.2f} | "
            f"{r['parity_masked']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llama", "gpt2"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--processes", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child: measure this model, print its row as JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())
    rows = []
    for name in args.models:  # one model per process
        child = [sys.executable, __file__, "--one", name, "--threads", str(args.threads),
                 "--processes", str(args.processes), "--seconds", str(args.seconds)]
        done = subprocess.run(child, capture_output=True, text=True, check=True, timeout=3600)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1]["model"], f"{rows[-1]['mac_ratio']:.2f}x MACs", f"{rows[-1]['speedup_per_round']:.2f}x")
    from structadmm.cpu import cpu_name

    meta = {"threads": args.threads, "processes": args.processes, "cpu": cpu_name(), "machine": platform.machine(),
            "sequence": SEQUENCE, "batch": 1, "load": load, "load_after": " ".join(f"{v:.1f}" for v in os.getloadavg()),
            "command": " ".join(["python benchmarks/decoders.py", *sys.argv[1:]])}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decoders.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (RESULTS / "decoders.md").write_text(render(rows, meta))
    print(render(rows, meta))


if __name__ == "__main__":
    main()
