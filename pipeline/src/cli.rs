//! The top level both binaries parse: the global `--log` option and their set of commands.

use clap::{Parser, Subcommand, ValueEnum};
use droppos_shards::OnError;

#[derive(Parser, Debug)]
#[command(name = "droppos-pipeline", bin_name = "droppos-pipeline", version, about, long_about = None)]
pub struct Cli<C: Subcommand> {
    /// Log filter (tracing EnvFilter syntax), e.g. `info`, `debug`, `droppos_shards=trace`.
    #[arg(long, global = true, env = "DROPPOS_LOG", default_value = "info")]
    pub log: String,

    #[command(subcommand)]
    pub command: C,
}

impl<C: Subcommand> Cli<C> {
    /// Parses `args` (program name first), starts logging and returns the command.
    pub fn command_from<I, T>(args: I) -> C
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        default_sigpipe();
        let cli = Self::parse_from(args);
        crate::logging::init(&cli.log);
        cli.command
    }
}

/// A closed output pipe (`droppos-pipeline shard ... | head -1`) ends the process quietly, as
/// it does other command-line tools, instead of a panic in `println!` (Rust ignores SIGPIPE by
/// default). Everything a command writes to disk is crash-safe, so this loses nothing.
fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to the default, before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// `--on-error`: what `shard` does with an input it cannot store, and `bench loader` with a
/// sample it cannot decode (the shards crate's one policy, [`OnError`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnErrorArg {
    /// Go on without it: listed in the manifest's `skipped` (shard), or logged with shard and
    /// key and counted in `skipped` (loader).
    Skip,
    /// Stop with an error naming it.
    Fail,
}

impl From<OnErrorArg> for OnError {
    fn from(a: OnErrorArg) -> Self {
        match a {
            OnErrorArg::Skip => OnError::Skip,
            OnErrorArg::Fail => OnError::Fail,
        }
    }
}
