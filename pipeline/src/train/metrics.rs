//! `metrics.jsonl`: one JSON object per logged optimizer step.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

pub const METRICS_FILE: &str = "metrics.jsonl";

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Optimizer steps completed (1 after the first step).
    pub step: u64,
    /// Fractional epoch at the end of this step.
    pub epoch: f64,
    /// Mean loss over the step's micro-batches.
    pub loss: f64,
    /// Mean accuracy over the step's micro-batches, in [0, 1]: DropPos position accuracy (acc1)
    /// in pre-training, training top-1 in fine-tuning.
    pub acc1: f64,
    pub lr: f64,
    /// Label-smoothing σ of the position targets (pre-training only; absent in fine-tuning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sigma: Option<f64>,
    /// Images per second over all ranks for this step.
    pub images_per_s: f64,
    pub step_time_s: f64,
    /// Device memory in MiB: CUDA memory in use on the device, or the process's resident set on CPU.
    pub device_mem_mib: f64,
    /// Undecodable samples skipped (over all ranks) while loading this step's batches; each is
    /// also logged with its shard and key.
    #[serde(default)]
    pub skipped_samples: u64,
}

/// Appends metrics lines (rank 0 only).
pub struct MetricsWriter {
    file: File,
}

impl MetricsWriter {
    /// Opens `run_dir/metrics.jsonl`, first dropping lines after `keep_through_step` so that a
    /// resumed run continues the file without duplicate or stale steps.
    pub fn open(run_dir: &Path, keep_through_step: u64) -> Result<Self> {
        let path = run_dir.join(METRICS_FILE);
        if path.exists() {
            let kept: Vec<StepMetrics> = read_metrics(&path)?
                .into_iter()
                .filter(|m| m.step <= keep_through_step)
                .collect();
            let mut text = String::new();
            for m in &kept {
                text.push_str(&serde_json::to_string(m)?);
                text.push('\n');
            }
            let tmp = path.with_extension("jsonl.tmp");
            std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, &path)
                .with_context(|| format!("replacing {}", path.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { file })
    }

    pub fn write(&mut self, m: &StepMetrics) -> Result<()> {
        let mut line = serde_json::to_string(m)?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .context("writing metrics.jsonl")?;
        self.file.flush().context("writing metrics.jsonl")
    }
}

/// Reads a metrics file; a torn last line (a crash mid-write) is ignored.
pub fn read_metrics(path: &Path) -> Result<Vec<StepMetrics>> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let lines: Vec<String> = BufReader::new(f).lines().collect::<std::io::Result<_>>()?;
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<StepMetrics>(line) {
            Ok(m) => out.push(m),
            Err(_) if i + 1 == lines.len() => break,
            Err(e) => return Err(e).with_context(|| format!("{} line {}", path.display(), i + 1)),
        }
    }
    Ok(out)
}

/// Path of a run's metrics file.
pub fn metrics_path(run_dir: &Path) -> PathBuf {
    run_dir.join(METRICS_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(step: u64) -> StepMetrics {
        StepMetrics {
            step,
            epoch: step as f64 / 10.0,
            loss: 1.0 / step as f64,
            acc1: 0.1,
            lr: 1e-3,
            sigma: Some(1.0),
            images_per_s: 100.0,
            step_time_s: 0.1,
            device_mem_mib: 12.0,
            skipped_samples: 0,
        }
    }

    #[test]
    fn reopening_truncates_to_the_resumed_step() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = MetricsWriter::open(dir.path(), 0).unwrap();
        for s in 1..=5 {
            w.write(&m(s)).unwrap();
        }
        drop(w);
        let mut w = MetricsWriter::open(dir.path(), 3).unwrap();
        w.write(&m(4)).unwrap();
        let got = read_metrics(&metrics_path(dir.path())).unwrap();
        assert_eq!(
            got.iter().map(|m| m.step).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert_eq!(got[3], m(4));
    }

    #[test]
    fn a_torn_last_line_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let p = metrics_path(dir.path());
        std::fs::write(
            &p,
            format!(
                "{}\n{{\"step\": 2, \"lo",
                serde_json::to_string(&m(1)).unwrap()
            ),
        )
        .unwrap();
        assert_eq!(read_metrics(&p).unwrap(), vec![m(1)]);
    }
}
