"""ONNX Runtime latency measurement and the run folder's report (report.json, report.md, plot)."""

from structadmm.bench.latency import LatencyEntry, LatencyReport, benchmark
from structadmm.bench.report import render_table, write_report

__all__ = ["LatencyEntry", "LatencyReport", "benchmark", "render_table", "write_report"]
