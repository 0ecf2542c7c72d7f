#!/usr/bin/env bash
# The GPU columns of the benchmarks in one go, on the first CUDA device.
#
#   bash examples/benchmarks/run_gpu.sh OUT_DIR [QUICK]
#
# Writes to OUT_DIR:
#   training.json          bench_training.py, fp32 and bf16 autocast, AdK batches 1, 8 and 32
#   training_compile.json  bench_training.py --compile for EGNO (aspirin, AdK x32), bf16
#   scaling.json/.png      bench_scaling.py: inference time and memory vs atoms (10^3-10^5) and P
#   trainer.json           the real trainer (python -m surrogate_md.train) on the MDAnalysisTests
#                          AdK backbone (855 atoms, 8 A graph, P = 4, EGNO hidden 64, 4 layers):
#                          samples/s per epoch at fp32, bf16, bf16 + torch.compile, and under
#                          torchrun (DDP over NCCL, one process)
#   surrogate_vs_md_adk.json  bench_surrogate_vs_md.py with MD and guards on OpenMM's CUDA platform
#                          (OPENMM_PLATFORM) and the model on the GPU: AdK MD made here first
#                          (stage adk_md: ADK_FRAMES frames 1 ps apart, HMR, 1.2 nm cutoff, as the
#                          CPU table's 400 ps), the EGNO of the CPU table's 64 ps row trained on it
#                          (stage adk_train; its metrics in adk_train.jsonl), 40 guarded jumps
#   surrogate_vs_md_adk_compile.json  stage surrogate_adk_compile: the same 40 jumps with the model
#                          eager and through torch.compile, side by side from one MD state
#   surrogate_vs_md_ala2.json the same for alanine dipeptide (the benchmark makes its MD and trains
#                          its EGNO for 10 epochs), 200 guarded jumps
# Each stage has its own time limit (seconds, environment variables T_TRAINING, T_TRAINER,
# T_SCALING, T_COMPILE; 140, 180, 80 and 200 by default; T_ADK_MD, T_ADK_TRAIN, T_SURROGATE: 150,
# 120 and 150 for each surrogate stage; T_SURROGATE_COMPILE: 300 for surrogate_adk_compile; about
# 25 minutes in all, so split STAGES over calls where a command may run 10 minutes) so that one slow stage cannot starve the others (the
# compile stage took 234 s on an H200, two inductor compilations of 47 and 117 s); a stage that
# fails or runs out of time is reported, its output file is absent (each stage's outputs are
# removed before it runs), and the next one runs. QUICK (any second argument) runs tiny sizes: a
# check that the script works, on any machine (on 2 CPU cores the QUICK adk_md stage, mostly
# OpenMM's set-up of AdK, takes 2-4 minutes; its limit is 400 s there). STAGES (environment)
# names the stages to run, in their fixed order (default: training trainer scaling compile adk_md
# adk_train surrogate_adk surrogate_adk_compile surrogate_ala2); adk_train needs adk_md and the
# surrogate_adk stages need adk_train in the same call (their files live in a temporary
# directory); ADK_FRAMES (default 400) must leave a blocked 70/10/20 split room for 64 ps windows
# (>= 200).
set -u
OUT=${1:?usage: run_gpu.sh OUT_DIR [QUICK]}
QUICK=${2:-}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3}
export DEV=${DEVICE:-cuda}  # DEVICE=cpu: the QUICK check on a machine without a GPU
PLATFORM=${OPENMM_PLATFORM:-CUDA}  # OpenMM platform of the surrogate stages
ROOT=$(cd "$HERE/../.." && pwd)
ALL_STAGES="training trainer scaling compile adk_md adk_train surrogate_adk surrogate_adk_compile surrogate_ala2"
read -r -d "" -a asked <<< "${STAGES:-$ALL_STAGES}" || true  # any whitespace
for name in "${asked[@]}"; do
    [[ " $ALL_STAGES " == *" $name "* ]] || {
        echo "run_gpu.sh: unknown stage '$name' in STAGES; stages: $ALL_STAGES" >&2; exit 2; }
done
STAGES=" ${asked[*]} "
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

wanted() { [[ "$STAGES" == *" $1 "* ]]; }

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, say how it ended
    local name=$1 limit=$2 start rc
    shift 2
    wanted "$name" || return 0
    # no output of an earlier call survives a stage that fails in this one
    case $name in
        training) rm -f "$OUT/training.json" ;;
        trainer) rm -f "$OUT/trainer.json" ;;
        scaling) rm -f "$OUT/scaling.json" "$OUT/scaling.png" ;;
        compile) rm -f "$OUT/training_compile.json" ;;
        adk_train) rm -f "$OUT/adk_train.jsonl" ;;
        surrogate_adk) rm -f "$OUT/surrogate_vs_md_adk.json" ;;
        surrogate_adk_compile) rm -f "$OUT/surrogate_vs_md_adk_compile.json" ;;
        surrogate_ala2) rm -f "$OUT/surrogate_vs_md_ala2.json" ;;
    esac
    echo "=== $name (limit ${limit} s) ==="
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    echo "=== $name: exit $rc after $(( $(date +%s) - start )) s ==="
}

if [ -n "$QUICK" ]; then
    BT=(--quick --repeats 2 --batch-sizes 1 2)
    BC=(--quick --repeats 2 --batch-sizes 2 --only "egno aspirin" "egno AdK x2")
    BS=(--quick)
    EPOCHS=2; RES="1:10"; BATCH=4
    ADK_MD=(--frames 30 --interval-ps 0.1 --equilibrate-ps 0)
    ADK_TRAIN=(--set data.jump_ps=0.2 --set data.n_out=2 --set train.epochs=1
               --set train.max_steps_per_epoch=2)
    SVM_ADK=(--quick); SVM_ALA=(--quick)
    T_ADK_MD=${T_ADK_MD:-400}
else
    BT=(--repeats 20 --batch-sizes 1 8 32)
    BC=(--repeats 20 --batch-sizes 32 --only "egno aspirin" "egno AdK x32")
    BS=(--atoms 1000 10000 100000 --repeats 10)
    EPOCHS=8; RES="1:214"; BATCH=8
    ADK_MD=(--frames "${ADK_FRAMES:-400}" --interval-ps 1.0)
    # the recipe of the CPU table's 64 ps row: 4 x 40 bf16 optimiser steps of 4 windows
    ADK_TRAIN=(--set data.jump_ps=64.0 --set train.epochs=4 --set train.max_steps_per_epoch=40)
    SVM_ADK=(--adk-jumps 40 --adk-md-ps 20); SVM_ALA=(--train-epochs 10 --jumps 200)
fi

stage training "${T_TRAINING:-140}" "$PY" "$HERE/bench_training.py" "${BT[@]}" --device "$DEV" \
    --precision fp32 bf16 --in-process --json "$OUT/training.json"

# the real training loop: data loading, host-device copies, validation and logging included
stage trainer "${T_TRAINER:-180}" bash -c '
    set -e
    PY=$1; OUT=$2; WORK=$3; EPOCHS=$4; RES=$5; BATCH=$6; ROOT=$7
    read -r PSF DCD < <("$PY" -c "from MDAnalysisTests.datafiles import PSF, DCD; print(PSF, DCD)")
    "$PY" -m datagen ingest "$PSF" "$DCD" --select "backbone and resid $RES" --no-progress \
        -o "$WORK/adk.h5"
    common=(--config "$ROOT/examples/configs/egno_adk_backbone.yaml" --device "$DEV" -q
            --set data.path="$WORK/adk.h5" --set data.jump_ps=4.0
            --set "data.fractions=[0.9, 0.05, 0.05]" --set train.epochs=$EPOCHS
            --set train.batch_size=$BATCH --set runtime.progress=false)
    "$PY" -m surrogate_md.train "${common[@]}" --out "$WORK/fp32"
    "$PY" -m surrogate_md.train "${common[@]}" --set runtime.precision=bf16 --out "$WORK/bf16"
    "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m surrogate_md.train \
        "${common[@]}" --out "$WORK/ddp"
    "$PY" -m surrogate_md.train "${common[@]}" --set runtime.precision=bf16 \
        --set runtime.compile=true --out "$WORK/bf16_compiled"
' trainer "$PY" "$OUT" "$WORK" "$EPOCHS" "$RES" "$BATCH" "$ROOT"
wanted trainer && "$PY" - "$WORK" "$OUT/trainer.json" <<'EOF'
import json, os, statistics, sys
import torch
work, out = sys.argv[1], sys.argv[2]
runs = {}
for name in ("fp32", "bf16", "bf16_compiled", "ddp"):
    path = os.path.join(work, name, "metrics.jsonl")
    if not os.path.exists(path):
        runs[name] = None
        continue
    with open(path) as handle:
        epochs = [json.loads(line) for line in handle if line.strip()]
    epochs = [e for e in epochs if e.get("split") == "epoch"]
    rates = [e["samples_per_s"] for e in epochs if e.get("samples_per_s")]
    steady = rates[1:] or rates  # the first epoch warms up (and compiles)
    runs[name] = {"epochs": len(epochs), "samples_per_s_per_epoch": rates,
                  "median_after_first": statistics.median(steady) if steady else None,
                  "peak_memory_MiB": max((e.get("peak_memory_MiB") or 0) for e in epochs)
                  if epochs else None,
                  "final_val_fmse": epochs[-1].get("val_fmse") if epochs else None}
    print(f"{name:14s} epochs {len(epochs)}  samples/s after the first epoch "
          f"{runs[name]['median_after_first']}")
device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
with open(out, "w") as handle:
    json.dump({"device": device, "torch": torch.__version__, "runs": runs}, handle, indent=2)
EOF

stage scaling "${T_SCALING:-80}" "$PY" "$HERE/bench_scaling.py" "${BS[@]}" --device "$DEV" \
    --in-process --no-progress --json "$OUT/scaling.json" --plot "$OUT/scaling.png"

stage compile "${T_COMPILE:-200}" "$PY" "$HERE/bench_training.py" "${BC[@]}" --device "$DEV" \
    --precision bf16 --compile --json "$OUT/training_compile.json"

# surrogate against MD, both on the GPU: MD, the guards' energies and relaxations on OpenMM's
# CUDA platform, the model on DEVICE
stage adk_md "${T_ADK_MD:-150}" "$PY" -m datagen openmm --system adk --hmr --cutoff-nm 1.2 \
    "${ADK_MD[@]}" --platform "$PLATFORM" --seed 1 --no-progress -o "$WORK/adk-md.h5"
stage adk_train "${T_ADK_TRAIN:-120}" "$PY" -m surrogate_md.train \
    --config "$ROOT/examples/configs/egno_adk_backbone.yaml" --device "$DEV" -q \
    --set data.path="$WORK/adk-md.h5" --set "data.fractions=[0.7, 0.1, 0.2]" \
    --set model.hidden=32 --set model.n_layers=3 --set train.batch_size=4 --set train.patience=0 \
    --set runtime.precision=bf16 --set runtime.progress=false "${ADK_TRAIN[@]}" \
    --out "$WORK/adk-egno"
if wanted adk_train; then
    cp "$WORK/adk-egno/metrics.jsonl" "$OUT/adk_train.jsonl" 2>/dev/null ||
        echo "adk_train: no metrics.jsonl to copy"
fi
stage surrogate_adk "${T_SURROGATE:-150}" "$PY" "$HERE/bench_surrogate_vs_md.py" --systems adk \
    --adk-checkpoint "$WORK/adk-egno/best.pt" "${SVM_ADK[@]}" --guards relax \
    --relax-iterations 200 --platform "$PLATFORM" --device "$DEV" --no-progress \
    --out-dir "$WORK/svm-adk" --json "$OUT/surrogate_vs_md_adk.json"
stage surrogate_adk_compile "${T_SURROGATE_COMPILE:-300}" "$PY" "$HERE/bench_surrogate_vs_md.py" \
    --systems adk --adk-checkpoint "$WORK/adk-egno/best.pt" "${SVM_ADK[@]}" --guards relax \
    --relax-iterations 200 --platform "$PLATFORM" --device "$DEV" --no-progress --compile \
    --out-dir "$WORK/svm-adk-compile" --json "$OUT/surrogate_vs_md_adk_compile.json"
stage surrogate_ala2 "${T_SURROGATE:-150}" "$PY" "$HERE/bench_surrogate_vs_md.py" "${SVM_ALA[@]}" \
    --guards relax --platform "$PLATFORM" --device "$DEV" --no-progress \
    --data-dir "$WORK/data" --out-dir "$WORK/svm-ala2" --json "$OUT/surrogate_vs_md_ala2.json"
