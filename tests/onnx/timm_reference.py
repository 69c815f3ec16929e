"""Make a tiny timm ViT, its safetensors weights and reference outputs (see README.md)."""
import argparse
import json
import os

import numpy as np
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--img", type=int, default=32)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--dim", type=int, default=48)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--mlp-ratio", type=float, default=4.0)
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--classes", type=int, default=0,
                    help="with a head: expected output is `logits` (timm forward)")
    ap.add_argument("--pool", default="token", choices=["token", "avg"])
    ap.add_argument("--no-qkv-bias", action="store_true")
    ap.add_argument("--init-values", type=float, default=None, help="LayerScale (ls1/ls2.gamma)")
    ap.add_argument("--reg-tokens", type=int, default=0)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(a.seed)
    m = VisionTransformer(img_size=a.img, patch_size=a.patch, embed_dim=a.dim, depth=a.depth,
                          num_heads=a.heads, mlp_ratio=a.mlp_ratio, num_classes=a.classes,
                          global_pool=a.pool,
                          qkv_bias=not a.no_qkv_bias, init_values=a.init_values,
                          reg_tokens=a.reg_tokens)
    # Perturb every parameter (LayerNorm 1/0 and zero biases would hide wiring mistakes).
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.eval()
    state = {k: v.contiguous() for k, v in m.state_dict().items()}
    save_file(state, os.path.join(a.out, "vit.safetensors"))
    x = torch.randn(a.batch, 3, a.img, a.img)
    with torch.no_grad():
        y = m.forward_features(x)
        logits = m(x) if a.classes > 0 else None
    g = a.img // a.patch
    if logits is not None:
        outs = {"logits": logits}
    else:
        outs = {
            "cls": y[:, 0],
            "patch_tokens": y[:, m.num_prefix_tokens:],
            "feature_map": y[:, m.num_prefix_tokens:].transpose(1, 2).reshape(a.batch, a.dim, g, g),
        }

    def dump(name, t):
        arr = t.contiguous().numpy().astype("<f4")
        arr.tofile(os.path.join(a.out, name + ".bin"))
        return {"file": name + ".bin", "shape": list(arr.shape), "dtype": "float32"}

    case = {
        "inputs": {"images": dump("images", x)},
        "expected": {k: dump(k, v) for k, v in outs.items()},
        "meta": {"img": a.img, "patch": a.patch, "dim": a.dim, "depth": a.depth,
                 "mlp_ratio": a.mlp_ratio, "heads": a.heads, "batch": a.batch, "classes": a.classes, "pool": a.pool, "timm": __import__("timm").__version__},
    }
    with open(os.path.join(a.out, "case.json"), "w") as f:
        json.dump(case, f)


if __name__ == "__main__":
    main()
