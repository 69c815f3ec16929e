//! Exclusive advisory locks on output folders (one writer per folder): `shard` takes one per
//! worker in `OUT/.progress`, `train` and `finetune` one per run folder.

use std::fs::File;
use std::path::Path;

/// Opens (creating) `path` and takes an exclusive lock on it without waiting. `Ok(Some(file))`:
/// held until the file is dropped, or the process dies. `Ok(None)`: the file system offers no
/// locks (some network file systems), so the caller goes on unlocked. An error of kind
/// [`std::io::ErrorKind::WouldBlock`]: another process holds it.
pub fn try_lock(path: &Path) -> std::io::Result<Option<File>> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall on an fd we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                return Err(e);
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

    #[cfg(unix)]
    #[test]
    fn a_held_lock_is_refused_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let first = try_lock(&path).unwrap();
        assert!(first.is_some());
        let e = try_lock(&path).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        drop(first);
        assert!(try_lock(&path).unwrap().is_some());
    }
}
