"""Encoder inference speed on the CPU: an ONNX export (written by `droppos-pipeline export`) in
ONNX Runtime vs PyTorch eager (timm) on the same weights and the same random batch.

    python scripts/bench_onnx_encoder.py --onnx enc.onnx --weights vit.safetensors \
        --arch vit_small_patch16_224 [--batch 32 --threads 2 --iters 5]

Prints one JSON line (median seconds per batch, images/s, max |Δ| of the cls output).
"""
import argparse
import json
import time

import numpy as np
import onnxruntime as ort
import timm
import torch
from safetensors.torch import load_file


def median_time(fn, iters):
    fn()  # warm-up
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--arch", default="vit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    m = timm.create_model(a.arch, pretrained=False, num_classes=0)
    m.load_state_dict(load_file(a.weights))
    m.eval()
    size = m.patch_embed.img_size[0]
    x = torch.randn(a.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    t = time.perf_counter()
    sess = ort.InferenceSession(a.onnx, so, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t
    xn = x.numpy()
    with torch.inference_mode():
        ref = m.forward_features(x)[:, 0].numpy()
    got = sess.run(["cls"], {"images": xn})[0]
    ort_s = median_time(lambda: sess.run(["cls"], {"images": xn}), a.iters)
    with torch.inference_mode():
        torch_s = median_time(lambda: m.forward_features(x), a.iters)
    print(json.dumps({
        "arch": a.arch, "batch": a.batch, "threads": a.threads, "iters": a.iters,
        "ort_load_seconds": load_s,
        "ort_batch_seconds": ort_s, "ort_images_per_s": a.batch / ort_s,
        "torch_batch_seconds": torch_s, "torch_images_per_s": a.batch / torch_s,
        "ort_speedup_vs_torch": torch_s / ort_s,
        "cls_max_abs_diff": float(np.abs(got - ref).max()),
        "torch": torch.__version__, "onnxruntime": ort.__version__,
    }))


if __name__ == "__main__":
    main()
