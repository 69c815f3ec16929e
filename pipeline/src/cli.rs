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

/// The most threads a command-line or recipe count may ask for.
pub const MAX_THREADS: usize = 1024;

/// clap value parser of a thread count: 0..=[`MAX_THREADS`] (0 means the default where an
/// option says so). A mistyped 100000 started that many threads and hung.
pub fn thread_count(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|e| format!("{e}"))?;
    if n > MAX_THREADS {
        return Err(format!("at most {MAX_THREADS}"));
    }
    Ok(n)
}

/// The error `main` returns: printed as `Error: ...` with its causes, like anyhow's, but
/// without the causes a message above already quotes (our typed errors put their source's text
/// into their own message, so anyhow's list repeated each OS error once more).
pub struct Report(anyhow::Error);

impl<E: Into<anyhow::Error>> From<E> for Report {
    fn from(e: E) -> Self {
        Report(e.into())
    }
}

impl std::fmt::Debug for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let causes = distinct_causes(&self.0);
        write!(f, "{}", causes[0])?;
        if causes.len() > 1 {
            write!(f, "\n\nCaused by:")?;
            for (i, c) in causes[1..].iter().enumerate() {
                if causes.len() > 2 {
                    write!(f, "\n    {i}: {c}")?;
                } else {
                    write!(f, "\n    {c}")?;
                }
            }
        }
        let bt = self.0.backtrace();
        if bt.status() == std::backtrace::BacktraceStatus::Captured {
            write!(f, "\n\nStack backtrace:\n{bt}")?;
        }
        Ok(())
    }
}

/// A libtorch error's message without the C++ stack trace it carries (`Exception raised
/// from ...` and `frame #N: ...` lines), which says nothing to a user.
fn without_cxx_trace(m: &str) -> String {
    let cut = ["\nException raised from", "\nframe #0"]
        .iter()
        .filter_map(|p| m.find(p))
        .min()
        .unwrap_or(m.len());
    m[..cut].trim_end().to_string()
}

/// The error's chain of messages, dropping each one an earlier message already contains.
fn distinct_causes(e: &anyhow::Error) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for m in e.chain().map(|c| without_cxx_trace(&c.to_string())) {
        if !out.iter().any(|o| o.contains(&m)) {
            out.push(m);
        }
    }
    out
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

#[cfg(test)]
mod report_tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn causes_quoted_above_are_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let typed = droppos_shards::ShardError::io("/x/manifest.json", io);
        let e = Err::<(), _>(typed).context("verify /x failed").unwrap_err();
        // (RUST_BACKTRACE may add a backtrace after the causes)
        let shown = |r: Report| {
            let text = format!("{r:?}");
            text.split("\n\nStack backtrace:")
                .next()
                .unwrap()
                .to_string()
        };
        let text = shown(Report(e));
        assert_eq!(
            text,
            "verify /x failed\n\nCaused by:\n    /x/manifest.json: No such file"
        );
        let torch =
            "Internal torch error: bad size\nException raised from f at x.cpp:1\nframe #0: g";
        let e = anyhow::anyhow!("{torch}").context("reading w.safetensors");
        assert_eq!(
            shown(Report(e)),
            "reading w.safetensors\n\nCaused by:\n    Internal torch error: bad size"
        );
        let e = anyhow::anyhow!("inner").context("middle").context("outer");
        assert_eq!(
            shown(Report(e)),
            "outer\n\nCaused by:\n    0: middle\n    1: inner"
        );
    }
}
