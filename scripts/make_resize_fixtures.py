#!/usr/bin/env python3
"""Reference outputs for the loader's tests, made with Pillow and torchvision (the reference
implementation's augmentation stack). Run from the repo root with the venv (scripts/env.sh):

    python scripts/make_resize_fixtures.py --src IMAGENET_SAMPLE_TRAIN_DIR

--src is an ImageFolder tree holding the source files named in tests/fixtures/loader/PROVENANCE.md
(the EliSchwartz/imagenet-sample-images files in <wnid>/ folders; the repository's own
tests/fixtures/data/imagenet/train lacks some of them). Default: $DROPPOS_SAMPLE_IMAGENET, else
/work/shared/data/imagenet/train (the development machines' copy).

Writes tests/fixtures/loader/:
  images/*          small real ImageNet files copied byte for byte (+ one CMYK JPEG made here)
  ref/*.png         Pillow output for each case (RGB, lossless)
  cases.json        the cases: image, geometry (crop box or eval), output size, reference file
  crop_stats.json   statistics of torchvision's RandomResizedCrop.get_params over many draws
"""
import argparse
import hashlib
import json
import math
import os
import random
import shutil

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

OUT = os.path.join("tests", "fixtures", "loader")

# (file in the ImageNet train folder, why it is here)
IMAGES = [
    ("n01443537/n01443537_goldfish.JPEG", "RGB JPEG, 4:4:4 sampling"),
    ("n02105505/n02105505_komondor.JPEG", "RGB JPEG, 4:2:0 sampling"),
    ("n02100877/n02100877_Irish_setter.JPEG", "RGB JPEG, 4:2:2 sampling"),
    ("n02815834/n02815834_beaker.JPEG", "grayscale JPEG"),
    ("n02105855/n02105855_2933.JPEG", "PNG (RGBA) named .JPEG"),
    ("n01871265/n01871265_tusker.JPEG", "tiny 75x56 JPEG, 4:2:0 (upscaling)"),
    ("n04179913/n04179913_sewing_machine.JPEG",
     "700x500 JPEG: large crops to small outputs take DCT-scaled decoding"),
]


def load_rgb(path):
    # torchvision's ImageFolder default loader.
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default=os.environ.get("DROPPOS_SAMPLE_IMAGENET",
                                                   "/work/shared/data/imagenet/train"))
    args = ap.parse_args()
    os.makedirs(os.path.join(OUT, "images"), exist_ok=True)
    os.makedirs(os.path.join(OUT, "ref"), exist_ok=True)
    names = []
    provenance = []
    for rel, why in IMAGES:
        name = os.path.basename(rel)
        shutil.copyfile(os.path.join(args.src, rel), os.path.join(OUT, "images", name))
        names.append(name)
        provenance.append((name, rel, why))
    # A CMYK JPEG (Pillow writes Adobe-style inverted CMYK), made from the goldfish.
    cmyk = "goldfish_cmyk.jpg"
    load_rgb(os.path.join(OUT, "images", names[0])).convert("CMYK").save(
        os.path.join(OUT, "images", cmyk), quality=90
    )
    names.append(cmyk)
    provenance.append((cmyk, "made here from the goldfish: .convert('CMYK').save(quality=90)", "CMYK JPEG"))

    rng = random.Random(1234)
    cases = []

    def add(name, kind, size, box=None):
        img = load_rgb(os.path.join(OUT, "images", name))
        if kind == "crop":
            i, j, h, w = box
            out = img.crop((j, i, j + w, i + h)).resize((size, size), Image.BICUBIC)
        else:
            t = transforms.Compose(
                [transforms.Resize(int(size / 0.875), interpolation=transforms.InterpolationMode.BICUBIC),
                 transforms.CenterCrop(size)]
            )
            out = t(img)
        ref = f"{len(cases):02d}_{kind}_{size}.png"
        out.save(os.path.join(OUT, "ref", ref))
        cases.append({"image": name, "kind": kind, "size": size, "box": box, "ref": ref})

    for name in names:
        w, h = load_rgb(os.path.join(OUT, "images", name)).size
        # Whole image and random boxes; output sizes below and above the crop (down/upscaling).
        add(name, "crop", 112, [0, 0, h, w])
        for size in (112, 224):
            bw = rng.randint(max(1, w // 5), w)
            bh = rng.randint(max(1, h // 5), h)
            add(name, "crop", size, [rng.randint(0, h - bh), rng.randint(0, w - bw), bh, bw])
        add(name, "eval", 112)
        # Large crop to a small output: the loader may use DCT scaling here.
        add(name, "crop", 48, [h // 16, w // 16, h - h // 8, w - w // 8])
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(cases, f, indent=1)

    # RandomResizedCrop.get_params statistics (torch's generator; ours differs, the law must not).
    torch.manual_seed(0)
    draws = 20000
    stats = []
    for (W, H) in [(500, 375), (375, 500), (250, 340), (1000, 100), (100, 1000), (64, 64)]:
        img = Image.new("L", (W, H))
        fb = transforms.RandomResizedCrop.get_params(img, [1e9, 1e9], [3 / 4, 4 / 3])  # forced fallback
        rows = np.array(
            [transforms.RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(draws)],
            dtype=np.float64,
        )
        i, j, h, w = rows.T
        feats = {
            "i": i, "j": j, "h": h, "w": w,
            "area": h * w / (W * H),
            "log_aspect": np.log(w / h),
        }
        stats.append({
            "width": W, "height": H, "draws": draws,
            "fallback_box": list(fb),
            "fallback_fraction": float(np.mean(np.all(rows == np.array(fb), axis=1))),
            "mean": {k: float(v.mean()) for k, v in feats.items()},
            "std": {k: float(v.std()) for k, v in feats.items()},
        })
    with open(os.path.join(OUT, "crop_stats.json"), "w") as f:
        json.dump(stats, f, indent=1)

    with open(os.path.join(OUT, "PROVENANCE.md"), "w") as f:
        f.write("# Loader fixtures\n\nMade by `scripts/make_resize_fixtures.py` with Pillow "
                f"{Image.__version__ if hasattr(Image, '__version__') else ''} and torchvision "
                f"{__import__('torchvision').__version__}.\n\n"
                "Images are byte-for-byte copies from the project's full sample set (an "
                "ImageFolder tree of the `EliSchwartz/imagenet-sample-images` @ "
                "`bc69043e2862758a1906c6a24a792bb28c6bb2ff` files plus the "
                "`intel-analytics/ipex-llm` (then BigDL) @ "
                "`f4707eaefb41cba343ed44151e7747fff6ae786f` "
                "`spark/dl/src/test/resources/imagenet/` ones; the bundled "
                "`tests/fixtures/data/imagenet/train` lacks some of them) (ImageNet terms: "
                "non-commercial research and education), except the CMYK file, which the script "
                "makes.\n\n| file | source | why |\n|---|---|---|\n")
        for name, src, why in provenance:
            sha = hashlib.sha256(open(os.path.join(OUT, "images", name), "rb").read()).hexdigest()[:16]
            f.write(f"| {name} | {src} | {why} (sha256 {sha}…) |\n")
        f.write("\n`ref/*.png`: `Image.open(f).convert('RGB')` then `crop` + `resize(BICUBIC)` "
                "(kind crop, box = [i, j, h, w]) or torchvision `Resize(int(S/0.875), BICUBIC)` + "
                "`CenterCrop(S)` (kind eval). `crop_stats.json`: 20,000 draws of "
                "`RandomResizedCrop.get_params(img, (0.2, 1.0), (3/4, 4/3))` per image size, "
                "torch seed 0.\n")


if __name__ == "__main__":
    main()
