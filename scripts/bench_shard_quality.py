#!/usr/bin/env python3
"""Fidelity of resized shards: mean PSNR of the stored images against Pillow's full decode +
bicubic resize of the source to the same size (no re-encoding), for our shards and for the
Hugging Face baseline's Parquet files (scripts/bench_shard_baseline.py --mode resize).

    bench_shard_quality.py --root INPUT --ours OUR_SHARDS --hf HF_PARQUET_DIR [--n 300]

Both stores pay the same JPEG re-encoding at quality 90; what differs is how they get to the
smaller size. Prints one JSON line.
"""
import argparse
import glob
import io
import json
import math
import os

import numpy as np
import pyarrow.parquet as pq
from PIL import Image


def psnr(stored_bytes, source_path):
    got = Image.open(io.BytesIO(stored_bytes))
    src = Image.open(source_path)
    mode = "L" if got.mode == "L" else "RGB"
    ref = src.convert(mode).resize(got.size, Image.BICUBIC)
    a = np.asarray(got.convert(mode), dtype=np.float64)
    b = np.asarray(ref, dtype=np.float64)
    mse = float(np.mean((a - b) ** 2))
    return 99.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--ours", required=True)
    ap.add_argument("--hf", required=True)
    ap.add_argument("--n", type=int, default=300)
    a = ap.parse_args()

    ours = []
    for f in sorted(glob.glob(os.path.join(a.ours, "*.parquet"))):
        t = pq.read_table(f, columns=["key", "image"])
        ours += zip(t.column("key").to_pylist(), t.column("image").to_pylist())
    ours.sort()
    ours = ours[: a.n]
    q_ours = [psnr(img, os.path.join(a.root, key)) for key, img in ours]

    # The baseline drops the path column; its rows follow its own listing (sorted classes, then
    # sorted file names), split in order across the part files.
    classes = sorted(d for d in os.listdir(a.root) if os.path.isdir(os.path.join(a.root, d)))
    paths = []
    for c in classes:
        for dp, _, fs in os.walk(os.path.join(a.root, c)):
            paths += [os.path.join(dp, f) for f in sorted(fs)]
    rows = []
    for f in sorted(glob.glob(os.path.join(a.hf, "*.parquet"))):
        rows += [r["bytes"] for r in pq.read_table(f, columns=["image"]).column("image").to_pylist()]
    assert len(rows) == len(paths), (len(rows), len(paths))
    q_hf = [psnr(img, p) for img, p in list(zip(rows, paths))[: a.n]]

    print(json.dumps({
        "images": len(q_ours),
        "ours_psnr_db": round(sum(q_ours) / len(q_ours), 2),
        "hf_psnr_db": round(sum(q_hf) / len(q_hf), 2),
        "ours_min_db": round(min(q_ours), 2),
        "hf_min_db": round(min(q_hf), 2),
    }))


if __name__ == "__main__":
    main()
