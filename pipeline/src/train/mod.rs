//! `droppos-pipeline train`: the loop and its machinery (checkpoints, resume, metrics, signals,
//! plots). Model and optimizer code live in the model crate; batches come from the loader.

pub mod collective;
pub mod device;
pub mod droppos_task;
pub mod loader_source;
pub mod metrics;
pub mod plot;
pub mod run;
pub mod run_lock;
pub mod signals;
pub mod source;
pub mod task;

#[cfg(test)]
mod tests;
