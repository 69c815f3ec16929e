//! One writer per run folder: `train` (rank 0) and `finetune` hold an exclusive lock on
//! `RUN/.lock` while they run, so that a second command into the same folder (a `--resume`
//! started while the first run still lives) is refused instead of interleaving checkpoints
//! and metrics with it.

use std::fs::File;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Takes the folder's lock (released when the returned file is dropped, or by the kernel when
/// the process dies). Where the file system has no locks, goes on unlocked.
pub fn lock_run_dir(dir: &Path) -> Result<Option<File>> {
    let path = dir.join(".lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                bail!(
                    "another run is writing to {} (lock {} held); wait for it to end, or stop \
                     it, before resuming",
                    dir.display(),
                    path.display()
                );
            }
            tracing::debug!(error = %e, "no lock on {}: continuing unlocked", path.display());
            return Ok(None);
        }
    }
    Ok(Some(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_a_run_folder_is_refused_until_the_first_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_run_dir(dir.path()).unwrap();
        let e = format!("{:#}", lock_run_dir(dir.path()).unwrap_err());
        assert!(e.contains("another run is writing"), "{e}");
        drop(first);
        assert!(lock_run_dir(dir.path()).is_ok());
    }
}
