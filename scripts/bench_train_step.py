#!/usr/bin/env python3
"""PyTorch eager baseline of one DropPos pre-training step, and the comparison with ours.

Same model and step as `droppos-pipeline bench train-step`: ViT encoder + DropPos decoder
(no position embeddings) built from timm's `Block` (timm's fused scaled-dot-product attention),
attention guide as a no-grad full pass, smoothed position loss, backward, per-parameter
gradient clipping, AdamW (betas 0.9/0.95, wd 0.05 with the reference's groups). Median wall time
per step over `--steps` timed steps after `--warmup`.

With `--rust-bin PATH` the script also runs `PATH bench train-step` with the same settings, alternating
the two `--rounds` times, and prints the ratio of the medians (ours / PyTorch). Example:

    python scripts/bench_train_step.py --rust-bin $CARGO_TARGET_DIR/release/droppos-pipeline
"""
import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}


def sincos_2d(dim, grid):
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")

    def e(x):
        out = x.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], 1)

    table = torch.cat([e(cols), e(rows)], 1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float().unsqueeze(0)


def smoothing_map(p, sigma):
    if sigma == 0:
        return torch.eye(p)
    w = int(math.sqrt(p))
    idx = torch.arange(p)
    r, c = idx // w, idx % w
    d = (r[:, None] - r[None]) ** 2 + (c[:, None] - c[None]) ** 2
    weight = torch.exp(-d.double() / sigma**2).float()
    return weight / weight.sum(-1)


class DropPosModel(nn.Module):
    def __init__(self, size, patch, img, dec_dim=512, dec_depth=2, dec_heads=16, mask_ratio=0.75, pos_mask_ratio=0.75):
        super().__init__()
        d, depth, heads = SIZES[size]
        g = img // patch
        self.L, self.d, self.mask_ratio, self.pos_mask_ratio = g * g, d, mask_ratio, pos_mask_ratio
        self.patch_embed = nn.Conv2d(3, d, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.register_buffer("pos_embed", sincos_2d(d, g))
        self.mask_pos_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        norm = lambda n: nn.LayerNorm(n, eps=1e-6)
        ln = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList([Block(d, heads, 4.0, qkv_bias=True, norm_layer=ln) for _ in range(depth)])
        self.norm = norm(d)
        self.decoder_embed = nn.Linear(d, dec_dim)
        self.decoder_blocks = nn.ModuleList([Block(dec_dim, dec_heads, 4.0, qkv_bias=True, norm_layer=ln) for _ in range(dec_depth)])
        self.decoder_norm = norm(dec_dim)
        self.decoder_pred = nn.Linear(dec_dim, self.L)

    def embed(self, x):
        return self.patch_embed(x).flatten(2).transpose(1, 2)

    def encode(self, x):
        for b in self.blocks:
            x = b(x)
        return self.norm(x)

    @staticmethod
    def masking(noise, ratio):
        keep = int(noise.shape[1] * (1 - ratio))
        shuffle = noise.argsort(1)
        restore = shuffle.argsort(1)
        return shuffle[:, :keep], shuffle[:, keep:], restore, restore >= keep

    def forward(self, imgs, smooth):
        n = imgs.shape[0]
        x = self.embed(imgs)
        ids_keep, _, _, _ = self.masking(torch.rand(n, self.L), self.mask_ratio)
        k = ids_keep.shape[1]
        idx = ids_keep.unsqueeze(-1).expand(-1, -1, self.d)
        x = x.gather(1, idx)
        pe_vis = self.pos_embed[:, 1:].expand(n, -1, -1).gather(1, idx)
        keep_pos, _, restore_pos, mask_pos = self.masking(torch.rand(n, k), self.pos_mask_ratio)
        kp = keep_pos.shape[1]
        pe = torch.cat([pe_vis.gather(1, keep_pos.unsqueeze(-1).expand(-1, -1, self.d)), self.mask_pos_token.expand(n, k - kp, -1)], 1)
        pe = pe.gather(1, restore_pos.unsqueeze(-1).expand(-1, -1, self.d))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(n, -1, -1)
        x = torch.cat([cls, x + pe], 1)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.guide_bf16):
            z = self.encode(torch.cat([cls, self.embed(imgs) + self.pos_embed[:, 1:]], 1)).float()
        with torch.no_grad():
            attn = F.softmax(F.cosine_similarity(z[:, :1], z[:, 1:], dim=-1) / 0.1, dim=-1)
            attn = attn.gather(1, ids_keep)
            attn = attn / attn.sum(-1, keepdim=True)
        y = self.decoder_embed(self.encode(x))
        for b in self.decoder_blocks:
            y = b(y)
        logits = self.decoder_pred(self.decoder_norm(y))[:, 1:]
        target = smooth.unsqueeze(0).expand(n, -1, -1).gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, self.L))
        w = mask_pos * attn
        loss = ((-target * F.log_softmax(logits, -1)).sum(-1) * w).sum() / w.sum()
        with torch.no_grad():
            acc1 = ((logits.argmax(-1) == ids_keep) * w).sum() / w.sum()
        return loss, acc1


def python_bench(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = DropPosModel(args.size, args.patch, args.img)
    model.guide_bf16 = args.guide_bf16
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(".bias")]
    opt = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.05}], lr=1.5e-4, betas=(0.9, 0.95))
    smooth = smoothing_map(model.L, args.sigma)
    imgs = torch.randn(args.batch, 3, args.img, args.img)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss, acc1 = model(imgs, smooth)
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():
            if p.grad is not None:
                coef = 5.0 / (p.grad.norm(2) + 1e-6)
                if coef < 1:
                    p.grad.mul_(coef)
        opt.step()
        loss.item()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def rust_bench(args):
    cmd = [args.rust_bin, "bench", "train-step", "--model", f"vit_{args.size}_patch{args.patch}_{args.img}",
           "--batch", str(args.batch), "--threads", str(args.threads), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--sigma", str(args.sigma), "--json"] + args.rust_arg
    if args.guide_bf16:
        cmd.append("--guide-bf16")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES))
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=1, help="alternate PyTorch and ours this many times")
    ap.add_argument("--rust-bin", help="droppos-pipeline binary to compare against")
    ap.add_argument("--guide-bf16", action="store_true", help="run the attention guide's no-grad pass under CPU bf16 autocast (both sides)")
    ap.add_argument("--rust-arg", action="append", default=[], help="extra argument for the Rust bench (repeatable)")
    args = ap.parse_args()
    py, rs = [], []
    for r in range(args.rounds):
        med, _ = python_bench(args)
        py.append(med)
        print(f"round {r}: pytorch {med * 1e3:.1f} ms/step", file=sys.stderr)
        if args.rust_bin:
            res = rust_bench(args)
            rs.append(res["median_ms"] / 1e3)
            print(f"round {r}: ours    {res['median_ms']:.1f} ms/step ({res.get('attention')}, guide {res.get('guide_precision')})", file=sys.stderr)
    result = {"torch": torch.__version__, "threads": args.threads, "batch": args.batch, "guide": "bf16" if args.guide_bf16 else "fp32", "pytorch_median_ms": round(statistics.median(py) * 1e3, 2)}
    if rs:
        result["ours_median_ms"] = round(statistics.median(rs) * 1e3, 2)
        result["ratio_ours_over_pytorch"] = round(statistics.median(rs) / statistics.median(py), 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
