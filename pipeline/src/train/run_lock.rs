//! One writer per run folder: `train` (rank 0) and `finetune` hold an exclusive lock on
//! `RUN/.lock` while they run, so that a second command into the same folder (a `--resume`
//! started while the first run still lives) is refused instead of interleaving checkpoints
//! and metrics with it.

use std::fs::File;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Takes the folder's lock ([`droppos_shards::lock::try_lock`]: released when the returned
/// file is dropped, or by the kernel when the process dies; none where the file system has no
/// locks).
pub fn lock_run_dir(dir: &Path) -> Result<Option<File>> {
    let path = dir.join(".lock");
    match droppos_shards::lock::try_lock(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => bail!(
            "another run is writing to {} (lock {} held); wait for it to end, or stop it, \
             before resuming",
            dir.display(),
            path.display()
        ),
        r => r.with_context(|| format!("opening {}", path.display())),
    }
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
