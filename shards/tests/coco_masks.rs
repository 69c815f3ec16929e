//! COCO masks and patch layouts against pycocotools (`COCO.annToMask`), reference values in
//! tests/fixtures/shards/coco_patch_labels.json (made by make_coco_reference.py there).

mod common;

use std::collections::HashMap;

use common::{data_root, read_all, write};
use droppos_shards::datasets::{coco, Target};
use droppos_shards::patch_layout::annotation_mask;

fn reference() -> serde_json::Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/shards/coco_patch_labels.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn listings() -> Vec<droppos_shards::datasets::Listing> {
    let root = data_root().join("coco");
    ["train2017", "val2017"]
        .iter()
        .map(|s| {
            coco::list(&coco::CocoOptions {
                images: root.join(s),
                annotations: root.join(format!("annotations/instances_{s}.json")),
                split: None,
            })
            .unwrap()
        })
        .collect()
}

#[test]
fn masks_match_pycocotools_pixel_for_pixel() {
    if std::env::var_os("DROPPOS_TEST_DATA").is_some() {
        eprintln!("SKIPPED: the pycocotools reference covers the bundled sample only");
        return;
    }
    let r = reference();
    let mut checked = 0;
    for l in listings() {
        for item in &l.items {
            let Target::Coco { annotations, .. } = &item.target else {
                unreachable!()
            };
            let img = image::image_dimensions(&item.path).unwrap();
            for a in annotations {
                let m = annotation_mask(&a.segmentation, img.1, img.0).unwrap();
                let idx: Vec<u64> = m
                    .iter()
                    .enumerate()
                    .filter(|(_, &on)| on)
                    .map(|(i, _)| i as u64)
                    .collect();
                let want = &r["masks"][a.id.to_string()];
                assert_eq!(idx.len() as u64, want[0].as_u64().unwrap(), "ann {}", a.id);
                assert_eq!(
                    idx.iter().sum::<u64>(),
                    want[1].as_u64().unwrap(),
                    "ann {}",
                    a.id
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 92);
}

#[test]
fn patch_labels_match_pycocotools_reference() {
    if std::env::var_os("DROPPOS_TEST_DATA").is_some() {
        eprintln!("SKIPPED: the pycocotools reference covers the bundled sample only");
        return;
    }
    let r = reference();
    for l in listings() {
        let out = tempfile::tempdir().unwrap();
        write(&l, out.path(), |_| {});
        let (_, rows) = read_all(out.path());
        let want: HashMap<String, Vec<i32>> =
            serde_json::from_value(r["patch_labels"].clone()).unwrap();
        for row in rows {
            assert_eq!(
                row.patch_labels.as_ref(),
                Some(&want[&row.key]),
                "{}",
                row.key
            );
        }
    }
}
