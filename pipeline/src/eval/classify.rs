//! Top-1 / top-5 accuracy of a `classifier` export over labelled shards (the fine-tuning
//! protocol's evaluation: resize to S/0.875, centre crop S, ImageNet normalisation).
//!
//! Labels are the shards' class indices, so the model's classes must be in the shards' class
//! order (torchvision's sorted folder names by default, which is what timm's ImageNet models
//! use).

use std::path::PathBuf;

use anyhow::{bail, Result};
use droppos_model::onnx::classifier_io;
use serde::Serialize;

use super::{for_each_batch_in, model_image_size, FeedConfig, Need};
use crate::ort_runtime::{Input, OrtModel};

/// Classification accuracy.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClassifyResult {
    pub top1: f64,
    pub top5: f64,
    pub images: u64,
    /// The model's number of classes.
    pub num_classes: usize,
    /// Mean over the classes present of their top-1 accuracy.
    pub mean_class_top1: f64,
    pub classes_present: usize,
}

/// Running top-k counts.
#[derive(Debug, Clone)]
pub struct TopKCounter {
    classes: usize,
    images: u64,
    top1: u64,
    top5: u64,
    /// (seen, correct at top-1) per class.
    per_class: Vec<(u64, u64)>,
}

impl TopKCounter {
    pub fn new(classes: usize) -> Self {
        Self {
            classes,
            images: 0,
            top1: 0,
            top5: 0,
            per_class: vec![(0, 0); classes],
        }
    }

    /// Adds a batch of logits ([n, classes] row-major) with their labels. A label outside the
    /// model's classes is an error (the shards do not match the model).
    pub fn add(&mut self, logits: &[f32], labels: &[i64]) -> Result<()> {
        let c = self.classes;
        if logits.len() != labels.len() * c {
            bail!(
                "{} logits for {} images of {c} classes",
                logits.len(),
                labels.len()
            );
        }
        for (row, &label) in logits.chunks_exact(c).zip(labels) {
            if label < 0 || label as usize >= c {
                bail!(
                    "label {label} is outside the model's {c} classes; the shards' classes do \
                     not match the classifier's"
                );
            }
            let y = label as usize;
            // Rank of the true class: how many classes score strictly higher (ties count for
            // the lower index, as a stable descending sort would order them).
            let target = row[y];
            let rank = row
                .iter()
                .enumerate()
                .filter(|&(i, &v)| v > target || (v == target && i < y) || v.is_nan())
                .count();
            self.images += 1;
            self.per_class[y].0 += 1;
            if rank == 0 && !target.is_nan() {
                self.top1 += 1;
                self.per_class[y].1 += 1;
            }
            if rank < 5 && !target.is_nan() {
                self.top5 += 1;
            }
        }
        Ok(())
    }

    pub fn result(&self) -> ClassifyResult {
        let n = self.images.max(1) as f64;
        let present: Vec<f64> = self
            .per_class
            .iter()
            .filter(|(seen, _)| *seen > 0)
            .map(|&(seen, ok)| ok as f64 / seen as f64)
            .collect();
        ClassifyResult {
            top1: self.top1 as f64 / n,
            top5: self.top5 as f64 / n,
            images: self.images,
            num_classes: self.classes,
            mean_class_top1: present.iter().sum::<f64>() / present.len().max(1) as f64,
            classes_present: present.len(),
        }
    }
}

/// The number of classes a `classifier` export predicts.
pub fn class_count(model: &OrtModel) -> Result<usize> {
    match model
        .output_shape(classifier_io::LOGITS)
        .and_then(|s| s.last().copied())
    {
        Some(c) if c > 0 => Ok(c as usize),
        _ => bail!("the model has no `logits` output with a fixed number of classes"),
    }
}

/// Runs the classifier over `dirs` (whose manifests list `listed` classes) and scores it.
pub fn classify(
    model: &mut OrtModel,
    dirs: &[PathBuf],
    listed: usize,
    feed: &FeedConfig,
) -> Result<ClassifyResult> {
    let img = model_image_size(model)?;
    let classes = class_count(model)?;
    let set = super::open_shards(dirs)?;
    super::check_columns(&set, dirs, Need::ClassLabels)?;
    // Labels index the manifests' class list and logits the model's: with another number of
    // classes the two orders cannot be the same (a subset of ImageNet's folders sharded without
    // `--classes` numbers its classes 0..k), and the scores would mean nothing.
    if listed > 0 && listed != classes {
        bail!(
            "the shards in {} list {listed} classes but the classifier predicts {classes}: labels \
             must index the model's classes, so shard the images with the model's class list \
             (e.g. `shard imagenet --classes` with the {classes} class ids in the model's order)",
            super::display_dirs(dirs)
        );
    }
    let mut counter = TopKCounter::new(classes);
    let what = format!("classify {}", super::display_dirs(dirs));
    for_each_batch_in(
        &set,
        dirs,
        img,
        feed,
        Need::ClassLabels,
        &what,
        |images, batch| {
            let n = batch.labels.len();
            let shape = [n as i64, 3, img as i64, img as i64];
            let outs = model.run(
                &[Input::f32(classifier_io::IMAGES, &shape, images)],
                &[classifier_io::LOGITS],
            )?;
            counter.add(&outs[0].data, batch.labels)
        },
    )?;
    Ok(counter.result())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_counts() {
        let mut c = TopKCounter::new(6);
        // label 0 ranked first; label 1 ranked 6th; label 2 ranked 2nd.
        let logits = [
            9.0, 1.0, 2.0, 3.0, 4.0, 5.0, //
            9.0, 0.0, 2.0, 3.0, 4.0, 5.0, //
            1.0, 0.0, 8.0, 9.0, 4.0, 5.0,
        ];
        c.add(&logits, &[0, 1, 2]).unwrap();
        let r = c.result();
        assert_eq!(r.images, 3);
        assert!((r.top1 - 1.0 / 3.0).abs() < 1e-12);
        assert!((r.top5 - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(r.classes_present, 3);
        assert!((r.mean_class_top1 - 1.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn ties_and_nan_do_not_count_as_hits() {
        let mut c = TopKCounter::new(2);
        c.add(&[1.0, 1.0, f32::NAN, 0.0], &[1, 0]).unwrap();
        let r = c.result();
        assert_eq!(r.top1, 0.0);
        assert_eq!(r.top5, 0.5);
    }

    #[test]
    fn labels_outside_the_model_are_errors() {
        let mut c = TopKCounter::new(3);
        let err = c.add(&[0.0; 3], &[3]).unwrap_err().to_string();
        assert!(err.contains("outside the model's 3 classes"), "{err}");
    }
}
