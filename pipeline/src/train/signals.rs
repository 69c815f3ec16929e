//! SIGINT/SIGTERM become a flag the loop checks between optimizer steps, so it can checkpoint
//! and exit cleanly instead of dying mid-write.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};

/// Set once SIGINT or SIGTERM arrives.
#[derive(Clone, Default)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    /// Registers the process's SIGINT and SIGTERM handlers to raise this flag. A second signal
    /// of the same kind while stopping terminates immediately (the usual double Ctrl-C escape).
    pub fn install() -> Result<Self> {
        let flag = Self::default();
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&flag.0))
                .context("installing the signal handler")?;
            signal_hook::flag::register(sig, Arc::clone(&flag.0))
                .context("installing the signal handler")?;
        }
        Ok(flag)
    }

    pub fn is_raised(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Raises the flag as a signal would (tests simulate SIGINT with it).
    #[cfg(test)]
    pub fn raise(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}
