//! The built-in one-node launcher (`train --nproc-per-node N`): what torchrun's agent does for
//! a single node. It hosts the TCPStore, starts N copies of this executable with torchrun's
//! variables, and ends them all when one fails.

use std::ffi::{c_int, CString, OsString};
use std::process::{Child, Command};
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::{DistError, Result};
use super::ffi;

/// Set in the children (to the launcher's pid) so that they train instead of launching again.
pub const LAUNCHED_ENV: &str = "DROPPOS_LAUNCHED_BY";

/// True in a process started by [`launch_local`].
pub fn is_launched_child() -> bool {
    std::env::var_os(LAUNCHED_ENV).is_some()
}

/// Removes `--flag N` / `--flag=N` from an argument list (the children must not launch again).
pub fn strip_flag(args: &[OsString], flag: &str) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut skip_next = false;
    let with_eq = format!("{flag}=");
    for a in args {
        if skip_next {
            skip_next = false;
            continue;
        }
        let s = a.to_string_lossy();
        if s == flag {
            skip_next = true;
        } else if !s.starts_with(&with_eq) {
            out.push(a.clone());
        }
    }
    out
}

/// A TCPStore server hosted by this process (the launcher's, like torchrun's agent store).
struct StoreServer {
    raw: *mut ffi::DdStore,
    port: u16,
}

impl StoreServer {
    fn serve(host: &str, timeout: Duration) -> Result<Self> {
        let host = CString::new(host).map_err(|_| DistError::Launch("bad host".into()))?;
        let mut raw = ptr::null_mut();
        let mut port: c_int = 0;
        // SAFETY: pointers valid for the call; `raw` written on success.
        let err = unsafe {
            ffi::dd_store_serve(
                host.as_ptr(),
                0,
                timeout.as_millis().min(i64::MAX as u128) as i64,
                &mut raw,
                &mut port,
            )
        };
        if let Some(m) = ffi::take_error(err) {
            return Err(DistError::Launch(format!(
                "could not host the TCPStore: {}",
                super::error::clean_message(&m)
            )));
        }
        Ok(StoreServer {
            raw,
            port: port as u16,
        })
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        // SAFETY: created by dd_store_serve, released once.
        unsafe { ffi::dd_store_free(self.raw) }
    }
}

/// What [`launch_local`] starts.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// Number of ranks on this node.
    pub nproc: usize,
    /// The executable; `None`: this one.
    pub program: Option<std::path::PathBuf>,
    /// Its arguments (without the launcher flag, see [`strip_flag`]).
    pub args: Vec<OsString>,
    /// Extra environment for every rank.
    pub envs: Vec<(String, String)>,
    /// Bounds the TCPStore's waits.
    pub timeout: Duration,
    /// After a rank fails, how long the others get to exit on their own before being killed.
    pub grace: Duration,
    /// A signal the launcher received and has not passed on yet (0: none), set by the caller's
    /// signal handler. When given, the ranks run in their own process group, so that a
    /// terminal's Ctrl-C reaches them once (through the launcher), and every signal set here
    /// is sent to each running rank: `kill -TERM <launcher>` stops the job as it stops one
    /// process (checkpoint, then exit), instead of orphaning the ranks.
    pub signals: Option<Arc<AtomicUsize>>,
}

impl LaunchSpec {
    pub fn new(nproc: usize, args: Vec<OsString>, timeout: Duration) -> Self {
        LaunchSpec {
            nproc,
            program: None,
            args,
            envs: Vec::new(),
            timeout,
            grace: timeout + Duration::from_secs(10),
            signals: None,
        }
    }
}

/// Runs `spec.nproc` copies of the program as ranks 0..nproc of one job on this node, with
/// torchrun's variables and the store hosted here, and waits for them. When one fails, the
/// others get `spec.grace` to notice (they error out on their own once a collective fails or
/// times out), then are killed. Unless OMP_NUM_THREADS is set, each rank gets an equal share of
/// the cores.
pub fn launch_local(spec: &LaunchSpec) -> Result<()> {
    let nproc = spec.nproc;
    let grace = spec.grace;
    if nproc == 0 {
        return Err(DistError::Launch(
            "--nproc-per-node must be at least 1".into(),
        ));
    }
    let exe = match &spec.program {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| DistError::Launch(format!("cannot find this executable: {e}")))?,
    };
    let store = StoreServer::serve("127.0.0.1", spec.timeout)?;
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .div_ceil(nproc)
        .max(1);
    tracing::info!(nproc, port = store.port, "launching local ranks");
    let mut children: Vec<(usize, Child)> = Vec::with_capacity(nproc);
    for rank in 0..nproc {
        let mut cmd = Command::new(&exe);
        cmd.args(&spec.args)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("GROUP_RANK", "0")
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", store.port.to_string())
            .env("TORCHELASTIC_USE_AGENT_STORE", "True")
            .env("TORCHELASTIC_RESTART_COUNT", "0")
            .env(LAUNCHED_ENV, std::process::id().to_string());
        if std::env::var_os("OMP_NUM_THREADS").is_none() {
            cmd.env("OMP_NUM_THREADS", threads.to_string());
        }
        cmd.envs(spec.envs.iter().map(|(k, v)| (k, v)));
        #[cfg(unix)]
        if spec.signals.is_some() {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
            // A launcher killed outright (kill -9) cannot pass signals on: the ranks then get
            // SIGTERM from the kernel and stop as if it had been sent to them.
            #[cfg(target_os = "linux")]
            // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                });
            }
        }
        match cmd.spawn() {
            Ok(c) => children.push((rank, c)),
            Err(e) => {
                kill_all(&mut children);
                return Err(DistError::Launch(format!("cannot start rank {rank}: {e}")));
            }
        }
    }

    let mut failures: Vec<String> = Vec::new();
    let mut first_failure: Option<Instant> = None;
    let mut running = children.len();
    while running > 0 {
        #[cfg(unix)]
        if let Some(sig) = spec.signals.as_ref().map(|s| s.swap(0, Ordering::SeqCst)) {
            if sig != 0 {
                for (_, child) in children.iter_mut() {
                    if let Ok(None) = child.try_wait() {
                        // SAFETY: plain syscall; the pid is our live (not yet reaped) child.
                        unsafe { libc::kill(child.id() as libc::pid_t, sig as c_int) };
                    }
                }
            }
        }
        running = 0;
        for (rank, child) in children.iter_mut() {
            match child.try_wait() {
                Ok(Some(status)) => {
                    if !status.success()
                        && !failures
                            .iter()
                            .any(|f| f.starts_with(&format!("rank {rank} ")))
                    {
                        failures.push(format!("rank {rank} exited with {status}"));
                        first_failure.get_or_insert_with(Instant::now);
                    }
                }
                Ok(None) => running += 1,
                Err(e) => return Err(DistError::Launch(format!("waiting for rank {rank}: {e}"))),
            }
        }
        if running > 0 {
            if let Some(t) = first_failure {
                if t.elapsed() > grace {
                    tracing::error!("ranks still running {grace:?} after a failure: killing them");
                    for (rank, child) in children.iter_mut() {
                        if let Ok(None) = child.try_wait() {
                            let _ = child.kill();
                            let _ = child.wait();
                            failures.push(format!("rank {rank} killed by the launcher"));
                        }
                    }
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    drop(store);
    if failures.is_empty() {
        Ok(())
    } else {
        Err(DistError::Launch(failures.join("; ")))
    }
}

fn kill_all(children: &mut [(usize, Child)]) {
    for (_, c) in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launcher_flag_is_removed() {
        let a: Vec<OsString> = [
            "train",
            "--nproc-per-node",
            "2",
            "--epochs=1",
            "--nproc-per-node=4",
            "x",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let out = strip_flag(&a, "--nproc-per-node");
        assert_eq!(out, ["train", "--epochs=1", "x"].map(OsString::from));
    }
}
