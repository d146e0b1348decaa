#!/usr/bin/env bash
# The synthetic-poses study on one GPU for a bounded time, then its tables and figures.
#
#   bash studies/synthetic_poses/gpu.sh [HOURS] [MORE pof3d.train ARGUMENTS...]
#
# Trains the full model with the faithful defaults, preset anchor_faces (the paper's FFHQ camera, losses,
# pose learner, learning rates and batch 32, with the benchmark network at 128 px from 64 px renders; see
# pof3d/presets.py for why this size), on the built-in synthetic faces set (20,000 images at 128 px,
# known poses) with one Ray Train worker on one GPU, for HOURS hours of wall clock (default 1;
# train.time_limit_min). It evaluates every 5 kimg with the study's metrics and snapshots every 10 kimg;
# when the time is up the run ends with a final checkpoint and evaluation. Then report.py writes
# results.md and figures/ into studies/synthetic_poses/gpu/, and run.md records the device and the run.
# Running it again continues the same run (from its last checkpoint) for another HOURS. Arguments after
# HOURS go to pof3d.train and win over the recipe's (e.g. --set loss.blur_fade_kimg=50).
#
# Environment:
#   POF3D_RECIPE_DRY=1    the same pipeline on CPU at the tiny preset for 0.032 kimg, evaluated on 64
#                         samples and without the depth error, whose estimator trains for about a minute
#                         on first use (no GPU needed; tests/test_gpu_recipe.py runs it)
#   POF3D_RECIPE_RUN_DIR  run directory (default runs/synthetic-poses-gpu; dry: a new runs/synthetic-poses-dry-*)
#   POF3D_RECIPE_OUT      folder for results.md, run.md and figures/ (default studies/synthetic_poses/gpu;
#                         dry: RUN_DIR/report)
#   PYTHON                interpreter (default .venv/bin/python of this checkout if present, else python)
#
# Exit codes: 0 done; 2 no CUDA device, a bad HOURS or a config error (nothing trained); otherwise the
# training's (1: stopped, e.g. a non-finite loss; the report is still written from what was logged).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python; fi
fi

HOURS=1
if [[ $# -gt 0 && "$1" != -* ]]; then
  HOURS="$1"
  shift
fi
if ! [[ "$HOURS" =~ ^([0-9]+([.][0-9]*)?|[.][0-9]+)$ ]] || awk -v h="$HOURS" 'BEGIN { exit !(h <= 0) }'; then
  echo "error: HOURS must be a positive number of hours (e.g. 1 or 0.5), got '$HOURS'" >&2
  exit 2
fi
MINUTES="$(awk -v h="$HOURS" 'BEGIN { printf "%g", h * 60 }')"

STAMP="$(date +%Y%m%d-%H%M%S)"
if [[ "${POF3D_RECIPE_DRY:-0}" != "0" ]]; then
  DEVICE="CPU (dry run: tiny preset, 0.032 kimg, 64 evaluation samples)"
  RUN_DIR="${POF3D_RECIPE_RUN_DIR:-runs/synthetic-poses-dry-$STAMP}"
  OUT="${POF3D_RECIPE_OUT:-$RUN_DIR/report}"
  METRICS="pose,js,fd_random,kd_random"
  SETUP=(--preset tiny --kimg 0.032
    --set data.synthetic_n=256 --set train.tick_kimg=0.008 --set train.snapshot_kimg=0.016
    --set train.eval_kimg=0.032 --set train.eval_samples=64)
else
  if ! DEVICE="$("$PY" -c '
import sys
try:
    import torch
except ImportError as exc:
    sys.exit(f"error: {exc} in {sys.executable}; set PYTHON to the interpreter of the project environment")
if not torch.cuda.is_available():
    sys.exit(
        "error: no CUDA device is visible to PyTorch (torch.cuda.is_available() is False); this recipe "
        "trains on one GPU. POF3D_RECIPE_DRY=1 runs the same pipeline on CPU at the tiny preset."
    )
print(torch.cuda.get_device_name(0))')"; then
    exit 2
  fi
  METRICS="pose,js,depth,fd_random,kd_random"
  RUN_DIR="${POF3D_RECIPE_RUN_DIR:-runs/synthetic-poses-gpu}"
  OUT="${POF3D_RECIPE_OUT:-studies/synthetic_poses/gpu}"
  # A few CPUs for the worker's host-side work, leaving the rest to Ray Data's decoding.
  CPUS=1
  if [[ "$(nproc)" -ge 8 ]]; then CPUS=4; fi
  SETUP=(--preset anchor_faces --gpus-per-worker 1
    --set data.synthetic_n=20000 --set train.cpus_per_worker="$CPUS"
    --set train.tick_kimg=1 --set train.eval_kimg=5 --set train.snapshot_kimg=10)
fi

# A run directory with a checkpoint is continued; the saved config is reused, the flags below reapply.
RESUME=()
if compgen -G "$RUN_DIR/checkpoints/checkpoint-*/manifest.json" >/dev/null; then
  RESUME=(--resume "$RUN_DIR")
fi
mkdir -p "$RUN_DIR" "$OUT"
LOG="$RUN_DIR/recipe-$STAMP.log"
echo "synthetic-poses recipe on $DEVICE: $HOURS h, run $RUN_DIR${RESUME[*]:+ (continued)}, results $OUT"
STARTED="$(date '+%Y-%m-%d %H:%M:%S %Z')"
SECONDS=0
set +e
"$PY" -m pof3d.train "${SETUP[@]}" "${RESUME[@]}" --run-dir "$RUN_DIR" --experiment synthetic-poses \
  --set train.time_limit_min="$MINUTES" --set train.eval_metrics="$METRICS" \
  --set train.keep_checkpoints=20 "$@" 2>&1 | tee "$LOG"
CODE="${PIPESTATUS[0]}"
set -e
ELAPSED="$SECONDS"
if [[ "$CODE" == 2 || ! -s "$RUN_DIR/metrics.jsonl" ]]; then
  echo "error: training logged no tick (exit $CODE); see $LOG" >&2
  exit "$([[ "$CODE" == 0 ]] && echo 1 || echo "$CODE")"
fi

"$PY" studies/synthetic_poses/report.py --full "$RUN_DIR" --out "$OUT"
SUMMARY="$(grep -E '^(trained to kimg|training stopped)' "$LOG" | tail -n 1 || true)"
COMMAND="bash studies/synthetic_poses/gpu.sh $HOURS${*:+ $*}"
if [[ ${#RESUME[@]} -gt 0 ]]; then COMMAND="$COMMAND (continuing the run from its last checkpoint)"; fi
cat >"$OUT/run.md" <<EOF
# Synthetic-poses study on $DEVICE

| | |
|---|---|
| command | $COMMAND |
| device | $DEVICE |
| time limit | $HOURS h (\`train.time_limit_min=$MINUTES\`) |
| started | $STARTED |
| wall time | $((ELAPSED / 60)) min $((ELAPSED % 60)) s (data preparation, training and evaluations) |
| training | ${SUMMARY:-see the log} (exit $CODE) |
| run directory | $RUN_DIR (log: $LOG) |

Tables: results.md; figures: figures/.
EOF
echo "wrote $OUT/results.md, $OUT/run.md and $OUT/figures/"
exit "$CODE"
