#!/usr/bin/env bash
# README command (a): the pipeline on the bundled sample data (tests/fixtures/data): doctor ->
# shard (ImageNet, COCO, ADE20K) -> verify --decode -> stats -> one augmented pass of the
# streaming loader -> DropPos pre-training of the tiny recipe on CPU (about a minute) -> plot ->
# ONNX export of the trained model -> evaluation with ONNX Runtime (position accuracy, k-NN) of
# the trained model next to a random initialisation of the same architecture.
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

step "export the baseline: the same architecture, freshly initialised (the run's starting point, seed 0)"
"$BIN" export --checkpoint "$RUN" --random-init --seed 0 --what encoder --out "$OUT/random-encoder.onnx"
"$BIN" export --checkpoint "$RUN" --random-init --seed 0 --what droppos --out "$OUT/random-droppos.onnx"

step "evaluate both with ONNX Runtime: position accuracy (10 mask draws per image; the recipe's ratios 0.5/0.5, and 0.75/0.75) and k-NN"
for m in tiny random; do
    for set in train val; do
        "$BIN" eval position --model "$OUT/$m-droppos.onnx" --data "$OUT/imagenet-$set" \
            --mask-ratio 0.5 --pos-mask-ratio 0.5 --repeats 10 --json --no-progress \
            >"$OUT/eval-$m-position-$set.json"
        "$BIN" eval position --model "$OUT/$m-droppos.onnx" --data "$OUT/imagenet-$set" \
            --mask-ratio 0.75 --pos-mask-ratio 0.75 --repeats 10 --json --no-progress \
            >"$OUT/eval-$m-position75-$set.json"
    done
    "$BIN" eval knn --model "$OUT/$m-encoder.onnx" --train "$OUT/imagenet-train" \
        --val "$OUT/imagenet-val" --json --no-progress >"$OUT/eval-$m-knn.json"
done
"$DROPPOS_PYTHON" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
load = lambda name: json.load(open(f"{out}/eval-{name}.json"))
rows = []
for label, name in [("position acc, dropped (0.5/0.5), train images", "position-train"),
                    ("position acc, dropped (0.5/0.5), val images", "position-val"),
                    ("position acc, dropped (0.75/0.75), train images", "position75-train"),
                    ("position acc, dropped (0.75/0.75), val images", "position75-val")]:
    t, r = (load(f"{m}-{name}")["scores"][0] for m in ("tiny", "random"))
    rows.append((label, t["acc_dropped"], r["acc_dropped"], t["chance"]))
t, r = load("tiny-knn"), load("random-knn")
rows.append(("k-NN top-1 (k=20, T=0.07), val vs train bank", t["top1"], r["top1"], None))
rows.append(("k-NN top-5", t["top5"], r["top5"], None))
print(f"\n{'':50} {'trained':>8} {'random':>8} {'chance':>8}")
for label, a, b, c in rows:
    print(f"{label:50} {a:8.4f} {b:8.4f} {'' if c is None else f'{c:8.4f}':>8}")
print("(k-NN: the 4 sample val images' classes are not among the 38 sample train classes, so k-NN\n"
      " is 0 by construction here; on real ImageNet shards the same command gives the paper's metric.)")
PY

echo
echo "== demo finished; outputs in $OUT/" >&2
