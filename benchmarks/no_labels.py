"""Compressing models people deploy from unlabeled inputs alone, through the CLI: the dense model is
the teacher (``objective = "auto"`` distils when the data has no labels).

    .venv/bin/python benchmarks/no_labels.py                      # every case, one after another
    .venv/bin/python benchmarks/no_labels.py --cases cls det      # some of them

Cases, each one ``structadmm run`` in its own process (so each model is timed in a fresh
interpreter, isolated: every model alone in its own process, dense and pruned alternating):

* ``det``: RapidOCR's PP-OCRv4 text detector (a trained Paddle2ONNX file shipped in the
  ``rapidocr-onnxruntime`` wheel) at 3x640x640, on a flat folder of photographs (crops of the
  photographs that ship with scikit-image and scikit-learn, written as PNG files);
* ``yolo``: YOLOv8n built from Ultralytics' YAML and exported by Ultralytics' own ONNX exporter.
  No trained weights can be fetched here, so its random weights are first given realistic
  activations: BatchNorm statistics recalibrated on the photographs (forward passes only, no
  labels, no gradient). The report scores the pruned model's boxes against the dense model's
  (``--boxes yolo``: mAP@0.5 after NMS);
* ``cls``: RapidOCR's text-direction classifier (trained) on text lines rendered with PIL,
  upright or turned 180°. Compression sees the lines without labels; the labels only score the
  dense and the pruned file afterwards, both run in ONNX Runtime on held-out lines, and on a second set of
  validation lines on which a setting (the ratio) is chosen.

Every case prunes filters at ``--ratio`` with kept channels rounded to multiples of 8, distils for
a few epochs, and reports MACs, ONNX Runtime CPU latency at batch 1 (2 threads) and fidelity
(relative error and cosine per output against the dense file). Writes
benchmarks/results/no_labels.{json,md}; the run folders go to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import string
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
CLS_SHAPE = (3, 48, 192)


def rapidocr_file(name: str) -> Path:
    import rapidocr_onnxruntime

    return Path(rapidocr_onnxruntime.__file__).parent / "models" / name


def write_config(path: Path, args: argparse.Namespace, **extra: object) -> Path:
    settings = {**dict(ratio=args.ratio, channel_multiple=8, admm_rounds=args.rounds, admm_epochs=1,
                       retrain_epochs=args.retrain, batch_size=8, bench_batches=[1], bench_threads=2,
                       bench_min_seconds=args.seconds, admm_lr=args.lr, retrain_lr=args.lr,
                       reconstruct=args.reconstruct), **extra}
    lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def photo_folder(folder: Path, count: int, shape: tuple[int, int, int], *, text: bool = False) -> Path:
    """``count`` photograph crops of ``shape`` as PNG files, directly in ``folder`` (no classes); with
    ``text``, a few words printed on each at random places, sizes and colours (what a text detector
    is for: on photographs without text its output is near zero everywhere)."""
    from PIL import Image, ImageDraw, ImageFont

    from structadmm.models.photos import PhotoCrops, source_photos

    folder.mkdir(parents=True, exist_ok=True)
    crops = PhotoCrops(source_photos(), count, shape, seed=1)
    rng = np.random.default_rng(2)
    alphabet = list(string.ascii_letters + string.digits)
    for i in range(count):
        (x,) = crops[i]
        image = Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        if text:
            draw = ImageDraw.Draw(image)
            for _ in range(int(rng.integers(3, 9))):
                font = ImageFont.load_default(size=int(rng.integers(14, 48)))
                word = "".join(rng.choice(alphabet, int(rng.integers(3, 12))))
                place = (int(rng.integers(0, shape[2] - 40)), int(rng.integers(0, shape[1] - 20)))
                draw.text(place, word, fill=tuple(int(v) for v in rng.integers(0, 256, 3)), font=font)
        image.save(folder / f"{i:04d}.png")
    return folder


def text_lines(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` text lines rendered with PIL and preprocessed as PP-OCR's classifier expects (height
    48, width up to 192 with the aspect kept, zero padding, scaled to [-1, 1]); label 1 is a line
    turned 180°, label 0 an upright one."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    alphabet = string.ascii_letters + string.digits + "  .,-"
    xs, ys = [], []
    for i in range(count):
        size = int(rng.integers(22, 40))
        font = ImageFont.load_default(size=size)
        text = "".join(rng.choice(list(alphabet), int(rng.integers(4, 18)))).strip() or "text"
        left, top, right, bottom = font.getbbox(text)
        pad = int(rng.integers(2, 8))
        ink, paper = int(rng.integers(0, 80)), int(rng.integers(180, 256))
        image = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), (paper,) * 3)
        ImageDraw.Draw(image).text((pad - left, pad - top), text, fill=(ink,) * 3, font=font)
        label = i % 2
        if label:
            image = image.rotate(180)
        height, width = CLS_SHAPE[1], CLS_SHAPE[2]
        resized = min(width, max(1, round(image.width * height / image.height)))
        image = image.resize((resized, height), Image.BILINEAR)
        array = (np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255 - 0.5) / 0.5
        line = np.zeros(CLS_SHAPE, dtype=np.float32)
        line[:, :, :resized] = array
        xs.append(line)
        ys.append(label)
    return np.stack(xs), np.asarray(ys)


def onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    scores = np.concatenate([session.run(None, {name: x[i:i + 64]})[0] for i in range(0, len(x), 64)])
    return float((scores.argmax(1) == y).mean())


def yolo_onnx(folder: Path, photos: Path, size: int) -> Path:
    """YOLOv8n from its YAML, BatchNorm recalibrated on the photographs, exported by Ultralytics."""
    import torch
    from PIL import Image
    from torch import nn
    from ultralytics import YOLO

    os.environ["YOLO_OFFLINE"] = "1"
    torch.manual_seed(0)
    here = Path.cwd()
    os.chdir(folder)
    try:
        yolo = YOLO("yolov8n.yaml")
        net = yolo.model
        images = sorted(photos.glob("*.png"))[:64]
        x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).resize((size, size)), dtype=np.float32) / 255)
                         .permute(2, 0, 1) for p in images])
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # a cumulative average over the recalibration batches
        net.train()
        with torch.no_grad():
            for i in range(0, len(x), 8):
                net(x[i:i + 8])
        net.eval()
        written = yolo.export(format="onnx", imgsz=size, simplify=False, dynamic=True)
    finally:
        os.chdir(here)
    return Path(folder, written)


def run_cli(args: list[str], log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "structadmm.cli", *args], capture_output=True, text=True, env=env)
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"structadmm {' '.join(args)} failed:\n{(done.stdout + done.stderr)[-3000:]}")


def summary(run: Path) -> dict:
    report = json.loads((run / "report.json").read_text())
    row = report["latency"][0]
    return {"mac_ratio": report["mac_ratio"], "dense_macs": report["dense"]["macs"],
            "pruned_macs": report["pruned"]["macs"], "objective": report["objective"],
            "prune_method": report.get("prune_method", "admm"),
            "fidelity": report["fidelity"], "parity": report["parity"]["max_abs_diff"],
            "latency": {k: row.get(k) for k in ("batch", "threads", "mode", "dense_ms", "pruned_ms", "speedup",
                                                 "speedup_per_round", "speedup_low", "speedup_high", "ci_coverage",
                                                 "efficiency")},
            "timings_s": report["timings"]}


def case(name: str, args: argparse.Namespace, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    if name == "det":
        photos = photo_folder(work / "photos", args.photos, (3, 640, 640), text=True)
        config = write_config(work / "det.toml", args)
        run_cli(["run", "--model", str(rapidocr_file("ch_PP-OCRv4_det_infer.onnx")), "--input-shape", "3x640x640",
                 "--data", str(photos), "-c", str(config), "--out", str(work / "run")], work / "run.log")
        return {"case": "PP-OCRv4 text detector (trained, Paddle2ONNX)", "input": "3x640x640",
                "data": f"{args.photos} photographs with printed words, no labels", **summary(work / "run")}
    if name == "yolo":
        photos = photo_folder(work / "photos", args.photos, (3, 640, 640))
        model = yolo_onnx(work, photos, 640)
        config = write_config(work / "yolo.toml", args)
        run_cli(["run", "--model", str(model), "--input-shape", "3x640x640", "--data", str(photos), "--boxes", "yolo",
                 "-c", str(config), "--out", str(work / "run")], work / "run.log")
        return {"case": "YOLOv8n (Ultralytics ONNX export; random weights, BatchNorm recalibrated)",
                "input": "3x640x640", "data": f"{args.photos} photographs, no labels", **summary(work / "run")}
    if name == "cls":
        x, y = text_lines(args.lines, seed=0)
        x_test, y_test = text_lines(args.lines // 2, seed=1)
        x_val, y_val = text_lines(args.lines // 2, seed=2)  # validation lines: settings are chosen on these
        np.savez(work / "lines.npz", x=x)  # no y: compression never sees a label
        source = rapidocr_file("ch_ppocr_mobile_v2.0_cls_infer.onnx")
        config = write_config(work / "cls.toml", args, batch_size=32)
        run_cli(["run", "--model", str(source), "--input-shape", "x".join(map(str, CLS_SHAPE)), "--data",
                 str(work / "lines.npz"), "-c", str(config), "--out", str(work / "run")], work / "run.log")
        dense, pruned = onnx_accuracy(source, x_test, y_test), onnx_accuracy(work / "run" / "pruned.onnx", x_test, y_test)
        val = {"val_dense_accuracy": onnx_accuracy(source, x_val, y_val),
               "val_pruned_accuracy": onnx_accuracy(work / "run" / "pruned.onnx", x_val, y_val)}
        return {"case": "PP-OCR text-direction classifier (trained, Paddle2ONNX)", "input": "3x48x192",
                "data": f"{args.lines} rendered text lines, no labels (scored on {len(y_test)} other lines)",
                "dense_accuracy": dense, "pruned_accuracy": pruned, **val, **summary(work / "run")}
    raise SystemExit(f"unknown case {name}")


def _num(value: float | None) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"


def _schedule(rows: list[dict], meta: dict) -> str:
    """How the masks were found and trained, from the runs' reports (``prune_method``; runs written
    before it was recorded used ADMM)."""
    methods = {r.get("prune_method", "admm") for r in rows}
    epochs = meta["rounds"] + meta["retrain"]
    refit = (", layer-wise reconstruction (each kept layer refitted to the dense layer's output, `reconstruct`)"
             if meta.get("reconstruct") else "")
    if methods == {"oneshot"}:
        return (f"one-shot magnitude pruning (the pipeline's default when distilling){refit}, then {epochs} epochs of "
                f"masked retraining at learning rate {meta.get('lr')}")
    return (f"{meta['rounds']} ADMM rounds of one epoch{refit} and {meta['retrain']} epochs of masked retraining at "
            f"learning rate {meta.get('lr')}")


def render(rows: list[dict], meta: dict) -> str:
    from structadmm.bench.report import speedup_interval

    lines = [
        "# Compressed from unlabeled inputs alone (the dense model as teacher), through `structadmm run`",
        "",
        f"Filter pruning at {meta['ratio']}, kept channels in multiples of 8; {_schedule(rows, meta)}, all "
        "distilling from the dense file. Latency: "
        "ONNX Runtime CPU, batch 1, 2 threads, isolated (each model alone in its own process, dense and pruned "
        f"alternating), median of the per-round speedups with its distribution-free interval and coverage. "
        f"CPU: {meta['cpu']}; load average before the cases: {meta['load']}. Command: `{meta['command']}`.",
        "",
        "| model | input | data | MAC ratio | dense ms | pruned ms | speedup (interval, coverage) | fidelity |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lat, fid = r["latency"], r["fidelity"]
        parts = [f"{o['name']}: rel err {_num(o['rel_error'])}, cos {_num(o['cosine'])}" for o in fid["outputs"][:3]]
        if fid.get("top1_agreement") is not None:
            parts.append(f"top-1 agreement {100 * fid['top1_agreement']:.1f} %")
        if fid.get("box_map50") is not None:
            parts.append(f"box mAP@0.5 vs dense {fid['box_map50']:.3f}")
        if fid.get("dense_boxes") == 0:
            parts.append("box mAP n/a: the dense model finds no box above conf 0.25")
        if fid.get("dense_boxes") is not None:
            parts.append(f"boxes: dense {fid['dense_boxes']}, pruned {fid.get('pruned_boxes')}")
        if r.get("val_dense_accuracy") is not None:
            parts.append(f"validation accuracy {100 * r['val_dense_accuracy']:.2f} % → "
                         f"{100 * r['val_pruned_accuracy']:.2f} % (other lines, where settings are chosen)")
        if r.get("dense_accuracy") is not None:
            parts.append(f"accuracy {100 * r['dense_accuracy']:.2f} % → {100 * r['pruned_accuracy']:.2f} % "
                         "(labels used only to score)")
        lines.append(f"| {r['case']} | {r['input']} | {r['data']} | {r['mac_ratio']:.2f}x | {lat['dense_ms']:.2f} | "
                     f"{lat['pruned_ms']:.2f} | {speedup_interval(lat)} | {'; '.join(parts)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=["cls", "det", "yolo"])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--retrain", type=int, default=3)
    parser.add_argument("--photos", type=int, default=96)
    parser.add_argument("--lines", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--lr", type=float, default=0.1, help="ADMM's and masked retraining's learning rate")
    parser.add_argument("--reconstruct", action="store_true",
                        help="refit the kept layers to the dense layer outputs after the prune (reconstruct = true)")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    meta = {"ratio": args.ratio, "rounds": args.rounds, "retrain": args.retrain, "lr": args.lr,
            "reconstruct": args.reconstruct, "cpu": platform.processor() or
            platform.machine(), "load": " ".join(f"{v:.1f}" for v in os.getloadavg()),
            "command": "python benchmarks/no_labels.py " + " ".join(sys.argv[1:])}
    work = Path(tempfile.mkdtemp(prefix="no_labels-"))
    rows = [case(name, args, work / name) for name in args.cases]
    meta["load_after"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"no_labels{args.tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (RESULTS / f"no_labels{args.tag}.md").write_text(render(rows, meta))
    print(render(rows, meta))


if __name__ == "__main__":
    main()
