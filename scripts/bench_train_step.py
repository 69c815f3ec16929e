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
try:
    from timm.models.vision_transformer import Block
except ImportError:  # a bare GPU machine has torch but not timm: the same block, written out

    class Block(nn.Module):
        """timm's pre-norm ViT block (fused scaled-dot-product attention, GELU MLP)."""

        def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=nn.LayerNorm):
            super().__init__()
            self.num_heads = num_heads
            self.norm1 = norm_layer(dim)
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
            self.proj = nn.Linear(dim, dim)
            self.norm2 = norm_layer(dim)
            hidden = int(dim * mlp_ratio)
            self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

        def forward(self, x):
            b, n, c = x.shape
            qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.num_heads, c // self.num_heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
            x = x + self.proj(a)
            return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))

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
        ids_keep, _, _, _ = self.masking(torch.rand(n, self.L, device=imgs.device), self.mask_ratio)
        k = ids_keep.shape[1]
        idx = ids_keep.unsqueeze(-1).expand(-1, -1, self.d)
        x = x.gather(1, idx)
        pe_vis = self.pos_embed[:, 1:].expand(n, -1, -1).gather(1, idx)
        keep_pos, _, restore_pos, mask_pos = self.masking(torch.rand(n, k, device=imgs.device), self.pos_mask_ratio)
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


def step_flops(size, patch, img, batch, dec_dim=512, dec_depth=2, mask_ratio=0.75):
    """Matmul FLOPs of one step (2 per multiply-add; backward = 2x forward, the patch
    embedding's 1x; the guide pass forward only): the convention of `bench train-step`."""
    d, depth, _ = SIZES[size]
    L = (img // patch) ** 2
    k = int(L * (1 - mask_ratio))
    pix = 3 * patch * patch

    def block(t, w):
        return 2 * t * w * (4 * w + 2 * 4 * w) + 4 * t * t * w

    pe = 2 * L * pix * d
    enc = depth * block(k + 1, d)
    dec = 2 * (k + 1) * d * dec_dim + dec_depth * block(k + 1, dec_dim) + 2 * (k + 1) * dec_dim * L
    guide = depth * block(L + 1, d)
    return batch * (guide + pe + enc + dec + pe + 2 * (enc + dec))


def step_matmuls(size, patch, img, batch, dec_dim=512, dec_depth=2, dec_heads=16, mask_ratio=0.75):
    """Every matrix product of one step as (count, m, k, n) for an [m,k] @ [k,n] product: each
    linear layer's forward, and in the masked pass its two backward products (dX = dY W,
    dW = dY^T X); the attention products per head; the patch embedding as a [tokens, 3p^2] @
    [3p^2, D] product (its backward only dW: the images need no gradient)."""
    d, depth, heads = SIZES[size]
    L = (img // patch) ** 2
    k = int(L * (1 - mask_ratio))
    pix = 3 * patch * patch
    out = []

    def linear(m, i, o, grad):
        out.append((1, m, i, o))
        if grad:
            out.append((1, m, o, i))  # dX
            out.append((1, o, m, i))  # dW

    def blocks(t, w, h, nblocks, grad):
        m = batch * t
        hd = w // h
        for _ in range(nblocks):
            linear(m, w, 3 * w, grad)
            linear(m, w, w, grad)
            linear(m, w, 4 * w, grad)
            linear(m, 4 * w, w, grad)
            # q k^T and attn v, per (image, head); backward: 2 products for each
            out.append((batch * h, t, hd, t))
            out.append((batch * h, t, t, hd))
            if grad:
                out.extend([(batch * h, t, t, hd), (batch * h, hd, t, t), (batch * h, t, hd, t), (batch * h, t, t, hd)])

    out.append((1, batch * L, pix, d))  # guide's patch embedding
    blocks(L + 1, d, heads, depth, False)  # the guide pass
    out.append((1, batch * L, pix, d))  # the masked pass's patch embedding (all patches, then gathered)
    out.append((1, d, batch * L, pix))  # its dW
    blocks(k + 1, d, heads, depth, True)
    linear(batch * (k + 1), d, dec_dim, True)
    blocks(k + 1, dec_dim, dec_heads, dec_depth, True)
    linear(batch * (k + 1), dec_dim, L, True)
    return out


def gemm_floor(args):
    """Wall time of the step's matrix products alone (each timed on its own in libtorch with
    `--threads` threads, best of 5 after a warm-up): what no implementation running these
    products in fp32 with these kernels can go below."""
    torch.set_num_threads(args.threads)
    total, flop = 0.0, 0
    for count, m, k, n in step_matmuls(args.size, args.patch, args.img, args.batch):
        a, b = torch.randn(count, m, k), torch.randn(count, k, n)
        f = (lambda: torch.mm(a[0], b[0])) if count == 1 else (lambda: torch.bmm(a, b))
        f()
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - t)
        total += best
        flop += 2 * count * m * k * n
    return total, flop


def python_bench(args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda:
        # What `train` does on CUDA: TF32 matmuls, bf16 autocast around the forward.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = DropPosModel(args.size, args.patch, args.img).to(dev)
    model.guide_bf16 = args.guide_bf16
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(".bias")]
    # The fastest eager optimizer on CUDA (one fused kernel); the reference's loop on CPU.
    opt = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.05}],
                            lr=1.5e-4, betas=(0.9, 0.95), **({"fused": True} if cuda else {}))
    smooth = smoothing_map(model.L, args.sigma).to(dev)
    imgs = torch.randn(args.batch, 3, args.img, args.img, device=dev)
    times = []
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss, acc1 = model(imgs, smooth)
        opt.zero_grad()
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if cuda:
            # Per-parameter clipping without a host round trip per parameter.
            norms = torch.stack(torch._foreach_norm(grads))
            coefs = (5.0 / (norms + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, list(coefs.unbind(0)))
        else:
            for g in grads:
                coef = 5.0 / (g.norm(2) + 1e-6)
                if coef < 1:
                    g.mul_(coef)
        opt.step()
        loss.item()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    mem = None
    if cuda:
        mem = {"max_allocated_mib": torch.cuda.max_memory_allocated() / 2**20,
               "max_reserved_mib": torch.cuda.max_memory_reserved() / 2**20}
    return statistics.median(times), times, mem


def rust_bench(args):
    cmd = [args.rust_bin, "bench", "train-step", "--model", f"vit_{args.size}_patch{args.patch}_{args.img}",
           "--batch", str(args.batch), "--threads", str(args.threads), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--sigma", str(args.sigma), "--device", args.device,
           "--json"] + args.rust_arg
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
    ap.add_argument("--device", default="cpu", help="cpu or cuda (CUDA: bf16 autocast + TF32, fused AdamW, both sides)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="device peak for MFU (default on CUDA: 989.4, the H100/H200 dense bf16 peak)")
    ap.add_argument("--gemm-floor", action="store_true",
                    help="also time the step's matrix products alone (CPU): the floor under any fp32 step with these kernels")
    args = ap.parse_args()
    if args.peak_tflops is None and args.device.startswith("cuda"):
        args.peak_tflops = 989.4
    py, rs, mem, rs_last = [], [], None, None
    for r in range(args.rounds):
        med, _, mem = python_bench(args)
        py.append(med)
        print(f"round {r}: pytorch {med * 1e3:.1f} ms/step", file=sys.stderr)
        if args.rust_bin:
            res = rust_bench(args)
            rs_last = res
            rs.append(res["median_ms"] / 1e3)
            print(f"round {r}: ours    {res['median_ms']:.1f} ms/step ({res.get('attention')}, guide {res.get('guide_precision')})", file=sys.stderr)
    flops = step_flops(args.size, args.patch, args.img, args.batch)
    pmed = statistics.median(py)
    result = {"torch": torch.__version__, "device": args.device, "threads": args.threads, "batch": args.batch,
              "guide": "bf16" if args.guide_bf16 else "fp32", "pytorch_median_ms": round(pmed * 1e3, 2),
              "pytorch_images_per_s": round(args.batch / pmed, 1), "step_tflop": round(flops / 1e12, 6),
              "pytorch_tflops": round(flops / pmed / 1e12, 3)}
    if args.peak_tflops:
        result["pytorch_mfu"] = round(flops / pmed / 1e12 / args.peak_tflops, 4)
    if mem:
        result["pytorch_memory"] = {k: round(v, 1) for k, v in mem.items()}
    if args.gemm_floor:
        floor, mm_flop = gemm_floor(args)
        result["gemm_floor_ms"] = round(floor * 1e3, 1)
        result["gemm_floor_tflop"] = round(mm_flop / 1e12, 6)
        result["gemm_floor_over_pytorch"] = round(floor / pmed, 3)
    if rs:
        rmed = statistics.median(rs)
        result["ours_median_ms"] = round(rmed * 1e3, 2)
        result["ours_images_per_s"] = round(args.batch / rmed, 1)
        result["ratio_ours_over_pytorch"] = round(rmed / pmed, 3)
        result["speedup_ours_vs_pytorch"] = round(pmed / rmed, 3)
        for k in ("step_tflop", "mfu", "memory_mib", "precision", "optimizer"):
            if rs_last and k in rs_last:
                result[f"ours_{k}"] = rs_last[k]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
