//! Evaluation of exported ONNX models with ONNX Runtime over shard directories.
//!
//! Images come from the shards through the loader's evaluation transform (resize + centre crop,
//! ImageNet normalisation, manifest order); features come from the `encoder` export, position
//! predictions from the `droppos` export, class predictions from the `classifier` export. The
//! probes themselves are in [`knn`], [`linear`] and [`dense`]; [`position`] scores the pre-text
//! task and [`classify`] a fine-tuned classifier.

pub mod classify;
pub mod dense;
pub mod knn;
pub mod linear;
pub mod position;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use droppos_model::onnx::{classifier_io, droppos_io, encoder_io};
use droppos_shards::loader::{Images, Loader, LoaderConfig, PixelFormat, ShardSet, SkippedSample};
use droppos_shards::manifest::{merge_class_lists, Manifest};
use indicatif::{ProgressBar, ProgressStyle};

use crate::ort_runtime::{Input, OrtModel};

/// How images are fed to a model.
#[derive(Debug, Clone)]
pub struct FeedConfig {
    pub batch_size: usize,
    /// Loader decode threads.
    pub loader_threads: usize,
    /// Stop after this many images (all when None).
    pub limit: Option<u64>,
    pub progress: bool,
    /// Samples skipped as undecodable so far (shared by clones, so that a command reports the
    /// total over every pass it makes).
    pub skipped: Arc<AtomicU64>,
}

/// Encoder outputs for a set of images.
#[derive(Debug, Clone, Default)]
pub struct Features {
    pub dim: usize,
    pub num_patches: usize,
    /// [n, dim]
    pub cls: Vec<f32>,
    /// [n, L, dim] when requested.
    pub patches: Vec<f32>,
    pub labels: Vec<i64>,
    /// [n, L] when patch labels were requested.
    pub patch_labels: Vec<i32>,
}

/// The export an evaluation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// `export --what encoder`: images -> cls, patch_tokens, feature_map.
    Encoder,
    /// `export --what droppos`: images, ids_keep, mask_pos -> position_logits.
    Droppos,
    /// `export --what classifier`: images -> logits.
    Classifier,
}

/// Fails with a clear message when `model` is not the `kind` of export an evaluation needs.
pub fn check_model_kind(model: &OrtModel, path: &Path, kind: ModelKind) -> Result<()> {
    let outputs = model.output_names();
    let has = |n: &str| outputs.iter().any(|o| o == n);
    let (wanted, flag) = match kind {
        ModelKind::Encoder => (encoder_io::CLS, "encoder"),
        ModelKind::Droppos => (droppos_io::LOGITS, "droppos"),
        ModelKind::Classifier => (classifier_io::LOGITS, "classifier"),
    };
    if !has(wanted) {
        let seems = if has(droppos_io::LOGITS) {
            "a `droppos` export"
        } else if has(classifier_io::LOGITS) {
            "a `classifier` export"
        } else if has(encoder_io::CLS) {
            "an `encoder` export"
        } else {
            "not an export of droppos-pipeline"
        };
        bail!(
            "{} has no `{wanted}` output (it looks like {seems}); this evaluation needs \
             `droppos-pipeline export --what {flag}`",
            path.display()
        );
    }
    let inputs = model.input_names();
    let expected: &[&str] = match kind {
        ModelKind::Encoder => &[encoder_io::IMAGES],
        ModelKind::Classifier => &[classifier_io::IMAGES],
        ModelKind::Droppos => &[
            droppos_io::IMAGES,
            droppos_io::IDS_KEEP,
            droppos_io::MASK_POS,
        ],
    };
    if let Some(missing) = expected.iter().find(|n| !inputs.iter().any(|i| i == *n)) {
        bail!(
            "{} has no `{missing}` input (inputs: {inputs:?}); export it with \
             `droppos-pipeline export --what {flag}`",
            path.display()
        );
    }
    Ok(())
}

/// What an evaluation needs from the shards besides images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Images,
    /// A class label per image (ImageNet shards).
    ClassLabels,
    /// Patch labels (COCO, ADE20K shards).
    PatchLabels,
}

pub fn check_columns(set: &ShardSet, dirs: &[PathBuf], need: Need) -> Result<()> {
    let cols = set.columns();
    match need {
        Need::ClassLabels if !cols.label => bail!(
            "the shards in {} do not all have class labels (COCO / ADE20K shards?); this \
             evaluation needs labelled ImageNet-style shards (use `eval dense` for patch labels)",
            display_dirs(dirs)
        ),
        Need::PatchLabels if !cols.patch_labels => bail!(
            "the shards in {} do not all have patch_labels; dense evaluation needs COCO or \
             ADE20K shards",
            display_dirs(dirs)
        ),
        _ => Ok(()),
    }
}

/// Labels as class indices (after [`Need::ClassLabels`] was checked; stray -1s become errors
/// upstream, see [`extract_features`]).
pub fn class_indices(labels: &[i64]) -> Vec<usize> {
    labels.iter().map(|&l| l.max(0) as usize).collect()
}

/// One more than the largest class index of either set.
pub fn num_classes(a: &[usize], b: &[usize]) -> usize {
    a.iter().chain(b).max().map_or(0, |m| m + 1)
}

/// Most classes a label space may have when the manifests list none (the scores allocate per
/// class, the dense confusion matrix per class pair).
const MAX_UNLISTED_CLASSES: usize = 1 << 16;

/// The label space of an evaluation: the manifests' class list (`listed`), which every label
/// (`needed` = the largest + 1) must fall in; without a list, what the labels reach, bounded. A
/// label beyond the list is a shard that does not match its manifest (it would also size the
/// scores' buffers: 2^31 asked for tens of GB).
pub fn label_space(listed: usize, needed: usize, what: &str) -> Result<usize> {
    if listed > 0 && needed > listed {
        bail!(
            "{what} reach class {} but the manifests list {listed} classes; the shards do not \
             match their manifest (`verify --decode` names the rows)",
            needed - 1
        );
    }
    if listed == 0 && needed > MAX_UNLISTED_CLASSES {
        bail!(
            "{what} reach class {} and the manifests list no classes; refusing a label space \
             beyond {MAX_UNLISTED_CLASSES}",
            needed - 1
        );
    }
    Ok(listed.max(needed))
}

pub fn progress_bar(len: u64, what: &str, enabled: bool) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let pb = crate::progress::bar(Some(len));
    pb.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} images {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// The per-sample data of one batch (its first `n` samples).
#[derive(Debug, Clone, Copy)]
pub struct BatchView<'a> {
    /// Class index per sample (-1 without one).
    pub labels: &'a [i64],
    /// [n, L] patch labels of dense datasets.
    pub patch_labels: Option<&'a [i32]>,
}

/// Streams the evaluation transform (resize + centre crop) of `dirs` at `img_size` in manifest
/// order and calls `f` on every batch (images as normalised f32 NCHW). Returns the image count.
pub fn for_each_batch(
    dirs: &[PathBuf],
    img_size: usize,
    feed: &FeedConfig,
    need: Need,
    what: &str,
    f: impl FnMut(&[f32], BatchView<'_>) -> Result<()>,
) -> Result<u64> {
    let set = open_shards(dirs)?;
    for_each_batch_in(&set, dirs, img_size, feed, need, what, f)
}

/// Opens `dirs` as one shard set, in manifest order.
pub fn open_shards(dirs: &[PathBuf]) -> Result<Arc<ShardSet>> {
    Ok(Arc::new(ShardSet::open(dirs, false).with_context(
        || format!("opening shards {}", display_dirs(dirs)),
    )?))
}

/// [`for_each_batch`] over a shard set already open (`dirs` names it in messages), for callers
/// that evaluate the same shards repeatedly.
pub fn for_each_batch_in(
    set: &Arc<ShardSet>,
    dirs: &[PathBuf],
    img_size: usize,
    feed: &FeedConfig,
    need: Need,
    what: &str,
    mut f: impl FnMut(&[f32], BatchView<'_>) -> Result<()>,
) -> Result<u64> {
    check_columns(set, dirs, need)?;
    let total = feed
        .limit
        .map_or(set.num_samples(), |l| l.min(set.num_samples()));
    // The loader allocates whole batches: no larger than the images there are.
    let batch_size = feed.batch_size.min(total.max(1) as usize);
    let mut cfg = LoaderConfig::eval(img_size, batch_size);
    cfg.pixel_format = PixelFormat::F32Normalized;
    cfg.threads = feed.loader_threads.max(1);
    let loader = Loader::new(set.clone(), cfg)
        .with_context(|| format!("the model's {img_size}px input and {}", display_dirs(dirs)))?;
    let pb = progress_bar(total, what, feed.progress);
    let per = 3 * img_size * img_size;
    let mut seen = 0u64;
    let mut epoch = loader.epoch(0, 0)?;
    for batch in epoch.by_ref() {
        let batch = batch?;
        note_skipped(&batch.skipped, &feed.skipped);
        let Images::F32(images) = &batch.images else {
            bail!("the loader returned u8 images for an f32 request");
        };
        let take = (total - seen).min(batch.len() as u64) as usize;
        if take == 0 {
            break;
        }
        let patch_labels = batch.patch_labels.as_deref().map(|p| {
            let per_image = p.len() / batch.len().max(1);
            &p[..take * per_image]
        });
        let view = BatchView {
            labels: &batch.labels[..take],
            patch_labels,
        };
        if need == Need::ClassLabels && view.labels.iter().any(|&l| l < 0) {
            bail!(
                "the shards in {} hold images without a class label; k-NN, linear probes and classify need \
                 every image labelled",
                display_dirs(dirs)
            );
        }
        f(&images[..take * per], view)?;
        seen += take as u64;
        pb.set_position(seen);
        if seen >= total {
            break;
        }
    }
    pb.finish_and_clear();
    if seen < total {
        // Only skips can leave the epoch short of the images asked for.
        note_skipped(&epoch.skipped_after_last_batch(), &feed.skipped);
    }
    if seen == 0 {
        bail!("no images in {}", display_dirs(dirs));
    }
    Ok(seen)
}

/// Counts the undecodable samples the loader skipped (it logs each itself).
fn note_skipped(skipped: &[SkippedSample], count: &AtomicU64) {
    count.fetch_add(skipped.len() as u64, Ordering::Relaxed);
}

/// Refuses shard folders (of one set, or a train and a val set) whose manifests give a label
/// two meanings: a probe trained on one class order and scored on another measures nothing.
/// Returns the number of classes the manifests list (0 when none lists any).
pub fn check_label_meanings(sets: &[&[PathBuf]]) -> Result<usize> {
    let manifests = sets
        .iter()
        .flat_map(|dirs| dirs.iter())
        .map(|d| {
            Manifest::load(d)
                .map(|m| (d, m))
                .with_context(|| format!("reading the manifest of {}", d.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let merged = merge_class_lists(
        manifests
            .iter()
            .map(|(d, m)| (d.as_path(), m.classes.as_slice())),
    )
    .map_err(anyhow::Error::msg)?;
    Ok(merged.len())
}

pub fn display_dirs(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The square input size a model expects (its `images` input's last axis).
pub fn model_image_size(model: &OrtModel) -> Result<usize> {
    let shape = model
        .input_shape(encoder_io::IMAGES)
        .context("the model has no `images` input")?;
    match shape.as_slice() {
        [_, 3, h, w] if *h > 0 && h == w => Ok(*h as usize),
        _ => bail!("the model's `images` input is {shape:?}, expected [N, 3, S, S] with a fixed S"),
    }
}

/// The number of positions L a `droppos` export predicts.
pub fn position_count(model: &OrtModel) -> Result<i64> {
    model
        .output_shape(droppos_io::LOGITS)
        .and_then(|s| s.last().copied())
        .filter(|&l| l > 0)
        .context("the model has no `position_logits` output with a fixed size")
}

/// Runs the encoder export over `dirs`: cls features, plus patch tokens and patch labels with
/// [`Need::PatchLabels`].
pub fn extract_features(
    model: &mut OrtModel,
    dirs: &[PathBuf],
    feed: &FeedConfig,
    need: Need,
) -> Result<Features> {
    let img = model_image_size(model)?;
    let patches = need == Need::PatchLabels;
    let wanted: &[&str] = if patches {
        &[encoder_io::CLS, encoder_io::PATCH_TOKENS]
    } else {
        &[encoder_io::CLS]
    };
    let mut out = Features::default();
    let what = format!("features of {}", display_dirs(dirs));
    for_each_batch(dirs, img, feed, need, &what, |images, batch| {
        let n = batch.labels.len();
        let shape = [n as i64, 3, img as i64, img as i64];
        let outs = model.run(&[Input::f32(encoder_io::IMAGES, &shape, images)], wanted)?;
        out.dim = outs[0].shape.last().copied().unwrap_or(0) as usize;
        out.cls.extend_from_slice(&outs[0].data);
        if patches {
            out.num_patches = outs[1].shape.get(1).copied().unwrap_or(0) as usize;
            out.patches.extend_from_slice(&outs[1].data);
            let pl = batch.patch_labels.unwrap_or(&[]);
            if pl.len() != n * out.num_patches {
                bail!(
                    "the patch grid of {} ({} labels per image) does not match the model's {} \
                     patches at {img}px; shard with the model's patch size",
                    display_dirs(dirs),
                    pl.len() / n.max(1),
                    out.num_patches
                );
            }
            out.patch_labels.extend_from_slice(pl);
        }
        out.labels.extend_from_slice(batch.labels);
        Ok(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Labels beyond the manifests' class list are an error, not a label space sized by them
    /// (2^31 asked for tens of GB); without a list the labels decide, bounded.
    #[test]
    fn label_space_is_the_class_list() {
        assert_eq!(label_space(1000, 5, "labels").unwrap(), 1000);
        assert!(label_space(1000, 1001, "labels")
            .unwrap_err()
            .to_string()
            .contains("reach class 1000 but the manifests list 1000"));
        assert_eq!(label_space(0, 7, "labels").unwrap(), 7);
        assert!(label_space(0, 1 << 31, "labels").is_err());
    }
}
