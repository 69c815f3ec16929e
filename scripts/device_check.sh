#!/usr/bin/env bash
# The GPU checks of the model issue in one run on a lent device machine (one NVIDIA GPU, torch
# 2.11 from pip, no Rust, no internet): `doctor`, the ViT-B/16 recipe's training step with bf16
# against the PyTorch eager baseline in the same call (images/s, MFU against the H100/H200 dense
# bf16 peak of 989.4 TFLOP/s, memory), and a short CUDA training run of the tiny recipe on the
# bundled samples. Needs device-carry/ from scripts/pack_for_device.sh. Results go to $OUT (or
# ./device-out) as JSON lines and logs.
#
# DEVICE_CHECK_DRY=1 runs the same steps on the CPU at toy sizes (ViT-Ti, batch 4, 2 steps, one
# epoch), so the script's paths and plumbing can be checked on a machine without a GPU before
# device time is spent on it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/device-out}"
mkdir -p "$OUT"
log() { echo "== $*" | tee -a "$OUT/summary.txt" >&2; }
PY="${PYTHON:-python3}"
TORCH_LIB="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
BIN=/tmp/droppos-bin/droppos-pipeline-torch
mkdir -p /tmp/droppos-bin
gzip -dc device-carry/droppos-pipeline-torch.gz >"$BIN" && chmod +x "$BIN"
if [ "${DEVICE_CHECK_DRY:-0}" = 1 ]; then
    DEVICE=cpu SIZE=tiny BATCHES="4" STEPS=(--steps 2 --warmup 1 --rounds 1) EPOCHS=1
    log "dry run on the CPU (DEVICE_CHECK_DRY=1): toy sizes, figures meaningless"
else
    DEVICE=cuda SIZE=base BATCHES="64 256" STEPS=(--steps 20 --warmup 5 --rounds 2) EPOCHS=20
    log "commit $(cat device-carry/COMMIT 2>/dev/null || echo unknown); $("$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))')"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee -a "$OUT/summary.txt"
fi

log "doctor"
"$BIN" doctor 2>&1 | tee "$OUT/doctor.txt" | tail -n 20

# The recipe's step: ViT-B/16 + 512-d x 2 decoder, 224², attention guide on; per-GPU batches of
# the 2048 global batch (64 on 32 GPUs, 256 on 8). Both sides: bf16 autocast + TF32, fused
# attention, fused AdamW, per-parameter clipping.
for batch in $BATCHES; do
    log "train step ViT-$SIZE/16, batch $batch (PyTorch eager, then ours)"
    PYTHONUNBUFFERED=1 "$PY" scripts/bench_train_step.py --device "$DEVICE" --size "$SIZE" \
        --batch "$batch" "${STEPS[@]}" --rust-bin "$BIN" 2>>"$OUT/bench_train_step.log" \
        | tee -a "$OUT/train_step.jsonl" ||
        log "train step benchmark failed (see bench_train_step.log)"
done

log "tiny recipe on $DEVICE, bundled samples"
rm -rf /tmp/dp-shards /tmp/dp-run
"$BIN" shard imagenet --root tests/fixtures/data/imagenet/train --out /tmp/dp-shards \
    >"$OUT/shard.log" 2>&1 || log "sharding the bundled samples failed (see shard.log)"
"$BIN" train --config configs/tiny-cpu.toml --data /tmp/dp-shards --output /tmp/dp-run \
    --set train.epochs=$EPOCHS --set runtime.device=\"$DEVICE\" 2>&1 | tail -n 5 | tee -a "$OUT/summary.txt"
cp /tmp/dp-run/metrics.jsonl "$OUT/tiny_${DEVICE}_metrics.jsonl" 2>/dev/null ||
    log "the tiny run wrote no metrics"
log "done"
