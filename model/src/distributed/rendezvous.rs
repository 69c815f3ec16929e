//! Who am I and where do we meet: rank, world size and the TCPStore address, read from the
//! variables torchrun or Slurm set.

use std::str::FromStr;

use super::error::{DistError, Result};

/// The port used under Slurm when MASTER_PORT is not set: this base plus the job id modulo
/// 10000, so that jobs sharing a node do not collide.
pub const SLURM_PORT_BASE: u16 = 20000;

/// Which launcher the rendezvous came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// torchrun, `train --nproc-per-node`, or any launcher exporting RANK / WORLD_SIZE.
    Torchrun,
    /// One task per rank under `srun` (SLURM_PROCID / SLURM_NTASKS).
    Slurm,
}

/// Everything needed to join the process group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendezvous {
    pub rank: usize,
    pub world_size: usize,
    /// Index of this process on its node: picks the GPU.
    pub local_rank: usize,
    /// Host and port of the TCPStore.
    pub master_addr: String,
    pub master_port: u16,
    /// The launcher (torchrun's agent, or our own) hosts the TCPStore: every rank is a client.
    /// Otherwise rank 0 hosts it.
    pub agent_store: bool,
    /// torchrun's restart count, part of the store prefix so a restarted job never reads the
    /// keys of a failed attempt.
    pub restart_count: u32,
    pub launcher: Launcher,
}

impl Rendezvous {
    /// Reads the process environment. `Ok(None)` when no launcher variables are present
    /// (a plain single-process run).
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// Same as [`Rendezvous::from_env`] over any variable lookup (testable).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let get = |k: &str| var(k).filter(|v| !v.trim().is_empty());
        if get("RANK").is_some() || get("WORLD_SIZE").is_some() {
            let rank: usize = parse(&get, "RANK")?;
            let world_size: usize = parse(&get, "WORLD_SIZE")?;
            let local_rank = match get("LOCAL_RANK") {
                Some(_) => parse(&get, "LOCAL_RANK")?,
                None => 0,
            };
            let master_addr = get("MASTER_ADDR").ok_or_else(|| {
                DistError::Env("RANK/WORLD_SIZE are set but MASTER_ADDR is not".into())
            })?;
            let master_port = parse(&get, "MASTER_PORT")?;
            let agent_store = get("TORCHELASTIC_USE_AGENT_STORE")
                .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1"))
                .unwrap_or(false);
            let restart_count = match get("TORCHELASTIC_RESTART_COUNT") {
                Some(_) => parse(&get, "TORCHELASTIC_RESTART_COUNT")?,
                None => 0,
            };
            return Self::checked(Rendezvous {
                rank,
                world_size,
                local_rank,
                master_addr,
                master_port,
                agent_store,
                restart_count,
                launcher: Launcher::Torchrun,
            })
            .map(Some);
        }
        if get("SLURM_PROCID").is_some() && get("SLURM_NTASKS").is_some() {
            let rank: usize = parse(&get, "SLURM_PROCID")?;
            let world_size: usize = parse(&get, "SLURM_NTASKS")?;
            let local_rank = match get("SLURM_LOCALID") {
                Some(_) => parse(&get, "SLURM_LOCALID")?,
                None => 0,
            };
            let master_addr = match get("MASTER_ADDR") {
                Some(a) => a,
                None => {
                    let list = get("SLURM_JOB_NODELIST")
                        .or_else(|| get("SLURM_NODELIST"))
                        .ok_or_else(|| {
                            DistError::Env(
                                "SLURM_PROCID is set but neither MASTER_ADDR nor \
                                 SLURM_JOB_NODELIST / SLURM_NODELIST is"
                                    .into(),
                            )
                        })?;
                    first_host(&list)?
                }
            };
            let master_port = match get("MASTER_PORT") {
                Some(_) => parse(&get, "MASTER_PORT")?,
                None => {
                    let job: u64 = match get("SLURM_JOB_ID").or_else(|| get("SLURM_JOBID")) {
                        Some(j) => j.trim().parse().map_err(|_| {
                            DistError::Env(format!("SLURM_JOB_ID={j:?} is not a number"))
                        })?,
                        None => 0,
                    };
                    SLURM_PORT_BASE + (job % 10000) as u16
                }
            };
            return Self::checked(Rendezvous {
                rank,
                world_size,
                local_rank,
                master_addr,
                master_port,
                agent_store: false,
                restart_count: 0,
                launcher: Launcher::Slurm,
            })
            .map(Some);
        }
        Ok(None)
    }

    fn checked(self) -> Result<Self> {
        if self.world_size == 0 {
            return Err(DistError::Env("world size is 0".into()));
        }
        if self.rank >= self.world_size {
            return Err(DistError::Env(format!(
                "rank {} is not below the world size {}",
                self.rank, self.world_size
            )));
        }
        Ok(self)
    }

    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Key prefix in the TCPStore for this job attempt.
    pub fn store_prefix(&self) -> String {
        format!("droppos/attempt_{}", self.restart_count)
    }

    /// Whether this process hosts the TCPStore server.
    pub fn hosts_store(&self) -> bool {
        !self.agent_store && self.rank == 0
    }
}

fn parse<T: FromStr>(get: &impl Fn(&str) -> Option<String>, key: &str) -> Result<T> {
    let v = get(key).ok_or_else(|| DistError::Env(format!("{key} is not set")))?;
    v.trim()
        .parse()
        .map_err(|_| DistError::Env(format!("{key}={v:?} is not a valid number")))
}

/// The first host of a Slurm hostlist such as `gpu[01-04,07],login1` or
/// `rack[1-2]-node[08-09]`: every bracket group contributes its first value (zero padding kept).
pub fn first_host(list: &str) -> Result<String> {
    let bad = || DistError::Env(format!("cannot read the Slurm node list {list:?}"));
    let mut out = String::new();
    let mut chars = list.trim().chars();
    while let Some(c) = chars.next() {
        match c {
            ',' => break,
            '[' => {
                let mut group = String::new();
                for g in chars.by_ref() {
                    if g == ']' {
                        break;
                    }
                    group.push(g);
                }
                let first = group.split(',').next().unwrap_or("");
                let first = first.split('-').next().unwrap_or("").trim();
                if first.is_empty() || !first.chars().all(|d| d.is_ascii_digit()) {
                    return Err(bad());
                }
                out.push_str(first);
            }
            ']' => return Err(bad()),
            c => out.push(c),
        }
    }
    if out.is_empty() {
        Err(bad())
    } else {
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn rdv(vars: &[(&str, &str)]) -> Result<Option<Rendezvous>> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Rendezvous::from_vars(|k| m.get(k).cloned())
    }

    #[test]
    fn no_launcher_means_single_process() {
        assert_eq!(rdv(&[]).unwrap(), None);
    }

    #[test]
    fn torchrun_variables() {
        let r = rdv(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node01"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((r.rank, r.world_size, r.local_rank), (3, 8, 1));
        assert_eq!((r.master_addr.as_str(), r.master_port), ("node01", 29500));
        assert!(r.agent_store && !r.hosts_store());
        assert_eq!(r.store_prefix(), "droppos/attempt_2");
        assert_eq!(r.launcher, Launcher::Torchrun);
    }

    #[test]
    fn rank_zero_hosts_the_store_without_an_agent() {
        let r = rdv(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "1234"),
            ("TORCHELASTIC_USE_AGENT_STORE", "False"),
        ])
        .unwrap()
        .unwrap();
        assert!(r.hosts_store());
    }

    #[test]
    fn torchrun_errors_are_clear() {
        let e = rdv(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).unwrap_err();
        assert!(e.to_string().contains("MASTER_ADDR"), "{e}");
        let e = rdv(&[
            ("RANK", "2"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("rank 2"), "{e}");
        let e = rdv(&[
            ("RANK", "x"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("RANK"), "{e}");
    }

    #[test]
    fn slurm_variables() {
        let r = rdv(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[07-08,11],cpu1"),
            ("SLURM_JOB_ID", "123456"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((r.rank, r.world_size, r.local_rank), (5, 16, 1));
        assert_eq!(r.master_addr, "gpu07");
        assert_eq!(r.master_port, SLURM_PORT_BASE + 3456);
        assert_eq!(r.launcher, Launcher::Slurm);
        assert!(!r.agent_store);
        // MASTER_ADDR / MASTER_PORT win when the sbatch script exports them.
        let r = rdv(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_NODELIST", "a1"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "4000"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((r.master_addr.as_str(), r.master_port), ("10.0.0.1", 4000));
    }

    #[test]
    fn torchrun_variables_win_over_slurm() {
        let r = rdv(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
            ("SLURM_NODELIST", "a1"),
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "9"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(r.launcher, Launcher::Torchrun);
        assert_eq!(r.rank, 1);
    }

    #[test]
    fn slurm_host_lists() {
        assert_eq!(first_host("node1").unwrap(), "node1");
        assert_eq!(first_host("node[001-004]").unwrap(), "node001");
        assert_eq!(first_host("gpu[3,5-6],login1").unwrap(), "gpu3");
        assert_eq!(first_host("rack[1-2]-node[08-09]").unwrap(), "rack1-node08");
        assert_eq!(first_host("a.example.org,b").unwrap(), "a.example.org");
        assert!(first_host("").is_err());
        assert!(first_host("node[]").is_err());
    }
}
