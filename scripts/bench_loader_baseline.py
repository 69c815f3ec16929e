#!/usr/bin/env python3
"""Loader benchmark: our loader vs torchvision ImageFolder + DataLoader + PIL, and vs the raw
decode limit, in one run on the same images (see BENCHMARKS.md, "Loader").

    source scripts/env.sh
    python scripts/bench_loader_baseline.py --images tests/fixtures/data/imagenet/train \
        --bin $CARGO_TARGET_DIR/release/droppos-pipeline --epochs 8

Steps (each repeated --runs times, median reported):
 1. raw decode limit: PIL `Image.open(f).convert("RGB")` of every file on one core (Pillow's
    JPEG decoder is libjpeg-turbo), images/s per core; also with DCT scaling to 1/2 (`draft`).
 2. torchvision: ImageFolder + DataLoader(num_workers=2, batch 64, persistent workers) with
    RandomResizedCrop(S, scale=(0.2, 1), bicubic) + RandomHorizontalFlip + ToTensor + Normalize,
    one pass per epoch; whole-run images/s and steady state (after the first batch);
    peak RSS of the main process + workers.
 3. ours: writes the same files as shards (pyarrow, the shard format: key/image/width/height/
    orig_width/orig_height/label + manifest.json) unless --shards is given, then runs
    `droppos-pipeline bench loader --json` with the same batch size, size and epochs; then the
    same on the files sharded by `droppos-pipeline shard imagenet --jpeg-restarts` (lossless
    restart markers, so the loader entropy-decodes only the part of each JPEG a crop needs;
    `--no-restarts` skips this). Ratios are printed for every variant.
"""
import argparse
import atexit
import glob
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from PIL import Image


def files_of(root):
    return sorted(f for f in glob.glob(os.path.join(root, "*", "*")) if os.path.isfile(f))


def decode_limit(files, draft=False):
    blobs = [open(f, "rb").read() for f in files]
    import io

    t = time.perf_counter()
    for b in blobs:
        im = Image.open(io.BytesIO(b))
        if draft and im.format == "JPEG":
            im.draft("RGB", ((im.size[0] + 1) // 2, (im.size[1] + 1) // 2))
        im.convert("RGB")
    return len(blobs) / (time.perf_counter() - t)


def tree_rss_kib(pid):
    """Current RSS of a process and its children (KiB)."""
    total = 0
    pids = [pid]
    try:
        kids = open(f"/proc/{pid}/task/{pid}/children").read().split()
        pids += [int(k) for k in kids]
    except OSError:
        pass
    for p in pids:
        try:
            for line in open(f"/proc/{p}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def torchvision_run(root, batch, size, workers, epochs):
    import torch
    from torchvision import datasets, transforms

    torch.set_num_threads(1)
    tf = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    ds = datasets.ImageFolder(root, transform=tf)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                     persistent_workers=workers > 0, drop_last=False)
    peak = [0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss_kib(os.getpid()))
            time.sleep(0.05)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    t0 = time.perf_counter()
    first = None
    n = 0
    after = 0
    for _ in range(epochs):
        for x, y in dl:
            n += x.shape[0]
            if first is None:
                first = time.perf_counter() - t0
            else:
                after += x.shape[0]
    total = time.perf_counter() - t0
    stop.set()
    th.join()
    del dl
    return {"images": n, "seconds": total, "images_per_s": n / total,
            "steady_images_per_s": after / (total - first), "peak_rss_mib": peak[0] / 1024}


def write_shards(root, out, rows_per_group=64):
    import pyarrow as pa
    import pyarrow.parquet as pq

    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    idx = {c: i for i, c in enumerate(classes)}
    keys, images, ws, hs, labels = [], [], [], [], []
    for f in files_of(root):
        rel = os.path.relpath(f, root)
        b = open(f, "rb").read()
        w, h = Image.open(f).size
        keys.append(rel); images.append(b); ws.append(w); hs.append(h)
        labels.append(idx[rel.split(os.sep)[0]])
    schema = pa.schema([("key", pa.string(), False), ("image", pa.binary(), False),
                        ("width", pa.int32(), False), ("height", pa.int32(), False),
                        ("orig_width", pa.int32(), False), ("orig_height", pa.int32(), False),
                        ("label", pa.int32(), False)])
    t = pa.table([keys, images, ws, hs, ws, hs, labels], schema=schema)
    os.makedirs(out, exist_ok=True)
    file = "shard-000000.parquet"
    pq.write_table(t, os.path.join(out, file), row_group_size=rows_per_group, compression="zstd")
    data = open(os.path.join(out, file), "rb").read()
    manifest = {
        "format_version": 1, "tool": "bench_loader_baseline.py", "tool_version": "0",
        "dataset": "imagenet", "split": "train", "num_rows": len(keys),
        "classes": [{"index": i, "id": c, "name": c} for i, c in enumerate(classes)],
        "patch_size": 16,
        "shards": [{"file": file, "rows": len(keys), "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest()}],
        "skipped": [], "options": {"rows_per_group": rows_per_group},
        "inputs": {"count": len(keys), "sha256": ""},
    }
    json.dump(manifest, open(os.path.join(out, "manifest.json"), "w"), indent=1)
    return out


def ours_run(binary, shards, batch, size, epochs, threads, fmt):
    cmd = [binary, "--log", "warn", "bench", "loader", "--data", shards, "--batch-size", str(batch),
           "--size", str(size), "--epochs", str(epochs), "--format", fmt, "--json"]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1]), " ".join(cmd)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", required=True, help="ImageFolder root")
    ap.add_argument("--bin", help="droppos-pipeline binary (release build)")
    ap.add_argument("--shards", help="shard folder of the same images (default: written to a temp dir)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-restarts", action="store_true",
                    help="skip ours on shards written with `shard --jpeg-restarts`")
    args = ap.parse_args()

    files = files_of(args.images)
    print(f"{len(files)} files, {sum(os.path.getsize(f) for f in files) / len(files) / 1024:.0f} KiB on average")
    res = {}
    res["decode_full_per_core"] = statistics.median(decode_limit(files) for _ in range(args.runs))
    res["decode_half_per_core"] = statistics.median(decode_limit(files, True) for _ in range(args.runs))
    print(f"raw decode limit (PIL/libjpeg-turbo, 1 core): {res['decode_full_per_core']:.0f} img/s full, "
          f"{res['decode_half_per_core']:.0f} img/s with DCT 1/2")
    tv = [torchvision_run(args.images, args.batch_size, args.size, args.workers, args.epochs)
          for _ in range(args.runs)]
    tv.sort(key=lambda r: r["images_per_s"])
    res["torchvision"] = tv[len(tv) // 2]
    print(f"torchvision (num_workers={args.workers}): {res['torchvision']['images_per_s']:.0f} img/s "
          f"({res['torchvision']['steady_images_per_s']:.0f} steady), peak RSS {res['torchvision']['peak_rss_mib']:.0f} MiB")
    if args.bin:
        # Shard folders made here are removed at exit (a given --shards folder is left alone).
        temps = []
        atexit.register(lambda: [shutil.rmtree(t, ignore_errors=True) for t in temps])
        if not args.shards:
            temps.append(tempfile.mkdtemp(prefix="droppos-bench-"))
        sets = [("", args.shards or write_shards(args.images, temps[0]))]
        if not args.no_restarts:
            # The same images through our writer with lossless restart markers (opt-in there:
            # default shards keep the original bytes), so the loader can skip entropy decoding.
            temps.append(tempfile.mkdtemp(prefix="droppos-bench-rst-"))
            out = os.path.join(temps[-1], "shards")
            subprocess.run([args.bin, "--log", "warn", "shard", "imagenet", "--quiet", "--jpeg-restarts",
                            "--root", args.images, "--out", out], check=True, capture_output=True)
            sets.append(("_restarts", out))
        cores = os.cpu_count()
        for suffix, shards in sets:
            for fmt in ("f32", "u8"):
                runs = []
                for _ in range(args.runs):
                    r, cmd = ours_run(args.bin, shards, args.batch_size, args.size, args.epochs, args.threads, fmt)
                    runs.append(r)
                runs.sort(key=lambda r: r["images_per_s"])
                r = runs[len(runs) // 2]
                res[f"ours_{fmt}{suffix}"] = r
                label = f"{fmt}{', restart-marked shards' if suffix else ''}"
                print(f"ours ({label}, {r['threads']} threads): {r['images_per_s']:.0f} img/s "
                      f"({r['steady_images_per_s'] or float('nan'):.0f} steady), peak RSS {r['peak_rss_mib']:.0f} MiB  [{cmd}]")
        for key in [k for k in res if k.startswith("ours_")]:
            o = res[key]["images_per_s"]
            print(f"{key}: {o / res['torchvision']['images_per_s']:.2f}x torchvision, "
                  f"{100 * o / (cores * res['decode_full_per_core']):.0f}% of the decode limit "
                  f"({cores} cores x {res['decode_full_per_core']:.0f})")
    print(json.dumps(res))


if __name__ == "__main__":
    sys.exit(main())
