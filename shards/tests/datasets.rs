//! The three datasets and their quirks, written and read back.

mod common;

use std::collections::HashMap;

use common::{data_root, naive_patch_labels, read_all, write, write_fail};
use droppos_shards::codec;
use droppos_shards::datasets::{ade20k, coco, imagenet};

#[test]
fn imagenet_train_round_trip_with_quirks() {
    let root = data_root().join("imagenet");
    let listing = imagenet::list(&imagenet::ImagenetOptions {
        root: root.join("train"),
        classes: Some(root.join("synset_words.txt")),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(listing.classes.len(), 1000);
    let out = tempfile::tempdir().unwrap();
    let s = write(&listing, out.path(), |o| o.shard_rows = 16);
    let (m, rows) = read_all(out.path());
    assert_eq!(m.split, "train");
    assert_eq!(rows.len(), listing.items.len());
    assert_eq!(m.num_rows as usize, rows.len());
    assert!(m.skipped.is_empty(), "{:?}", m.skipped);
    // Shuffled across shards: not in key order.
    let keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_ne!(keys, sorted);
    let wnid_index: HashMap<String, i32> = m
        .classes
        .iter()
        .map(|c| (c.id.clone(), c.index as i32))
        .collect();
    let mut converted = 0;
    for r in &rows {
        let src = std::fs::read(root.join("train").join(&r.key)).unwrap();
        let wnid = r.key.split('/').next().unwrap();
        assert_eq!(r.label, Some(wnid_index[wnid]), "{}", r.key);
        let px = codec::decode(&r.image, codec::DEFAULT_MAX_PIXELS).unwrap();
        assert_eq!((px.width as i32, px.height as i32), (r.width, r.height));
        if src.starts_with(b"\x89PNG") {
            // The PNG named .JPEG (RGBA) is stored as an RGB PNG of the same pixels.
            converted += 1;
            assert!(r.image.starts_with(b"\x89PNG"));
            let orig = image::load_from_memory(&src).unwrap().into_rgb8();
            assert_eq!(px.channels, 3);
            assert_eq!(px.data, orig.into_raw());
        } else {
            assert_eq!(r.image, src, "{} must be stored byte for byte", r.key);
        }
    }
    assert_eq!(converted, 1);
    assert_eq!(m.conversions.len(), 1);
    assert_eq!(m.conversions[0].from, "png rgba8");
    assert_eq!(s.converted, 1);
    // Quirky names survive.
    for k in [
        "n03992509/n03992509_potter's_wheel.JPEG",
        "n03590841/n03590841_jack-o'-lantern.JPEG",
        "n02951585/n02951585_can_opener.JPEG",
    ] {
        assert!(keys.contains(&k), "{k}");
    }
    // Gray JPEGs stay 1-channel.
    let gray = rows
        .iter()
        .find(|r| r.key == "n15075141/n15075141_13104.JPEG")
        .unwrap();
    assert_eq!(
        codec::decode(&gray.image, codec::DEFAULT_MAX_PIXELS)
            .unwrap()
            .channels,
        1
    );
}

#[test]
fn imagenet_default_order_and_caffe_val_list() {
    let root = data_root().join("imagenet");
    // Default labels: sorted folder names.
    let l = imagenet::list(&imagenet::ImagenetOptions {
        root: root.join("val"),
        ..Default::default()
    })
    .unwrap();
    let ids: Vec<&str> = l.classes.iter().map(|c| c.id.as_str()).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted);
    // Without the class list the 1000-class labels cannot index the 4 folders: an error that
    // says what to pass.
    let e = imagenet::list(&imagenet::ImagenetOptions {
        root: root.join("val"),
        list: Some(root.join("val.txt")),
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("val.txt") && e.contains("--classes"), "{e}");
    // Caffe val.txt: bare names, labels index synset_words.txt.
    let l = imagenet::list(&imagenet::ImagenetOptions {
        root: root.join("val"),
        classes: Some(root.join("synset_words.txt")),
        list: Some(root.join("val.txt")),
        ..Default::default()
    })
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    write(&l, out.path(), |_| {});
    let (m, rows) = read_all(out.path());
    let text = std::fs::read_to_string(root.join("val.txt")).unwrap();
    let want: HashMap<&str, i32> = text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(n, v)| (n, v.parse().unwrap()))
        .collect();
    assert_eq!(rows.len(), want.len());
    for r in &rows {
        let name = r.key.rsplit('/').next().unwrap();
        assert_eq!(r.label, Some(want[name]), "{}", r.key);
        // The labels agree with the folder wnids.
        let wnid = r.key.split('/').next().unwrap();
        assert_eq!(m.classes[want[name] as usize].id, wnid);
    }
}

/// The same val labels from Kaggle's `LOC_val_solution.csv` (ImageIds without extension, the
/// wnid first in PredictionString) and from a list with wnid labels as from Caffe's val.txt.
#[test]
fn imagenet_val_labels_from_kaggle_csv_and_wnid_lists() {
    let root = data_root().join("imagenet");
    let classes = root.join("synset_words.txt");
    let wnids: Vec<String> = std::fs::read_to_string(&classes)
        .unwrap()
        .lines()
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect();
    let text = std::fs::read_to_string(root.join("val.txt")).unwrap();
    let want: Vec<(String, usize)> = text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(n, v)| (n.to_string(), v.parse().unwrap()))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let csv = tmp.path().join("LOC_val_solution.csv");
    let mut body = "ImageId,PredictionString\n".to_string();
    let mut by_wnid = String::new();
    for (name, label) in &want {
        let stem = name.strip_suffix(".JPEG").unwrap();
        let w = &wnids[*label];
        body += &format!("{stem},{w} 10 20 200 220 {w} 5 5 50 60\n");
        by_wnid += &format!("{name} {w}\n");
    }
    std::fs::write(&csv, body).unwrap();
    // A class file saved with a byte-order mark reads the same.
    let classes_bom = tmp.path().join("synset_words_bom.txt");
    let mut bom = "\u{feff}".to_string();
    bom += &std::fs::read_to_string(&classes).unwrap();
    std::fs::write(&classes_bom, bom).unwrap();
    let classes = classes_bom;
    let wnid_list = tmp.path().join("val_wnids.txt");
    std::fs::write(&wnid_list, by_wnid).unwrap();
    for list in [csv, wnid_list.clone()] {
        let l = imagenet::list(&imagenet::ImagenetOptions {
            root: root.join("val"),
            classes: Some(classes.clone()),
            list: Some(list.clone()),
            ..Default::default()
        })
        .unwrap();
        assert!(l.skipped.is_empty(), "{:?}", l.skipped);
        assert_eq!(l.items.len(), want.len());
        for item in &l.items {
            let name = item.key.rsplit('/').next().unwrap();
            let label = want.iter().find(|(n, _)| n == name).unwrap().1 as i32;
            assert!(
                matches!(item.target, droppos_shards::datasets::Target::Label(l) if l == label),
                "{}: {:?} from {}",
                item.key,
                item.target,
                list.display()
            );
        }
    }
    // Files the list leaves out are counted, not silently dropped.
    let text = std::fs::read_to_string(&wnid_list).unwrap();
    let lines: Vec<&str> = text.lines().skip(1).collect();
    let partial = tmp.path().join("partial.txt");
    std::fs::write(&partial, lines.join("\n")).unwrap();
    let l = imagenet::list(&imagenet::ImagenetOptions {
        root: root.join("val"),
        classes: Some(classes.clone()),
        list: Some(partial),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(l.items.len(), want.len() - 1);
    assert_eq!(l.options["unlisted_files"], 1);
    // An unknown label names the problem.
    let bad = tmp.path().join("bad.txt");
    std::fs::write(&bad, "ILSVRC2012_val_00000010.JPEG n99999999\n").unwrap();
    let e = imagenet::list(&imagenet::ImagenetOptions {
        root: root.join("val"),
        classes: Some(classes),
        list: Some(bad),
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("n99999999") && e.contains("class id"), "{e}");
}

#[test]
fn coco_round_trip_keeps_every_annotation() {
    let root = data_root().join("coco");
    for split in ["train2017", "val2017"] {
        let json_path = root.join(format!("annotations/instances_{split}.json"));
        let listing = coco::list(&coco::CocoOptions {
            images: root.join(split),
            annotations: json_path.clone(),
            split: None,
        })
        .unwrap();
        let out = tempfile::tempdir().unwrap();
        write(&listing, out.path(), |o| o.shard_rows = 3);
        let (m, rows) = read_all(out.path());
        assert_eq!(m.split, split);
        assert_eq!(m.classes.len(), 80);
        let j: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&json_path).unwrap()).unwrap();
        let images = j["images"].as_array().unwrap();
        assert_eq!(rows.len(), images.len(), "every listed image is a row");
        let cat_index: HashMap<i64, i32> = m
            .classes
            .iter()
            .map(|c| (c.id.parse().unwrap(), c.index as i32))
            .collect();
        for im in images {
            let name = im["file_name"].as_str().unwrap();
            let r = rows.iter().find(|r| r.key == name).unwrap();
            assert_eq!(r.image_id, im["id"].as_i64());
            assert_eq!(r.width as i64, im["width"].as_i64().unwrap());
            assert_eq!(r.height as i64, im["height"].as_i64().unwrap());
            assert_eq!(r.image, std::fs::read(root.join(split).join(name)).unwrap());
            let want: Vec<&serde_json::Value> = j["annotations"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|a| a["image_id"] == im["id"])
                .collect();
            let got = r.annotations.as_ref().unwrap();
            assert_eq!(got.len(), want.len(), "{name}");
            for (g, a) in got.iter().zip(&want) {
                assert_eq!(g.id, a["id"].as_i64().unwrap());
                assert_eq!(g.category_id as i64, a["category_id"].as_i64().unwrap());
                assert_eq!(
                    g.category_index,
                    cat_index[&a["category_id"].as_i64().unwrap()]
                );
                let bbox: Vec<f64> = a["bbox"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect();
                assert_eq!(g.bbox, bbox);
                assert_eq!(g.area, a["area"].as_f64().unwrap());
                assert_eq!(g.iscrowd as i64, a["iscrowd"].as_i64().unwrap());
                let seg = &a["segmentation"];
                if let Some(polys) = seg.as_array() {
                    let want: Vec<Vec<f64>> = polys
                        .iter()
                        .map(|p| {
                            p.as_array()
                                .unwrap()
                                .iter()
                                .map(|v| v.as_f64().unwrap())
                                .collect()
                        })
                        .collect();
                    assert_eq!(g.polygons.as_ref(), Some(&want));
                    assert!(g.rle_counts.is_none() && g.rle_size.is_none());
                } else {
                    let size: Vec<i32> = seg["size"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_i64().unwrap() as i32)
                        .collect();
                    assert_eq!(g.rle_size.as_ref(), Some(&size));
                    let counts: Vec<i64> = seg["counts"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|v| v.as_i64().unwrap())
                        .collect();
                    assert_eq!(g.rle_counts.as_ref(), Some(&counts));
                    assert!(g.polygons.is_none());
                }
            }
            let pl = r.patch_labels.as_ref().unwrap();
            assert_eq!(
                pl.len(),
                (r.width as usize).div_ceil(16) * (r.height as usize).div_ceil(16)
            );
            if want.is_empty() {
                assert!(pl.iter().all(|&v| v == 0), "no annotations: all background");
            } else {
                assert!(pl.iter().any(|&v| v > 0), "{name}: some foreground patch");
                assert!(pl.iter().all(|v| (0..=80).contains(v)));
            }
        }
    }
}

#[test]
fn ade20k_masks_unchanged_and_patch_layout() {
    let root = data_root().join("ade20k/ADEChallengeData2016");
    let listing = ade20k::list(&ade20k::Ade20kOptions {
        root: root.clone(),
        split: "validation".into(),
    })
    .unwrap();
    assert_eq!(listing.classes.len(), 150);
    assert_eq!(listing.classes[0].id, "1");
    let out = tempfile::tempdir().unwrap();
    write(&listing, out.path(), |o| o.patch_size = 16);
    let (m, rows) = read_all(out.path());
    assert_eq!(rows.len(), listing.items.len());
    assert_eq!(m.patch_size, 16);
    for r in &rows {
        let stem = r.key.rsplit('/').next().unwrap().trim_end_matches(".jpg");
        let mask_src =
            std::fs::read(root.join(format!("annotations/validation/{stem}.png"))).unwrap();
        assert_eq!(r.mask.as_ref(), Some(&mask_src), "mask bytes unchanged");
        assert_eq!(r.image, std::fs::read(root.join(&r.key)).unwrap());
        let mask = image::load_from_memory(&mask_src).unwrap().into_luma8();
        assert_eq!(
            (mask.width() as i32, mask.height() as i32),
            (r.width, r.height)
        );
        let want = naive_patch_labels(mask.as_raw(), r.width as usize, r.height as usize, 16);
        assert_eq!(r.patch_labels.as_ref(), Some(&want), "{}", r.key);
    }
}

#[test]
fn missing_annotation_png_is_skipped_and_unreadable_roots_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("ADE");
    std::fs::create_dir_all(root.join("images/validation/sub")).unwrap();
    std::fs::create_dir_all(root.join("annotations/validation/sub")).unwrap();
    std::fs::write(root.join("images/validation/ADE_val_1.jpg"), b"x").unwrap();
    std::fs::write(root.join("images/validation/Thumbs.db"), b"x").unwrap();
    // An image in a subfolder pairs with the annotation in the same subfolder.
    std::fs::write(root.join("images/validation/sub/ADE_val_2.jpg"), b"x").unwrap();
    std::fs::write(root.join("annotations/validation/sub/ADE_val_2.png"), b"x").unwrap();
    // An annotation without its image is listed too.
    std::fs::write(root.join("annotations/validation/ADE_val_3.png"), b"x").unwrap();
    let l = ade20k::list(&ade20k::Ade20kOptions {
        root: root.clone(),
        split: "validation".into(),
    })
    .unwrap();
    let keys: Vec<&str> = l.items.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(keys, ["images/validation/sub/ADE_val_2.jpg"]);
    let reasons: HashMap<&str, &str> = l
        .skipped
        .iter()
        .map(|e| (e.path.as_str(), e.reason.as_str()))
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert_eq!(
        reasons["annotations/validation/ADE_val_3.png"],
        "annotation without an image"
    );
    assert!(
        reasons["images/validation/ADE_val_1.jpg"].contains("annotations/validation/ADE_val_1.png"),
        "{reasons:?}"
    );
    assert!(reasons["images/validation/Thumbs.db"].contains("no annotation PNG"));
    // Under --on-error fail, inputs refused while listing stop the run before anything is
    // written, naming the first of them.
    let out = tmp.path().join("out");
    let err = write_fail(&l, &out, |_| {});
    assert!(err.to_string().contains("--on-error fail"), "{err}");
    assert!(
        l.skipped.iter().any(|e| err.to_string().contains(&e.path)),
        "{err}"
    );
    assert!(!out.join("manifest.json").exists());
    let err = imagenet::list(&imagenet::ImagenetOptions {
        root: tmp.path().join("nope"),
        ..Default::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
    let bad_json = tmp.path().join("instances_x.json");
    std::fs::write(&bad_json, b"{\"images\": [").unwrap();
    let err = coco::list(&coco::CocoOptions {
        images: tmp.path().to_path_buf(),
        annotations: bad_json,
        split: None,
    })
    .unwrap_err();
    assert!(err.to_string().contains("instances_x.json"), "{err}");
}

#[test]
fn lvis_and_objects365_style_json_is_read() {
    // LVIS v1: images with only `coco_url` (the `split/name` is used when it exists under the
    // image folder, else the name), annotations without `iscrowd`; Objects365: boxes only.
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("coco");
    std::fs::create_dir_all(images.join("val2017")).unwrap();
    std::fs::write(images.join("val2017/000000000001.jpg"), b"x").unwrap();
    std::fs::write(images.join("000000000002.jpg"), b"x").unwrap();
    let json = tmp.path().join("lvis_v1_val.json");
    std::fs::write(
        &json,
        r#"{"images": [
            {"id": 1, "coco_url": "http://images.cocodataset.org/val2017/000000000001.jpg"},
            {"id": 2, "coco_url": "http://images.cocodataset.org/train2017/000000000002.jpg"},
            {"id": 3, "file_name": "000000000003.jpg"}],
          "annotations": [
            {"id": 7, "image_id": 1, "category_id": 5, "bbox": [1, 2, 3, 4], "area": 12,
             "segmentation": [[1, 2, 4, 2, 4, 6]]},
            {"id": 8, "image_id": 2, "category_id": 5, "bbox": [0, 0, 2, 2], "area": 4}],
          "categories": [{"id": 5, "name": "thing"}]}"#,
    )
    .unwrap();
    let l = coco::list(&coco::CocoOptions {
        images: images.clone(),
        annotations: json.clone(),
        split: None,
    })
    .unwrap();
    let keys: Vec<&str> = l.items.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(keys, ["000000000002.jpg", "val2017/000000000001.jpg"]);
    assert_eq!(l.skipped.len(), 1);
    assert_eq!(l.skipped[0].path, "000000000003.jpg");
    let anns: Vec<&coco::CocoAnnotation> = l
        .items
        .iter()
        .flat_map(|i| match &i.target {
            droppos_shards::datasets::Target::Coco { annotations, .. } => annotations.iter(),
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(anns.len(), 2);
    assert!(anns.iter().all(|a| a.iscrowd == 0));
    let boxes_only = anns.iter().find(|a| a.id == 8).unwrap();
    assert_eq!(
        boxes_only.segmentation,
        coco::Segmentation::Polygons(vec![])
    );
    // An image with neither name is an error naming the json.
    std::fs::write(
        &json,
        r#"{"images": [{"id": 1}], "annotations": [], "categories": []}"#,
    )
    .unwrap();
    let err = coco::list(&coco::CocoOptions {
        images,
        annotations: json,
        split: None,
    })
    .unwrap_err();
    assert!(err.to_string().contains("lvis_v1_val.json"), "{err}");
    assert!(err.to_string().contains("coco_url"), "{err}");
}

/// A `file_name` that is absolute, climbs out through `..` or is empty would read some other
/// file into the shards: an error naming the json, the image id and the name.
#[test]
fn coco_file_names_must_stay_inside_the_image_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    std::fs::create_dir_all(images.join("sub")).unwrap();
    std::fs::write(tmp.path().join("outside.jpg"), b"x").unwrap();
    std::fs::write(images.join("sub/ok.jpg"), b"x").unwrap();
    let json = tmp.path().join("instances_x.json");
    let outside = tmp.path().join("outside.jpg");
    let write = |name: &str| {
        let doc = serde_json::json!({
            "images": [{"id": 1, "file_name": "sub/ok.jpg"}, {"id": 9, "file_name": name}],
            "annotations": [], "categories": []
        });
        std::fs::write(&json, doc.to_string()).unwrap();
    };
    let list = || {
        coco::list(&coco::CocoOptions {
            images: images.clone(),
            annotations: json.clone(),
            split: None,
        })
    };
    for (name, why) in [
        ("../outside.jpg", ".."),
        ("sub/../../outside.jpg", ".."),
        (outside.to_str().unwrap(), "absolute"),
        ("", "empty"),
    ] {
        write(name);
        let err = list().map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("instances_x.json"), "{err}");
        assert!(err.contains("image 9"), "{err}");
        assert!(err.contains(why), "{name:?}: {err}");
    }
    // Relative names with sub-folders and `./` are fine.
    write("./sub/ok.jpg");
    let l = list().unwrap();
    assert_eq!(l.items.len(), 2);
}

/// Listing edge cases of a tree on disk: a link back to a containing folder is not followed
/// (one row, not one per loop), a name that is not UTF-8 is skipped with its reason (a lossy key
/// would name no file), `--root .` still names the split, and a blank line between classes in
/// a class file is an error (labels are line numbers).
#[cfg(unix)]
#[test]
fn imagenet_listing_links_odd_names_dot_root_and_blank_class_lines() {
    use std::os::unix::ffi::OsStrExt;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("train");
    // Any sample image: the bytes do not matter to the listing.
    let first_in = |d: std::path::PathBuf| {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v.remove(0)
    };
    let jpeg = std::fs::read(first_in(first_in(data_root().join("imagenet/train")))).unwrap();
    for class in ["a", "b"] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        std::fs::write(root.join(class).join("x.JPEG"), &jpeg).unwrap();
    }
    // Two loops: followed blindly, the walk branches without end.
    std::os::unix::fs::symlink("..", root.join("b/l1")).unwrap();
    std::os::unix::fs::symlink("..", root.join("b/l2")).unwrap();
    let odd = std::ffi::OsStr::from_bytes(b"bad\xffname.JPEG");
    std::fs::write(root.join("a").join(odd), &jpeg).unwrap();
    let l = imagenet::list(&imagenet::ImagenetOptions {
        root: root.clone(),
        ..Default::default()
    })
    .unwrap();
    let keys: Vec<&str> = l.items.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(keys, ["a/x.JPEG", "b/x.JPEG"]);
    assert_eq!(l.skipped.len(), 1, "{:?}", l.skipped);
    assert!(l.skipped[0].reason.contains("UTF-8"), "{:?}", l.skipped);

    let l = imagenet::list(&imagenet::ImagenetOptions {
        root: root.join("a").join(".."),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(l.split, "train");

    let classes = tmp.path().join("classes.txt");
    std::fs::write(&classes, "a first\n\nb second\n\n").unwrap();
    let err = imagenet::list(&imagenet::ImagenetOptions {
        root: root.clone(),
        classes: Some(classes.clone()),
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("classes.txt") && err.contains("line 2"),
        "{err}"
    );
    // Blank lines at the end are harmless.
    std::fs::write(&classes, "a first\nb second\n\n\n").unwrap();
    let l = imagenet::list(&imagenet::ImagenetOptions {
        root,
        classes: Some(classes),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(l.classes.len(), 2);
}
