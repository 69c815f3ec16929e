#!/usr/bin/env python3
"""Baseline for `droppos-pipeline shard imagenet`: Hugging Face `datasets` writing Parquet with
PIL, 2 worker processes, on an ImageFolder tree.

    bench_shard_baseline.py --root DIR --out OUT --mode original|resize [--num-proc 2]

original: the image column holds the file bytes (as `datasets.Image()` stores them).
resize:   PIL decode, convert to RGB/L, shorter side 256 (torchvision's size rule, bicubic),
          JPEG quality 90.
Prints one JSON line: {"mode", "images", "seconds", "images_per_s"}. Needs
`pip install -r scripts/requirements-bench.txt` (datasets)."""
import argparse
import io
import json
import os
import shutil
import time
from multiprocessing import Pool

import datasets
from datasets import ClassLabel, Dataset, Features, Image, Value
from PIL import Image as PILImage


def list_imagefolder(root):
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    paths, labels = [], []
    for i, c in enumerate(classes):
        for dp, _, fs in os.walk(os.path.join(root, c)):
            for f in sorted(fs):
                paths.append(os.path.join(dp, f))
                labels.append(i)
    return classes, paths, labels


def resize_bytes(path, short=256, quality=90):
    im = PILImage.open(path)
    im = im.convert("L" if im.mode in ("L", "LA", "I;16") else "RGB")
    w, h = im.size
    if min(w, h) > short:
        if w <= h:
            size = (short, h * short // w)
        else:
            size = (w * short // h, short)
        im = im.resize(size, PILImage.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def load_original(batch):
    out = []
    for p in batch["path"]:
        with open(p, "rb") as f:
            out.append({"bytes": f.read(), "path": None})
    return {"image": out}


def load_resized(batch):
    return {"image": [{"bytes": resize_bytes(p), "path": None} for p in batch["path"]]}


def write_part(args):
    """One worker process: its contiguous part of the file list -> one Parquet file."""
    paths, labels, classes, mode, out, i, n = args
    features = Features({"image": Image(), "label": ClassLabel(names=classes)})
    ds = Dataset.from_dict(
        {"path": paths, "label": labels},
        features=Features({"path": Value("string"), "label": ClassLabel(names=classes)}),
    )
    ds = ds.map(
        load_original if mode == "original" else load_resized,
        batched=True,
        batch_size=64,
        remove_columns=["path"],
        features=features,
        keep_in_memory=True,
    )
    ds.to_parquet(os.path.join(out, f"train-{i:05d}-of-{n:05d}.parquet"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", choices=["original", "resize"], required=True)
    ap.add_argument("--num-proc", type=int, default=2)
    a = ap.parse_args()
    datasets.disable_progress_bars()
    datasets.disable_caching()
    if os.path.exists(a.out):
        shutil.rmtree(a.out)
    os.makedirs(a.out)
    t0 = time.perf_counter()
    classes, paths, labels = list_imagefolder(a.root)
    n = a.num_proc
    step = -(-len(paths) // n)
    jobs = [(paths[i * step:(i + 1) * step], labels[i * step:(i + 1) * step], classes, a.mode,
             a.out, i, n) for i in range(n)]
    with Pool(n) as pool:
        pool.map(write_part, jobs)
    secs = time.perf_counter() - t0
    print(json.dumps({"tool": "hf-datasets", "datasets_version": datasets.__version__,
                      "mode": a.mode, "images": len(paths), "seconds": round(secs, 3),
                      "images_per_s": round(len(paths) / secs, 1)}))


if __name__ == "__main__":
    main()
