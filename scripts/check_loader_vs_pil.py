#!/usr/bin/env python3
"""Checks the loader's output on any shard folder against PIL + torchvision, and (optionally) its
throughput against torchvision's DataLoader, in one run.

    source scripts/env.sh
    python scripts/check_loader_vs_pil.py --data SHARDS [SHARDS ...] \
        --bin $CARGO_TARGET_DIR/release/droppos-pipeline [--samples 64] [--throughput]

For each transform (pre-training augmentation and evaluation) it runs
`droppos-pipeline bench loader --format u8 --dump DIR`, which writes the first samples the loader
produced as PNG files with each one's key and geometry (samples.jsonl), and rebuilds every sample
from the shard's stored image bytes with torchvision on PIL:

  pre-training: F.resized_crop(img, i, j, h, w, [S, S], BICUBIC) (+ F.hflip), with the crop box
                and flip the loader drew (their statistics are tested against torchvision's
                RandomResizedCrop.get_params in `cargo test -p droppos-shards --test loader`);
  evaluation:   Resize(int(S / 0.875), BICUBIC) + CenterCrop(S): torchvision's own geometry,
                nothing taken from the loader.

Masks (ADE20K / COCO shards with a `mask` column) are rebuilt the same way with NEAREST.
It prints the mean absolute difference per image (grey levels) and fails (exit 1) if any image
reaches 1.0, the contract in the README. With --throughput it also times `bench loader` (f32,
pre-training) against torchvision ImageFolder + DataLoader (2 workers, same augmentation) on the
same images, written out of the shards into a temporary class-folder tree.
"""
import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image


def shard_files(data_dirs):
    for d in data_dirs:
        m = json.load(open(os.path.join(d, "manifest.json")))
        for s in m["shards"]:
            yield os.path.join(d, s["file"])


def read_rows(data_dirs, keys):
    """key -> {"image": bytes, "mask": bytes | None} for the wanted keys only (streamed)."""
    import pyarrow.parquet as pq

    want = set(keys)
    rows = {}
    for f in shard_files(data_dirs):
        pf = pq.ParquetFile(f)
        cols = [c for c in ("key", "image", "mask") if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(columns=cols, batch_size=256):
            d = batch.to_pydict()
            for k, img, m in zip(d["key"], d["image"], d.get("mask", [None] * len(d["key"]))):
                if k in want and k not in rows:
                    rows[k] = {"image": img, "mask": m}
    missing = want - set(rows)
    if missing:
        sys.exit(f"keys not found in the shards: {sorted(missing)[:5]}")
    return rows


def dump(binary, data_dirs, out, size, samples, seed, epoch, eval_mode, exact):
    cmd = [binary, "--log", "warn", "bench", "loader", "--data", *data_dirs, "--format", "u8",
           "--size", str(size), "--seed", str(seed), "--start-epoch", str(epoch),
           "--dump", out, "--dump-limit", str(samples), "--json"]
    if eval_mode:
        cmd.append("--eval")
    if exact:
        cmd.append("--pillow-exact")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    return [json.loads(line) for line in open(os.path.join(out, "samples.jsonl"))], " ".join(cmd)


def rebuild(sample, row, size):
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    g = sample["geometry"]
    img = Image.open(io.BytesIO(row["image"])).convert("RGB")
    mask = Image.open(io.BytesIO(row["mask"])) if row["mask"] is not None else None
    if g["kind"] == "pretrain":
        box = (g["i"], g["j"], g["h"], g["w"])
        img = F.resized_crop(img, *box, [size, size], InterpolationMode.BICUBIC)
        if mask is not None:
            mask = F.resized_crop(mask, *box, [size, size], InterpolationMode.NEAREST)
    else:
        short = int(size / 0.875)
        img = T.CenterCrop(size)(T.Resize(short, interpolation=InterpolationMode.BICUBIC)(img))
        if mask is not None:
            mask = T.CenterCrop(size)(T.Resize(short, interpolation=InterpolationMode.NEAREST)(mask))
    if g["flip"]:
        img = F.hflip(img)
        mask = F.hflip(mask) if mask is not None else None
    return img, mask


def compare(samples, rows, out, size):
    diffs, mask_mismatch = [], []
    for s in samples:
        ref, ref_mask = rebuild(s, rows[s["key"]], size)
        ours = np.asarray(Image.open(os.path.join(out, s["file"])).convert("RGB"), dtype=np.int16)
        d = float(np.abs(ours - np.asarray(ref, dtype=np.int16)).mean())
        diffs.append((d, s["key"]))
        if s.get("mask_file") and ref_mask is not None:
            om = np.asarray(Image.open(os.path.join(out, s["mask_file"])))
            mask_mismatch.append(float((om != np.asarray(ref_mask)).mean()))
    return diffs, mask_mismatch


def ours_run(binary, data_dirs, batch, size, epochs):
    cmd = [binary, "--log", "warn", "bench", "loader", "--data", *data_dirs, "--batch-size", str(batch),
           "--size", str(size), "--epochs", str(epochs), "--format", "f32", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def throughput(binary, data_dirs, rows_dir, size, batch, epochs, runs):
    import pyarrow.parquet as pq

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_loader_baseline import torchvision_run

    # Class folders from the labels (ImageFolder sorts them; zero-padded names keep the order),
    # each image under a unique name ending in its key's file name.
    # Datasets without labels (COCO, ADE20K) go to one folder.
    n = 0
    for f in shard_files(data_dirs):
        pf = pq.ParquetFile(f)
        cols = [c for c in ("key", "image", "label") if c in pf.schema_arrow.names]
        for b in pf.iter_batches(columns=cols):
            d = b.to_pydict()
            for k, img, lab in zip(d["key"], d["image"], d.get("label", [0] * len(d["key"]))):
                folder = os.path.join(rows_dir, f"{lab:06d}")
                os.makedirs(folder, exist_ok=True)
                open(os.path.join(folder, f"{n:08d}_" + os.path.basename(k)), "wb").write(img)
                n += 1
    median = lambda rs: sorted(rs, key=lambda r: r["images_per_s"])[len(rs) // 2]  # noqa: E731
    tv = median([torchvision_run(rows_dir, batch, size, 2, epochs) for _ in range(runs)])
    ours = median([ours_run(binary, data_dirs, batch, size, epochs) for _ in range(runs)])
    return n, tv, ours


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", required=True, help="shard folder(s) with manifest.json")
    ap.add_argument("--bin", required=True, help="droppos-pipeline binary (release build)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--samples", type=int, default=64, help="samples compared per transform")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epoch", type=int, default=0, help="epoch whose first samples are dumped")
    ap.add_argument("--pillow-exact", action="store_true",
                    help="the loader's Pillow-exact arithmetic instead of the 16-bit fast one")
    ap.add_argument("--throughput", action="store_true",
                    help="also time the loader against torchvision on the same images")
    ap.add_argument("--epochs", type=int, default=4, help="passes timed by --throughput")
    ap.add_argument("--runs", type=int, default=3, help="runs of --throughput (median)")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="droppos-check-loader-")
    failed = False
    result = {}
    try:
        for mode in ("pretrain", "eval"):
            out = os.path.join(work, mode)
            samples, cmd = dump(args.bin, args.data, out, args.size, args.samples, args.seed,
                                args.epoch, mode == "eval", args.pillow_exact)
            rows = read_rows(args.data, [s["key"] for s in samples])
            diffs, mm = compare(samples, rows, out, args.size)
            vals = [d for d, _ in diffs]
            worst = max(diffs)
            result[mode] = {"samples": len(vals), "mean_abs_diff_mean": statistics.mean(vals),
                            "mean_abs_diff_max": worst[0], "worst_key": worst[1],
                            "over_1": sum(v >= 1.0 for v in vals)}
            line = (f"{mode}: {len(vals)} samples vs torchvision/PIL, mean |diff| per image: "
                    f"mean {statistics.mean(vals):.3f}, max {worst[0]:.3f} ({worst[1]}), "
                    f"{result[mode]['over_1']} at 1.0 or more")
            if mm:
                result[mode]["mask_pixels_differing_mean"] = statistics.mean(mm)
                line += f"; masks: {100 * statistics.mean(mm):.2f}% of pixels differ (NEAREST)"
            print(line + f"  [{cmd}]")
            failed |= result[mode]["over_1"] > 0
        if args.throughput:
            n, tv, ours = throughput(args.bin, args.data, os.path.join(work, "images"), args.size,
                                     args.batch_size, args.epochs, args.runs)
            result["throughput"] = {"images": n, "torchvision": tv, "ours_f32": ours,
                                    "ratio": ours["images_per_s"] / tv["images_per_s"]}
            print(f"throughput ({n} images x {args.epochs} epochs, median of {args.runs}): "
                  f"torchvision {tv['images_per_s']:.0f} img/s, ours {ours['images_per_s']:.0f} img/s "
                  f"= {result['throughput']['ratio']:.2f}x; peak RSS {tv['peak_rss_mib']:.0f} vs "
                  f"{ours['peak_rss_mib']:.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
