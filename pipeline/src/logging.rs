//! Human-readable logs go to stderr through `tracing`; machine-readable metrics are written as
//! JSON lines by the commands themselves, so the two never mix.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub fn init(filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    // Ignore the error of a second initialisation (tests may call this more than once).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        // Colour codes only on a terminal: a log file or a Slurm log gets plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
