"""Reads shards written by `droppos-pipeline shard` with pyarrow only (no custom code) and
checks every row against the source files. Usage: pyarrow_readback.py DATA_ROOT IMAGENET_OUT
COCO_OUT ADE_OUT. Prints one line per dataset; exits non-zero on the first mismatch."""
import io
import json
import os
import sys

import pyarrow.parquet as pq

data, inet, coco, ade = sys.argv[1:5]


def table(out):
    m = json.load(open(os.path.join(out, "manifest.json")))
    files = [os.path.join(out, s["file"]) for s in m["shards"]]
    rows = []
    for f in files:
        rows.extend(pq.read_table(f).to_pylist())
    assert len(rows) == m["num_rows"], (len(rows), m["num_rows"])
    return m, rows


# ImageNet: labels from synset_words.txt order, bytes unchanged unless converted.
m, rows = table(inet)
wnids = [c["id"] for c in m["classes"]]
converted = {c["key"] for c in m["conversions"]}
for r in rows:
    src = open(os.path.join(data, "imagenet", "train", r["key"]), "rb").read()
    assert r["label"] == wnids.index(r["key"].split("/")[0]), r["key"]
    if r["key"] in converted:
        from PIL import Image
        a = Image.open(io.BytesIO(src)).convert("RGB")
        b = Image.open(io.BytesIO(r["image"]))
        assert b.mode == "RGB" and a.tobytes() == b.tobytes(), r["key"]
    else:
        assert r["image"] == src, r["key"]
print(f"imagenet: {len(rows)} rows ok ({len(converted)} converted)")

# COCO: every image of the json is a row; annotations identical to the json records.
m, rows = table(coco)
j = json.load(open(os.path.join(data, "coco", "annotations", "instances_val2017.json")))
cat_index = {c["id"]: i for i, c in enumerate(sorted(j["categories"], key=lambda c: c["id"]))}
by_name = {r["key"]: r for r in rows}
assert len(by_name) == len(j["images"])
for im in j["images"]:
    r = by_name[im["file_name"]]
    assert r["image_id"] == im["id"] and r["width"] == im["width"] and r["height"] == im["height"]
    want = [a for a in j["annotations"] if a["image_id"] == im["id"]]
    got = r["annotations"]
    assert len(got) == len(want), im["file_name"]
    for g, a in zip(got, want):
        assert g["id"] == a["id"] and g["category_id"] == a["category_id"]
        assert g["category_index"] == cat_index[a["category_id"]]
        assert g["bbox"] == a["bbox"] and g["area"] == a["area"] and g["iscrowd"] == a["iscrowd"]
        seg = a["segmentation"]
        if isinstance(seg, list):
            assert g["polygons"] == seg
        elif isinstance(seg["counts"], list):
            assert g["rle_counts"] == seg["counts"] and g["rle_size"] == seg["size"]
        else:
            assert g["rle_string"] == seg["counts"] and g["rle_size"] == seg["size"]
    assert len(r["patch_labels"]) == -(-r["width"] // 16) * -(-r["height"] // 16)
print(f"coco: {len(rows)} rows ok")

# ADE20K: mask bytes unchanged.
m, rows = table(ade)
root = os.path.join(data, "ade20k", "ADEChallengeData2016")
for r in rows:
    stem = os.path.splitext(os.path.basename(r["key"]))[0]
    mask = open(os.path.join(root, "annotations", "validation", stem + ".png"), "rb").read()
    assert r["mask"] == mask, r["key"]
    assert r["image"] == open(os.path.join(root, r["key"]), "rb").read()
print(f"ade20k: {len(rows)} rows ok")
