//! `droppos-pipeline train`: the loop and its machinery (checkpoints, resume, metrics, signals,
//! plots). Model and optimizer code live in the model crate; batches come from the loader.

// The `train` subcommand is registered once the model and loader crates' APIs are merged;
// until then the loop is exercised by its tests only.
#![allow(dead_code)]

pub mod device;
pub mod droppos_task;
pub mod metrics;
pub mod plot;
pub mod run;
pub mod signals;
pub mod source;
pub mod task;

#[cfg(test)]
mod tests;
