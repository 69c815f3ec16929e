//! Checkpoint folders, written atomically and pruned to the newest K.
//!
//! Layout: `<run>/checkpoints/step-00001234/` holding
//! - `model.safetensors`: weights under the reference (timm / official DropPos) names,
//! - `optimizer.safetensors`: optimizer state tensors,
//! - `state.json`: [`TrainState`] (step, epoch, loader position, noise generator, reason),
//! - `config.toml`: the resolved recipe.
//!
//! A checkpoint is first written to a hidden temporary folder, synced, then renamed into place,
//! so a crash leaves either the old set or the new one, never a half-written folder.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use tch::Tensor;

use super::error::TrainerError;
use super::state::TrainState;
use crate::layers::NamedTensors;

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";
pub const CONFIG_FILE: &str = "config.toml";
const PREFIX: &str = "step-";

/// Everything one checkpoint holds.
#[derive(Debug)]
pub struct Checkpoint {
    pub model: Vec<(String, Tensor)>,
    pub optimizer: Vec<(String, Tensor)>,
    pub state: TrainState,
    pub config_toml: String,
    /// String metadata stored in `model.safetensors` (e.g. `droppos_config`, the model's
    /// configuration as JSON, so that export and other tools need no architecture flags).
    pub model_metadata: HashMap<String, String>,
}

/// The `checkpoints/` folder of a run.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    dir: PathBuf,
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), TrainerError> {
    let mut f = File::create(path)
        .map_err(|e| TrainerError::io(format!("creating {}", path.display()), e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| TrainerError::io(format!("writing {}", path.display()), e))
}

/// Writes named tensors (+ string metadata) as safetensors through the model crate's writer
/// (moved to the CPU, made contiguous, synced).
fn write_tensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<(), TrainerError> {
    crate::checkpoint::save(path, tensors, metadata).map_err(|e| TrainerError::Checkpoint {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Reads named tensors (on the CPU) and the string metadata of a safetensors file.
fn read_tensors(path: &Path) -> Result<(NamedTensors, HashMap<String, String>), TrainerError> {
    crate::checkpoint::load(path).map_err(|e| TrainerError::Checkpoint {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

impl CheckpointStore {
    /// The store under `run_dir/checkpoints`.
    pub fn new(run_dir: &Path) -> Self {
        Self {
            dir: run_dir.join("checkpoints"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path_for(&self, step: u64) -> PathBuf {
        self.dir.join(format!("{PREFIX}{step:08}"))
    }

    /// Complete checkpoints as (step, folder), oldest first.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>, TrainerError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(TrainerError::io(
                    format!("listing {}", self.dir.display()),
                    e,
                ))
            }
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry
                .map_err(|e| TrainerError::io(format!("listing {}", self.dir.display()), e))?;
            let name = entry.file_name();
            let Some(step) = name
                .to_str()
                .and_then(|n| n.strip_prefix(PREFIX))
                .and_then(|s| s.parse::<u64>().ok())
            else {
                continue;
            };
            found.push((step, entry.path()));
        }
        found.sort();
        Ok(found)
    }

    /// The newest complete checkpoint, if any.
    pub fn latest(&self) -> Result<Option<PathBuf>, TrainerError> {
        Ok(self.list()?.pop().map(|(_, p)| p))
    }

    /// Writes a checkpoint atomically (replacing one of the same step), then keeps the newest
    /// `keep_last`. Returns its folder.
    pub fn save(&self, ckpt: &Checkpoint, keep_last: usize) -> Result<PathBuf, TrainerError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| TrainerError::io(format!("creating {}", self.dir.display()), e))?;
        let step = ckpt.state.step;
        let target = self.path_for(step);
        let tmp = self
            .dir
            .join(format!(".tmp-{PREFIX}{step:08}-{}", std::process::id()));
        if tmp.exists() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        std::fs::create_dir(&tmp)
            .map_err(|e| TrainerError::io(format!("creating {}", tmp.display()), e))?;
        write_tensors(
            &tmp.join(MODEL_FILE),
            &ckpt.model,
            Some(ckpt.model_metadata.clone()),
        )?;
        write_tensors(&tmp.join(OPTIMIZER_FILE), &ckpt.optimizer, None)?;
        let state = serde_json::to_vec_pretty(&ckpt.state).expect("train state encodes as JSON");
        write_synced(&tmp.join(STATE_FILE), &state)?;
        write_synced(&tmp.join(CONFIG_FILE), ckpt.config_toml.as_bytes())?;
        // A folder cannot be renamed over a non-empty one: move the old one aside first.
        let trash = self
            .dir
            .join(format!(".old-{PREFIX}{step:08}-{}", std::process::id()));
        let replaced = target.exists();
        if replaced {
            std::fs::rename(&target, &trash)
                .map_err(|e| TrainerError::io(format!("moving aside {}", target.display()), e))?;
        }
        std::fs::rename(&tmp, &target)
            .map_err(|e| TrainerError::io(format!("renaming {} into place", tmp.display()), e))?;
        if replaced {
            let _ = std::fs::remove_dir_all(&trash);
        }
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        self.prune(keep_last.max(1))?;
        Ok(target)
    }

    /// Deletes all but the newest `keep` checkpoints, and the half-written folders of writers
    /// that died (a checkpoint is model-sized: each crash would leave one behind for good).
    pub fn prune(&self, keep: usize) -> Result<(), TrainerError> {
        self.remove_abandoned();
        let all = self.list()?;
        let excess = all.len().saturating_sub(keep);
        for (_, path) in all.into_iter().take(excess) {
            std::fs::remove_dir_all(&path)
                .map_err(|e| TrainerError::io(format!("removing {}", path.display()), e))?;
        }
        Ok(())
    }

    /// Removes `.tmp-*` / `.old-*` folders whose writer (the pid their name ends with) is no
    /// longer running. A live writer's are left alone: it may be another process's save in
    /// progress.
    fn remove_abandoned(&self) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !(name.starts_with(".tmp-") || name.starts_with(".old-")) {
                continue;
            }
            let pid = name.rsplit('-').next().and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(|p| !process_alive(p)) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    /// Reads a checkpoint folder.
    pub fn load(dir: &Path) -> Result<Checkpoint, TrainerError> {
        let state_path = dir.join(STATE_FILE);
        let bytes = std::fs::read(&state_path)
            .map_err(|e| TrainerError::io(format!("reading {}", state_path.display()), e))?;
        let state: TrainState =
            serde_json::from_slice(&bytes).map_err(|source| TrainerError::State {
                path: state_path,
                source,
            })?;
        let config_path = dir.join(CONFIG_FILE);
        let config_toml = std::fs::read_to_string(&config_path)
            .map_err(|e| TrainerError::io(format!("reading {}", config_path.display()), e))?;
        let (model, model_metadata) = read_tensors(&dir.join(MODEL_FILE))?;
        let (optimizer, _) = read_tensors(&dir.join(OPTIMIZER_FILE))?;
        Ok(Checkpoint {
            model,
            optimizer,
            state,
            config_toml,
            model_metadata,
        })
    }
}

/// Whether a process with this pid exists (on platforms without a check: assumed so).
fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return true;
        };
        // SAFETY: signal 0 only checks that the process exists; nothing is sent.
        let rc = unsafe { libc::kill(pid, 0) };
        rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn ckpt(step: u64) -> Checkpoint {
        Checkpoint {
            model: vec![
                (
                    "blocks.0.attn.qkv.weight".into(),
                    Tensor::arange(6, (Kind::Float, Device::Cpu)).reshape([2, 3]),
                ),
                // A non-contiguous view must be saved as its values.
                (
                    "cls_token".into(),
                    Tensor::arange(6, (Kind::Float, Device::Cpu))
                        .reshape([2, 3])
                        .tr(),
                ),
            ],
            optimizer: vec![("step".into(), Tensor::from_slice(&[step as f32]))],
            state: TrainState {
                step,
                epoch: 1,
                samples_in_epoch: 32,
                loader_position: Some(35),
                world_size: 1,
                rank: 0,
                reason: "interval".into(),
                last_loss: Some(1.5),
                data: Some("d0".into()),
            },
            config_toml: "x = 1\n".into(),
            model_metadata: HashMap::from([("droppos_config".into(), "{}".into())]),
        }
    }

    #[test]
    fn save_load_round_trip_and_keep_last() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path());
        assert!(store.latest().unwrap().is_none());
        for step in [10, 20, 30, 40] {
            store.save(&ckpt(step), 2).unwrap();
        }
        let steps: Vec<u64> = store.list().unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![30, 40]);
        let latest = store.latest().unwrap().unwrap();
        let back = CheckpointStore::load(&latest).unwrap();
        assert_eq!(back.state, ckpt(40).state);
        assert_eq!(back.config_toml, "x = 1\n");
        assert_eq!(back.model_metadata, ckpt(40).model_metadata);
        let names: Vec<&str> = back.model.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.contains(&"cls_token") && names.contains(&"blocks.0.attn.qkv.weight"));
        let cls = &back.model.iter().find(|(n, _)| n == "cls_token").unwrap().1;
        assert_eq!(cls.size(), vec![3, 2]);
        assert_eq!(
            Vec::<f32>::try_from(cls.flatten(0, -1)).unwrap(),
            vec![0., 3., 1., 4., 2., 5.]
        );
        // No temporary folders are left behind.
        let leftovers: Vec<_> = std::fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn saving_the_same_step_again_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path());
        store.save(&ckpt(5), 3).unwrap();
        let mut again = ckpt(5);
        again.state.reason = "non_finite".into();
        store.save(&again, 3).unwrap();
        assert_eq!(store.list().unwrap().len(), 1);
        let back = CheckpointStore::load(&store.latest().unwrap().unwrap()).unwrap();
        assert_eq!(back.state.reason, "non_finite");
    }

    #[test]
    fn half_written_folders_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path());
        store.save(&ckpt(1), 3).unwrap();
        std::fs::create_dir_all(store.dir().join(".tmp-step-00000002-1")).unwrap();
        assert_eq!(store.list().unwrap().len(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn a_dead_writers_half_written_folder_goes_at_the_next_save() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path());
        // A process that has exited (and been reaped): its pid is free.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let abandoned = store.dir().join(format!(".tmp-step-00000002-{dead}"));
        let live = store
            .dir()
            .join(format!(".tmp-step-00000003-{}", std::process::id()));
        std::fs::create_dir_all(&abandoned).unwrap();
        std::fs::create_dir_all(&live).unwrap();
        store.save(&ckpt(1), 3).unwrap();
        assert!(!abandoned.exists());
        assert!(live.exists(), "a live writer's folder is left alone");
    }
}
