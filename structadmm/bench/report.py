"""The run folder's report: report.json, report.md, latency.png, and the console table.

This module owns how a finished run is presented. It takes the report dict whose keys SPEC §5
fixes (``model``, ``dense``/``pruned`` with ``accuracy``/``macs``/``params``/``onnx``,
``mac_ratio``, ``param_ratio``, ``parity``, ``latency`` rows from
:meth:`~structadmm.bench.latency.LatencyReport.to_rows`, ``config``, ``versions``) and renders
it; it computes nothing but display ratios that are missing from the dict. Missing optional
figures show as "n/a". All three files are rendered first and then each is written to a
temporary file and renamed, so a folder never holds a half-written report.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.table import Table

from ..files import write_atomic

__all__ = ["render_table", "speedup_interval", "write_report"]

NA = "n/a"
_COLORS = {"dense": "#8c8c8c", "pruned": "#1f77b4"}
_PLOT_COLUMNS = 4


def write_report(run_dir: str | Path, report: Mapping[str, Any]) -> None:
    """Write report.json (the dict as given), report.md, latency.png and accuracy.png into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "report.json": (json.dumps(_jsonable(report), indent=2) + "\n").encode(),
        "latency.png": _plot_png(report),
        "accuracy.png": _accuracy_png(report),
        "report.md": _markdown(report).encode(),
    }
    for name, data in files.items():
        write_atomic(run_dir / name, data)


def render_table(report: Mapping[str, Any]) -> Table:
    """A compact console table: dense vs pruned figures, then one row per latency measurement."""
    dense, pruned = _side(report, "dense"), _side(report, "pruned")
    table = Table(title=f"structadmm: {report.get('model', NA)}", caption=_parity_text(report))
    table.add_column("")
    for column in ("dense", "pruned", "ratio"):
        table.add_column(column, justify="right")
    table.add_row("accuracy", _percent(dense.get("accuracy")), _percent(pruned.get("accuracy")),
                  _accuracy_delta(dense, pruned))
    table.add_row("MACs", _si(dense.get("macs")), _si(pruned.get("macs")),
                  _ratio(_ratio_value(report, "mac_ratio", "macs")))
    table.add_row("params", _si(dense.get("params")), _si(pruned.get("params")),
                  _ratio(_ratio_value(report, "param_ratio", "params")))
    fidelity = _side(report, "fidelity")
    for output in fidelity.get("outputs") or []:
        table.add_row(f"{output.get('name')} vs dense", "", f"cos {_number3(output.get('cosine'))}",
                      f"rel err {_number3(output.get('rel_error'))}")
    if fidelity.get("top1_agreement") is not None:
        table.add_row("top-1 agreement", "", _percent(fidelity.get("top1_agreement")), "")
    if fidelity.get("box_map50") is not None or fidelity.get("dense_boxes") is not None:
        table.add_row("box mAP@0.5 vs dense", "", _number3(fidelity.get("box_map50")), _boxes_found(fidelity))
    quantized = _side(report, "quantized")
    if quantized:
        ort_acc = _side(quantized, "ort_accuracy")
        gate = _side(quantized, "gate")
        table.add_row("INT8 accuracy (ORT)", _percent(ort_acc.get("dense INT8")), _percent(ort_acc.get("pruned INT8")),
                      "gate ok" if gate.get("ok") else "gate FAILED")
    rows = report.get("latency") or []
    if rows:
        table.add_section()
    variants = {(r.get("provider"), r.get("batch"), r.get("variant")): r for r in report.get("latency_variants") or []}
    for row in rows:
        table.add_row(
            f"{_short(row.get('provider'))} batch {row.get('batch', NA)} ms",
            f"{_ms(row.get('dense_ms'))} (p90 {_ms(row.get('dense_p90_ms'))})",
            f"{_ms(row.get('pruned_ms'))} (p90 {_ms(row.get('pruned_p90_ms'))})",
            f"{_ratio(row.get('speedup'))} (eff {_number(row.get('efficiency'))}"
            + (f", roofline {_number(row['roofline_efficiency'])})" if "roofline_efficiency" in row else ")"),
        )
        dense_int8 = variants.get((row.get("provider"), row.get("batch"), "dense INT8"))
        pruned_int8 = variants.get((row.get("provider"), row.get("batch"), "pruned INT8"))
        if dense_int8 and pruned_int8:
            table.add_row(f"{_short(row.get('provider'))} batch {row.get('batch', NA)} INT8 ms",
                          _ms(dense_int8.get("median_ms")), _ms(pruned_int8.get("median_ms")),
                          f"{_ratio(pruned_int8.get('speedup'))} vs dense FP32")
    return table


# --- markdown -----------------------------------------------------------------------------


def _markdown(report: Mapping[str, Any]) -> str:
    dense, pruned = _side(report, "dense"), _side(report, "pruned")
    lines = [
        f"# structadmm report: {report.get('model', NA)}",
        "",
        "| | dense | pruned | ratio |",
        "|---|---:|---:|---:|",
        f"| accuracy | {_percent(dense.get('accuracy'))} | {_percent(pruned.get('accuracy'))} "
        f"| {_accuracy_delta(dense, pruned)} |",
        f"| MACs / sample | {_count(dense.get('macs'))} | {_count(pruned.get('macs'))} "
        f"| {_ratio(_ratio_value(report, 'mac_ratio', 'macs'))} |",
        f"| params | {_count(dense.get('params'))} | {_count(pruned.get('params'))} "
        f"| {_ratio(_ratio_value(report, 'param_ratio', 'params'))} |",
        f"| ONNX file | {dense.get('onnx', NA)} | {pruned.get('onnx', NA)} | |",
        "",
        f"{_parity_text(report)}.",
        "",
        *_method_line(report),
        *_fidelity_section(report),
        *_shortfall_section(report),
        *_stages_section(report),
        f"## Latency (ONNX Runtime, dense and pruned {_mode_text(report.get('latency') or [])})",
        "",
        *_latency_table(report.get("latency") or []),
        "",
        "Speedup = dense median / pruned median. MAC efficiency = speedup / MAC ratio "
        "(1.0: the pruned model is faster by exactly the factor of work removed). Per round = the median "
        "of the round-by-round ratios, with a distribution-free interval and its coverage: the exact "
        "probability that such an interval holds the true median, set by the number of rounds alone "
        "(95 % needs 6 or more; [min, max] of 3 rounds covers it 75 % of the time). Threads = the CPU "
        "pool's intra-op threads (n/a on GPU providers). Byte ratio = dense / pruned bytes "
        "moved (activations and weights read and written by every node, unfused: the roofline's memory "
        "side). Roofline efficiency = speedup / min(MAC ratio, byte ratio): a memory-bound net, whose "
        "bytes fall less than its MACs, is judged against the bytes it still moves (1.0: as fast as "
        "that bound allows).",
        "",
        "![latency](latency.png)",
        "",
        *_int8_section(report),
        "## Accuracy against MACs",
        "",
        "![accuracy](accuracy.png)",
        "",
        *_layer_table(report.get("layers") or []),
    ]
    return "\n".join(lines)


def _boxes_found(fidelity: Mapping[str, Any]) -> str:
    """How many boxes each model found, where recorded: "dense 12 boxes, pruned 11"."""
    if fidelity.get("dense_boxes") is None:
        return ""
    return f"dense {fidelity['dense_boxes']} boxes, pruned {fidelity.get('pruned_boxes', NA)}"


def _method_line(report: Mapping[str, Any]) -> list[str]:
    """How the masks were found (``prune_method``, absent from reports written before it was recorded)."""
    method = report.get("prune_method")
    if method == "oneshot":
        line = "Masks: one-shot magnitude pruning of the dense weights, then masked retraining (`prune_method`)."
    elif method == "admm":
        line = "Masks: ADMM, then the hard prune and masked retraining (`prune_method`)."
    else:
        return []
    done = report.get("reconstruction")
    if done:
        line += (f" After the prune, {done['layers']} layers were refitted to the dense model's layer outputs on "
                 f"{done['samples']} training inputs (`reconstruct`): median relative layer error "
                 f"{_number3(done.get('error_before'))} before, {_number3(done.get('error_after'))} after.")
    return [line, ""]


def _fidelity_section(report: Mapping[str, Any]) -> list[str]:
    """pruned.onnx against dense.onnx on held-out inputs: what the report gives in place of accuracy
    when training distilled from the dense model (and alongside it otherwise)."""
    fidelity, objective = _side(report, "fidelity"), _side(report, "objective")
    if not fidelity:
        return []
    lines = [f"## Fidelity to the dense model ({fidelity.get('samples', NA)} held-out inputs, both files in "
             "ONNX Runtime)", "",
             f"Trained on: {'the labels' if objective.get('mode') == 'labels' else 'the dense model as teacher'}.", "",
             "| output | relative error | cosine similarity |", "|---|---:|---:|"]
    lines += [f"| {o.get('name')} | {_number3(o.get('rel_error'))} | {_number3(o.get('cosine'))} |"
              for o in fidelity.get("outputs") or []]
    lines.append("")
    if fidelity.get("top1_agreement") is not None:
        lines += [f"Top-1 agreement with the dense model: {_percent(fidelity['top1_agreement'])}.", ""]
    if fidelity.get("box_map50") is not None:
        lines += [f"Box mAP@0.5 against the dense model's boxes (after NMS): {_number3(fidelity['box_map50'])} "
                  f"({_boxes_found(fidelity)}).", ""]
    elif fidelity.get("dense_boxes") == 0:
        lines += [f"Box mAP@0.5 against the dense model's boxes: n/a, the dense model finds no box on these inputs "
                  f"({_boxes_found(fidelity)}).", ""]
    lines += ["Relative error = ‖pruned − dense‖ / ‖dense‖ and cosine similarity, each per sample (its values "
              "flattened), averaged over the samples.", ""]
    return lines


def _shortfall_section(report: Mapping[str, Any]) -> list[str]:
    """The requested ratio against what the plan keeps, per group with the plan's reasons (only when short)."""
    short = _side(report, "ratio_shortfall")
    if not short:
        return []
    channels, macs = _side(short, "channels"), _side(short, "macs")
    lines = [
        "## Requested ratio not reached",
        "",
        f"{short.get('message', NA)}.",
        "",
        "| | asked | reached |",
        "|---|---:|---:|",
        f"| channels removed | {_number3(channels.get('requested_removed'))} | {_number3(channels.get('removed'))} |",
        f"| channels kept | {_number(channels.get('requested_kept'))} of {channels.get('total', NA)} "
        f"| {channels.get('kept', NA)} of {channels.get('total', NA)} |",
        f"| MACs / sample | {_si(macs.get('requested'))} ({_ratio(macs.get('requested_reduction'))} fewer) "
        f"| {_si(macs.get('reached'))} ({_ratio(macs.get('reduction'))} fewer) |",
        "",
        "| group | channels | ratio asked | kept asked | kept | ratio reached | why more are kept |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for g in short.get("groups") or []:
        lines.append(f"| {g.get('group')} | {g.get('channels')} | {_number3(g.get('requested_ratio'))} "
                     f"| {_number(g.get('requested_kept'))} | {g.get('kept')} | {_number3(g.get('ratio'))} "
                     f"| {'; '.join(g.get('reasons') or []) or '-'} |")
    lines += ["", "MACs here are the plan's own count (before surgery); the table above is the exported models'.", ""]
    return lines


def _stages_section(report: Mapping[str, Any]) -> list[str]:
    """Progressive ADMM stages (``admm_stages``): each earlier stage's ratio, residual and accuracies."""
    stages = report.get("admm_stages") or []
    if not stages:
        return []
    lines = ["## ADMM stages", "",
             "| stage | ratio | rounds | final primal residual | hard-pruned accuracy | after short retrain |",
             "|---:|---:|---:|---:|---:|---:|"]
    for st in stages:
        outcome = _side(st, "admm_outcome")
        lines.append(f"| {st.get('stage')} | {_number3(st.get('ratio'))} | {outcome.get('rounds', NA)} "
                     f"| {_number3(outcome.get('primal_residual'))} | {_percent(st.get('hard_pruned_accuracy'))} "
                     f"| {_percent(st.get('retrained_accuracy'))} |")
    ratio = _side(report, "config").get("ratio")
    lines += ["", f"Then ADMM at the final ratio {ratio if ratio is not None else NA} within the last stage's masks "
              "(see `admm` and `admm_outcome` in report.json).", ""]
    return lines


_VARIANTS = ("dense FP32", "pruned FP32", "pruned INT8", "dense INT8")


def _int8_section(report: Mapping[str, Any]) -> list[str]:
    """The four variants side by side (``--quantize int8``): accuracy in ONNX Runtime, size, latency."""
    quantized = _side(report, "quantized")
    if not quantized:
        return []
    dense, pruned, sizes = _side(report, "dense"), _side(report, "pruned"), _side(report, "file_sizes")
    dense_int8 = _side(quantized, "dense_int8")
    accuracy = _side(quantized, "ort_accuracy")
    shipped = quantized.get("shipped", True)
    pruned_int8 = "pruned INT8" if shipped else "rejected INT8"  # a rejected file is not shipped, nor timed
    columns = tuple(pruned_int8 if v == "pruned INT8" else v for v in _VARIANTS)
    files = {"dense FP32": dense.get("onnx"), "pruned FP32": pruned.get("onnx"),
             pruned_int8: quantized.get("onnx"), "dense INT8": dense_int8.get("onnx")}
    macs = {"dense FP32": dense.get("macs"), "pruned FP32": pruned.get("macs"), pruned_int8: quantized.get("macs"),
            "dense INT8": dense.get("macs")}
    lines = [
        "## INT8 (ONNX Runtime quantization)",
        "",
        "| | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
        "| accuracy (ONNX Runtime) | " + " | ".join(_percent(accuracy.get(v)) for v in columns) + " |",
        "| MACs / sample | " + " | ".join(_si(macs[v]) for v in columns) + " |",
        "| file | " + " | ".join(f"{files[v] or NA} ({_bytes(sizes.get(files[v]))})" for v in columns) + " |",
    ]
    variants = report.get("latency_variants") or []
    for provider, batch in dict.fromkeys((r.get("provider"), r.get("batch")) for r in variants):
        by = {r.get("variant"): r for r in variants if (r.get("provider"), r.get("batch")) == (provider, batch)}
        lines.append(f"| {_short(provider)} batch {batch}: median ms (speedup) | " + " | ".join(
            f"{_ms(by.get(v, {}).get('median_ms'))} ({_ratio(by.get(v, {}).get('speedup'))})" for v in columns) + " |")
        if any(r.get("speedup_per_round") is not None for r in by.values()):  # older reports did not record it
            lines.append(f"| {_short(provider)} batch {batch}: speedup per round (interval, coverage) | " + " | ".join(
                speedup_interval(by[v]) if v in by else NA for v in columns) + " |")
    gate = _side(quantized, "gate")
    gate_data = _side(quantized, "gate_data")
    verdict = "ok" if gate.get("ok") else "FAILED: " + "; ".join(gate.get("reasons") or [])
    drop = gate.get("accuracy_drop")
    lines += [
        "",
        ("All four timed in the same run; speedup is over dense FP32." if shipped else
         "The pruned INT8 file failed its gate: it is not shipped and was not timed; speedup is over dense FP32."),
        "",
        f"INT8 gate: top-1 agreement with {gate.get('agreement_with', 'FP32')} {_percent(gate.get('agreement'))} "
        f"(min {_percent(gate.get('min_agreement'))}), accuracy drop from {gate.get('accuracy_drop_from', 'FP32')} "
        f"{f'{drop * 100:.2f} pt' if isinstance(drop, (int, float)) else NA} "
        f"(max {_number((gate.get('max_accuracy_drop') or 0) * 100)} pt): {verdict}."
        + (f" Scored on {gate_data.get('samples', NA)} {gate_data.get('split', NA)} samples"
           + (f" (a {_percent(gate_data.get('holdout'))} share of the training data that calibration and QAT "
              "never read)" if gate_data.get("split") not in (None, "validation") else "") + "."
           if gate_data else ""),
        "",
        *[f"Pruned INT8 is slower than pruned FP32 on {_short(s.get('provider'))} at batch {s.get('batch')} "
          f"({_number(s.get('time_ratio'))}x the time): pruned.onnx is the faster file there.\n"
          for s in quantized.get("slower_than_fp32") or []],
        f"Quantization: {quantized.get('mode', NA)}, calibration {quantized.get('calibration_method') or 'none'} on "
        f"{quantized.get('calibration_samples', NA)} training samples, per-channel weights "
        f"{'on' if quantized.get('per_channel') else 'off'}, {quantized.get('quantized_nodes', NA)} matrix layers in "
        f"INT8, left in FP32: {', '.join(quantized.get('excluded') or []) or 'none'}."
        + (f" Weights: {quantized['reduce_range_reason']}." if quantized.get("reduce_range_reason") else ""),
        "",
    ]
    sensitivity = quantized.get("sensitivity") or []
    if sensitivity:
        lines += ["### Per-layer sensitivity (each layer quantized alone, most sensitive first)", "",
                  "| layer | op | output SQNR dB | top-1 agreement with FP32 |", "|---|---|---:|---:|"]
        lines += [f"| {r.get('node')} | {r.get('op_type')} | {_number(r.get('sqnr_db'))} | {_percent(r.get('agreement'))} |"
                  for r in sensitivity]
        lines += ["", "Layers to leave in FP32 go in the config's `quantize_exclude`.", ""]
    return lines


def _layer_table(rows: list[Mapping[str, Any]]) -> list[str]:
    """Per matrix layer: kept channels, MACs and measured time (ORT profiler)."""
    if not rows:
        return []
    lines = [
        "## Per layer (ONNX Runtime profile, CPU)",
        "",
        "| layer | op | channels | MACs dense | MACs pruned | ms dense | ms pruned |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        kept = f"{row.get('dense_channels', NA)} → {row.get('pruned_channels') if row.get('pruned_channels') is not None else NA}"
        lines.append(f"| {row.get('name', NA)} | {row.get('op_type', NA)} | {kept} | {_si(row.get('dense_macs'))} "
                     f"| {_si(row.get('pruned_macs'))} | {_ms(row.get('dense_ms'))} | {_ms(row.get('pruned_ms'))} |")
    lines.append("")
    return lines


_MODES = {"isolated": "isolated: each alone in its own process, processes alternating",
          "in-process": "in-process: interleaved run by run in one process"}


def _mode_text(rows: list[Mapping[str, Any]]) -> str:
    """How the rows were timed, from their ``mode``: one phrase, or each mode with its rows' providers."""
    modes = list(dict.fromkeys(row.get("mode") for row in rows))
    if not modes:
        return "not timed"
    if len(modes) == 1:
        return "timed " + _MODES.get(modes[0], f"in an unrecorded mode ({modes[0] or NA})")
    parts = []
    for mode in modes:
        where = dict.fromkeys(f"{_short(r.get('provider'))} batch {r.get('batch', NA)}" for r in rows
                              if r.get("mode") == mode)
        parts.append(f"{_MODES.get(mode, mode or NA)} ({', '.join(where)})")
    return "timed in several modes: " + "; ".join(parts)


def speedup_interval(row: Mapping[str, Any]) -> str:
    """A latency row's median per-round speedup with its interval and that interval's coverage:
    ``1.96x (1.75–2.14, 96.9 %)`` (what every result file quotes)."""
    if row.get("speedup_per_round") is None:
        return NA
    return (f"{_ratio(row.get('speedup_per_round'))} ({_number(row.get('speedup_low'))}–"
            f"{_number(row.get('speedup_high'))}, {_coverage(row.get('ci_coverage'))})")


def _coverage(value: Any) -> str:
    """An interval's coverage: "96.9 %"; n/a where none was recorded (never the level it was asked for)."""
    return f"{value * 100:.1f} %" if isinstance(value, (int, float)) else f"coverage {NA}"


def _latency_table(rows: list[Mapping[str, Any]]) -> list[str]:
    if not rows:
        return ["No latency was measured."]
    lines = [
        "| provider | batch | threads | dense median ms | dense p90 ms | pruned median ms "
        "| pruned p90 ms | speedup | MAC efficiency | per round (interval, coverage) | byte ratio "
        "| roofline efficiency |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [
            _short(row.get("provider")),
            str(row.get("batch", NA)),
            str(row["threads"]) if isinstance(row.get("threads"), int) else NA,  # none on GPU rows
            _ms(row.get("dense_ms")),
            _ms(row.get("dense_p90_ms")),
            _ms(row.get("pruned_ms")),
            _ms(row.get("pruned_p90_ms")),
            _ratio(row.get("speedup")),
            _number(row.get("efficiency")),
            speedup_interval(row),
            _ratio(row.get("byte_ratio")),
            _number(row.get("roofline_efficiency")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# --- plot ---------------------------------------------------------------------------------


def _plot_png(report: Mapping[str, Any]) -> bytes:
    # Figure without pyplot: no global backend or figure registry is touched, and it renders
    # with Agg whatever backend the host application chose.
    from matplotlib.figure import Figure

    rows = report.get("latency") or []
    columns = max(1, min(len(rows), _PLOT_COLUMNS))
    grid_rows = max(1, math.ceil(len(rows) / columns))
    figure = Figure(figsize=(3.2 * columns + 0.6, 3.4 * grid_rows + 0.8), layout="constrained")
    axes = figure.subplots(grid_rows, columns, squeeze=False).ravel()
    variants = report.get("latency_variants") or []
    for ax, row in zip(axes, rows):
        same = [v for v in variants if (v.get("provider"), v.get("batch")) == (row.get("provider"), row.get("batch"))]
        if same:
            _plot_variants(ax, row, same)
        else:
            _plot_row(ax, row)
    for ax in axes[len(rows):]:
        ax.set_axis_off()
    if not rows:
        axes[0].text(0.5, 0.5, "no latency measured", ha="center", va="center")
    figure.suptitle(f"{report.get('model', '')}: {_macs_caption(report)}")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _accuracy_png(report: Mapping[str, Any]) -> bytes:
    """Accuracy against MACs per sample: dense, right after the hard prune, after retraining."""
    from matplotlib.figure import Figure

    dense, pruned = _side(report, "dense"), _side(report, "pruned")
    points = [("dense", dense.get("macs"), dense.get("accuracy"), _COLORS["dense"]),
              ("hard pruned", pruned.get("macs"), pruned.get("hard_pruned_accuracy"), "#ff7f0e"),
              ("pruned + retrained", pruned.get("macs"), pruned.get("accuracy"), _COLORS["pruned"])]
    figure = Figure(figsize=(5.2, 3.6), layout="constrained")
    ax = figure.subplots()
    shown = [(label, macs, acc, color) for label, macs, acc, color in points
             if isinstance(macs, (int, float)) and isinstance(acc, (int, float))]
    for label, macs, acc, color in shown:
        ax.scatter([macs], [100 * acc], color=color, label=label, s=50, zorder=3)
    if shown:
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no labelled data: accuracy not measured", ha="center", va="center")
    ax.set_xlabel("MACs / sample")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.set_title(f"{report.get('model', '')}: accuracy against MACs", fontsize=10)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _plot_row(ax: Any, row: Mapping[str, Any]) -> None:
    values = [row.get("dense_ms"), row.get("pruned_ms")]
    heights = [v if isinstance(v, (int, float)) else 0.0 for v in values]
    bars = ax.bar(["dense", "pruned"], heights, color=[_COLORS["dense"], _COLORS["pruned"]])
    ax.bar_label(bars, labels=[f"{_ms(v)} ms" for v in values], padding=2, fontsize=8)
    ax.set_title(f"{_short(row.get('provider'))}, batch {row.get('batch', NA)}", fontsize=10)
    ax.set_ylabel("median latency (ms)")
    ax.set_ylim(0, max(heights + [1e-9]) * 1.4)
    label = f"speedup {_ratio(row.get('speedup'))}"
    if isinstance(row.get("efficiency"), (int, float)):
        label += f"\nefficiency {_number(row['efficiency'])}"
    ax.text(0.5, 0.95, label, transform=ax.transAxes, ha="center", va="top", fontsize=9,
            fontweight="bold")


def _plot_variants(ax: Any, row: Mapping[str, Any], variants: list[Mapping[str, Any]]) -> None:
    """dense FP32, pruned FP32, pruned INT8, dense INT8 side by side."""
    colors = {"dense FP32": _COLORS["dense"], "pruned FP32": _COLORS["pruned"], "pruned INT8": "#2ca02c",
              "dense INT8": "#bcbd22"}
    values = [v.get("median_ms") for v in variants]
    heights = [v if isinstance(v, (int, float)) else 0.0 for v in values]
    labels = [str(v.get("variant")) for v in variants]
    bars = ax.bar([label.replace(" ", "\n") for label in labels], heights, color=[colors.get(l, "#777") for l in labels])
    ax.bar_label(bars, labels=[f"{_ms(v)}\n{_ratio(r.get('speedup'))}" for v, r in zip(values, variants)],
                 padding=2, fontsize=7)
    ax.set_title(f"{_short(row.get('provider'))}, batch {row.get('batch', NA)}", fontsize=10)
    ax.set_ylabel("median latency (ms)")
    ax.set_ylim(0, max(heights + [1e-9]) * 1.5)
    ax.tick_params(axis="x", labelsize=7)


def _macs_caption(report: Mapping[str, Any]) -> str:
    dense, pruned = _side(report, "dense"), _side(report, "pruned")
    ratio = _ratio(_ratio_value(report, "mac_ratio", "macs"))
    return f"MACs/sample {_si(dense.get('macs'))} → {_si(pruned.get('macs'))} ({ratio} fewer)"


# --- values and formatting ----------------------------------------------------------------


def _side(report: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = report.get(key)
    return value if isinstance(value, Mapping) else {}


def _ratio_value(report: Mapping[str, Any], key: str, field: str) -> float | None:
    """The ratio from the report, else dense/pruned computed from the counts when present."""
    if isinstance(report.get(key), (int, float)):
        return float(report[key])
    dense, pruned = _side(report, "dense").get(field), _side(report, "pruned").get(field)
    if isinstance(dense, (int, float)) and isinstance(pruned, (int, float)) and pruned:
        return dense / pruned
    return None


def _parity_text(report: Mapping[str, Any]) -> str:
    parity = _side(report, "parity")
    if not parity:
        return "Parity: not checked"
    verdict = {True: "ok", False: "FAILED"}.get(parity.get("ok"), NA)
    diff = parity.get("max_abs_diff")
    shown = f"{diff:.2g}" if isinstance(diff, (int, float)) else NA
    return f"Parity (ONNX Runtime vs torch): max abs diff {shown}, {verdict}"


def _accuracy_delta(dense: Mapping[str, Any], pruned: Mapping[str, Any]) -> str:
    a, b = dense.get("accuracy"), pruned.get("accuracy")
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return NA
    return f"{(b - a) * 100:+.2f} pp"


def _percent(value: Any) -> str:
    return f"{value * 100:.2f} %" if isinstance(value, (int, float)) else NA


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, (int, float)) else NA


def _si(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return NA
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:g}"


def _ratio(value: Any) -> str:
    return f"{value:.2f}x" if isinstance(value, (int, float)) else NA


def _number(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) else NA


def _number3(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else NA


def _bytes(value: Any) -> str:
    return f"{_si(value)}B" if isinstance(value, (int, float)) else NA


def _ms(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return NA
    return f"{value:.3f}" if value < 100 else f"{value:.1f}"


def _short(provider: Any) -> str:
    return str(provider).removesuffix("ExecutionProvider") if provider else NA


# --- files --------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Plain JSON types: numpy scalars become numbers, paths strings, and NaN/inf null (JSON has
    no NaN, and deployment CI parses this file strictly)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
