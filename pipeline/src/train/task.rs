//! What the loop trains: a model plus its optimizer, behind a small interface so the loop's
//! checkpoint/resume/metrics machinery is independent of the model code.

use std::collections::HashMap;

use anyhow::Result;
use droppos_model::trainer::SampleNoise;
use tch::Tensor;

/// Result of one forward pass.
pub struct Forward {
    /// Scalar loss with its autograd graph (backward is the loop's job, after the finite check).
    pub loss: Tensor,
    /// Position accuracy (acc1) of this micro-batch, in [0, 1].
    pub acc1: f64,
}

/// A pre-training task: forward, optimizer step, and its state as named tensors.
pub trait PretrainTask {
    /// Forward on one micro-batch of normalised images [B,3,S,S] on the task's device.
    /// Masking noise must come from `noise` (per sample, keyed by position) so that a resumed
    /// run, or the same batch split over ranks, draws the same masks.
    fn forward(&mut self, images: &Tensor, noise: &SampleNoise, sigma: f64) -> Result<Forward>;

    /// The parameters that receive gradients (what data-parallel training averages).
    fn trainable_parameters(&self) -> Vec<Tensor>;

    /// Clips, applies one optimizer step at learning rate `lr`, and zeroes the gradients.
    /// Returns false, leaving the weights and optimizer state as they were, when a gradient is
    /// not finite (a finite loss can still overflow in the backward pass).
    fn optimizer_step(&mut self, lr: f64) -> Result<bool>;

    /// Zeroes accumulated gradients (e.g. a partial window that will not be stepped).
    fn zero_grad(&mut self);

    /// Model weights under the reference parameter names (what `model.safetensors` holds).
    fn model_tensors(&self) -> Vec<(String, Tensor)>;

    /// String metadata stored with the weights (the model configuration as JSON), so that the
    /// checkpoint describes itself to `export` and other tools.
    fn model_metadata(&self) -> HashMap<String, String> {
        HashMap::new()
    }

    /// Optimizer state (moments, step counts) as named tensors.
    fn optimizer_tensors(&self) -> Vec<(String, Tensor)>;

    /// Restores weights and optimizer state from a checkpoint.
    fn load(&mut self, model: &[(String, Tensor)], optimizer: &[(String, Tensor)]) -> Result<()>;
}
