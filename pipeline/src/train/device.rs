//! Device and numeric precision for a run, and device memory readings for metrics.

use anyhow::{bail, Result};
use droppos_model::trainer::precision;
use tch::Device;

use crate::config::RuntimeConfig;

/// Where and how a run computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub device: Device,
    /// bf16 autocast around forward passes (CUDA only); weights and optimizer stay fp32.
    pub bf16_autocast: bool,
}

impl Placement {
    /// Resolves `runtime.device` / `runtime.precision` and applies the process-wide settings
    /// (thread count; on CUDA: TF32 and the bf16 autocast dtype).
    pub fn resolve(rt: &RuntimeConfig, local_rank: usize) -> Result<Self> {
        if rt.threads > 0 {
            tch::set_num_threads(rt.threads as i32);
        }
        let cuda = tch::Cuda::is_available();
        let device = match rt.device.as_str() {
            "auto" if cuda => Device::Cuda(local_rank),
            "auto" | "cpu" => Device::Cpu,
            "cuda" if cuda => Device::Cuda(local_rank),
            d => match d.strip_prefix("cuda:").and_then(|i| i.parse::<usize>().ok()) {
                Some(i) if cuda && (i as i64) < tch::Cuda::device_count() => Device::Cuda(i),
                _ => bail!("runtime.device = `{d}` but CUDA is not available here (tch::Cuda::is_available() is false or the index is out of range)"),
            },
        };
        let on_cuda = device.is_cuda();
        let bf16_autocast = match rt.precision.as_str() {
            "auto" => on_cuda,
            "fp32" => false,
            "bf16" if on_cuda => true,
            "bf16" => bail!("runtime.precision = bf16 needs CUDA; use fp32 (or auto) on CPU"),
            p => bail!("unknown runtime.precision `{p}`"),
        };
        if on_cuda {
            precision::allow_tf32(true).map_err(anyhow::Error::msg)?;
            precision::set_cuda_autocast_bf16().map_err(anyhow::Error::msg)?;
        }
        Ok(Self {
            device,
            bf16_autocast,
        })
    }

    /// Runs `f` under bf16 autocast when enabled.
    pub fn autocast<T>(&self, f: impl FnOnce() -> T) -> T {
        if self.bf16_autocast {
            tch::autocast(true, f)
        } else {
            f()
        }
    }

    /// Human-readable description for logs.
    pub fn describe(&self) -> String {
        match (self.device, self.bf16_autocast) {
            (Device::Cuda(i), true) => format!("cuda:{i}, bf16 autocast, TF32"),
            (Device::Cuda(i), false) => format!("cuda:{i}, fp32 (TF32 matmuls)"),
            _ => format!("cpu ({} threads), fp32", tch::get_num_threads()),
        }
    }
}

/// Device memory in MiB: bytes in use on the CUDA device (all processes), or this process's
/// resident set size on the CPU. NaN when unavailable.
pub fn memory_mib(device: Device) -> f64 {
    match device {
        Device::Cuda(_) => cuda_used_bytes()
            .map(|b| b as f64 / 1048576.0)
            .unwrap_or(f64::NAN),
        _ => rss_bytes()
            .map(|b| b as f64 / 1048576.0)
            .unwrap_or(f64::NAN),
    }
}

fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn cuda_used_bytes() -> Option<u64> {
    // cudaMemGetInfo from the CUDA runtime libtorch has already loaded.
    let lib = libloading::os::unix::Library::this();
    // SAFETY: cudaError_t cudaMemGetInfo(size_t* free, size_t* total).
    unsafe {
        let f: libloading::os::unix::Symbol<unsafe extern "C" fn(*mut usize, *mut usize) -> i32> =
            lib.get(b"cudaMemGetInfo\0").ok()?;
        let (mut free, mut total) = (0usize, 0usize);
        (f(&mut free, &mut total) == 0).then(|| (total - free) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_placement_is_fp32_and_reports_memory() {
        let rt = RuntimeConfig {
            device: "cpu".into(),
            ..RuntimeConfig::default()
        };
        let p = Placement::resolve(&rt, 0).unwrap();
        assert_eq!(
            p,
            Placement {
                device: Device::Cpu,
                bf16_autocast: false
            }
        );
        assert!(memory_mib(Device::Cpu) > 1.0);
        let rt = RuntimeConfig {
            device: "cpu".into(),
            precision: "bf16".into(),
            ..RuntimeConfig::default()
        };
        assert!(Placement::resolve(&rt, 0).is_err());
    }

    #[test]
    fn auto_follows_cuda_availability() {
        let p = Placement::resolve(&RuntimeConfig::default(), 0).unwrap();
        assert_eq!(p.device.is_cuda(), tch::Cuda::is_available());
        assert_eq!(p.bf16_autocast, tch::Cuda::is_available());
    }
}
