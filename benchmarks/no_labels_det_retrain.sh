#!/usr/bin/env bash
# Does masked retraining help the PP-OCRv4 text detector once its layers are reconstructed? A validation
# check at 320x320 (96 other photographs with printed words than no_labels.py's 640x640 run: other crops,
# other size), each setting one `structadmm run` from unlabeled inputs, fidelity only (nothing is timed):
#
#     bash benchmarks/no_labels_det_retrain.sh          # writes benchmarks/results/no_labels_det_retrain.md
#
# Settings: filter ratio 0.5, kept channels in multiples of 8, one-shot pruning (the default when distilling),
# then masked retraining by distillation; "1 epoch at 1e-6" is the least the pipeline runs (its weights barely
# move; its BatchNorm running statistics are re-estimated on the photographs, as in every distilling epoch).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
WORK=$(mktemp -d)
OUT=$ROOT/benchmarks/results/no_labels_det_retrain.md
export PYTHONPATH=$ROOT
trap 'rm -rf "$WORK"' EXIT

"$PY" -c "
import sys; sys.path.insert(0, '$ROOT/benchmarks')
from pathlib import Path
from no_labels import photo_folder
photo_folder(Path('$WORK/photos'), 96, (3, 320, 320), text=True)"
MODEL=$("$PY" -c "import sys; sys.path.insert(0, '$ROOT/benchmarks'); from no_labels import rapidocr_file
print(rapidocr_file('ch_PP-OCRv4_det_infer.onnx'))")
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)

{
  echo "# PP-OCRv4 detector at 320x320: reconstruction, then how much masked retraining"
  echo
  echo "Validation check (\`bash benchmarks/no_labels_det_retrain.sh\`): 96 photographs with printed words at"
  echo "320x320, no labels, filter ratio 0.5 in multiples of 8, one-shot pruning, then distillation from the"
  echo "dense file. Fidelity of pruned.onnx against dense.onnx on the run's held-out photographs (ONNX Runtime)."
  echo "Nothing is timed. Load average before: $LOAD."
  echo
  echo "| reconstruction | masked retraining | relative error | cosine | layer error before -> after reconstruction |"
  echo "|---|---|---:|---:|---|"
} > "$OUT"

run() {  # tag, reconstruct, epochs (admm_rounds + retrain_epochs), lr, label
  local tag=$1 recon=$2 rounds=$3 retrain=$4 lr=$5 label=$6
  printf 'ratio = 0.5\nchannel_multiple = 8\nadmm_rounds = %s\nadmm_epochs = 1\nretrain_epochs = %s\n' "$rounds" "$retrain" > "$WORK/$tag.toml"
  printf 'admm_lr = %s\nretrain_lr = %s\nreconstruct = %s\nbatch_size = 8\nbench_batches = [1]\n' "$lr" "$lr" "$recon" >> "$WORK/$tag.toml"
  printf 'bench_min_runs = 3\nbench_min_seconds = 0.0\n' >> "$WORK/$tag.toml"
  if "$PY" -m structadmm.cli run --model "$MODEL" --input-shape 3x320x320 --data "$WORK/photos" \
      -c "$WORK/$tag.toml" --out "$WORK/run_$tag" > "$WORK/$tag.log" 2>&1; then
    "$PY" - "$WORK/run_$tag/report.json" "$recon" "$label" >> "$OUT" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
out = report["fidelity"]["outputs"][0]
done = report.get("reconstruction")
layers = f"{done['error_before']:.3f} -> {done['error_after']:.3f}" if done else "-"
print(f"| {sys.argv[2]} | {sys.argv[3]} | {out['rel_error']:.3g} | {out['cosine']:.3f} | {layers} |")
EOF
  else
    echo "| $recon | $label | the run stopped: $(tail -n 1 "$WORK/$tag.log" | sed 's/|/\\|/g; s#'"$WORK"'#RUN#g') | | |" >> "$OUT"
  fi
  echo "$tag done"
}

run only true 1 0 0.000001 "1 epoch at lr 1e-6"
run lr1e3 true 3 4 0.001 "7 epochs at lr 0.001"
run lr1e2 true 3 4 0.01 "7 epochs at lr 0.01"
run off_lr1e2 false 3 4 0.01 "7 epochs at lr 0.01"
echo >> "$OUT"
echo "Load average after: $(cut -d' ' -f1-3 /proc/loadavg)." >> "$OUT"
