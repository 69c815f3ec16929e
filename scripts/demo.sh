#!/usr/bin/env bash
# README command (a): the pipeline on the bundled sample data (tests/fixtures/data): doctor ->
# shard (ImageNet, COCO, ADE20K) -> verify --decode -> stats -> one augmented pass of the
# streaming loader -> DropPos pre-training of the tiny recipe on CPU (about a minute) -> plot ->
# ONNX export of the trained model.
# Output goes to demo-output/ (or the folder given as $1); re-running resumes/overwrites it.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/env.sh
source scripts/env.sh
OUT="${1:-demo-output}"
DATA="${DROPPOS_DEMO_DATA:-tests/fixtures/data}"
mkdir -p "$OUT"

echo "== building droppos-pipeline" >&2
# Same target selection as the test command, so the build it made is reused as is.
cargo build --workspace --all-targets --locked
BIN="$CARGO_TARGET_DIR/debug/droppos-pipeline"

step() { echo; echo "== $*" >&2; }

step "doctor"
"$BIN" doctor

step "shard ImageNet train (labels from synset_words.txt)"
"$BIN" shard imagenet --root "$DATA/imagenet/train" --classes "$DATA/imagenet/synset_words.txt" \
    --out "$OUT/imagenet-train"
step "shard ImageNet val (Caffe val.txt with bare file names)"
"$BIN" shard imagenet --root "$DATA/imagenet/val" --classes "$DATA/imagenet/synset_words.txt" \
    --list "$DATA/imagenet/val.txt" --out "$OUT/imagenet-val"
step "shard COCO train2017 (annotations + patch labels)"
"$BIN" shard coco --images "$DATA/coco/train2017" \
    --annotations "$DATA/coco/annotations/instances_train2017.json" --out "$OUT/coco-train2017"
step "shard ADE20K validation (masks + patch labels)"
"$BIN" shard ade20k --root "$DATA/ade20k/ADEChallengeData2016" --split validation \
    --out "$OUT/ade20k-validation"

for d in imagenet-train imagenet-val coco-train2017 ade20k-validation; do
    step "verify --decode $d"
    "$BIN" verify --decode "$OUT/$d"
done

step "stats imagenet-train"
"$BIN" stats "$OUT/imagenet-train"

step "loader: one pre-training augmentation pass over the ImageNet shards"
"$BIN" bench loader --data "$OUT/imagenet-train" --batch-size 16 --size 224

RUN="$OUT/run-tiny"
step "train: DropPos, tiny recipe, CPU, on the ImageNet sample (about a minute)"
rm -rf "$RUN"
"$BIN" train --config configs/tiny-cpu.toml --data "$OUT/imagenet-train" --output "$RUN"
"$BIN" plot "$RUN"

step "export the trained model to ONNX (encoder and DropPos position model)"
"$BIN" export --checkpoint "$RUN" --what encoder --out "$OUT/tiny-encoder.onnx"
"$BIN" export --checkpoint "$RUN" --what droppos --out "$OUT/tiny-droppos.onnx"

echo
echo "== demo finished; outputs in $OUT/" >&2
