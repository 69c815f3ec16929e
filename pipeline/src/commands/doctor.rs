//! `droppos-pipeline doctor`: what this binary will run on.
//!
//! Everything is probed at run time from the libraries actually loaded into the process, so the
//! report is true for the machine at hand (a binary built here and carried to a GPU node reports
//! that node's CUDA).

use std::ffi::{c_char, c_int, CStr};
use std::path::PathBuf;

use anyhow::Result;
use serde::Serialize;

use crate::ort_runtime;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Print the report as one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize, Debug)]
struct Report {
    droppos_pipeline: &'static str,
    libtorch_version: Option<String>,
    libtorch_path: Option<String>,
    libtorch_cuda_linked: bool,
    cuda_available: bool,
    cuda_device_count: i64,
    cuda_devices: Vec<GpuInfo>,
    cudnn_available: bool,
    cudnn_version: Option<String>,
    nccl_version: Option<String>,
    onnxruntime: Result<OrtReport, String>,
    torch_threads: i32,
    torch_interop_threads: i32,
    cpu_threads: usize,
}

#[derive(Serialize, Debug)]
struct GpuInfo {
    index: i32,
    name: String,
    compute_capability: String,
    memory_gib: f64,
}

#[derive(Serialize, Debug)]
struct OrtReport {
    path: String,
    version: String,
}

pub fn run(args: Args) -> Result<()> {
    let report = collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    Ok(())
}

fn collect() -> Report {
    let cuda_available = tch::Cuda::is_available();
    let cuda_device_count = if cuda_available {
        tch::Cuda::device_count()
    } else {
        0
    };
    let maps = loaded_libraries();
    let libtorch_path = maps
        .iter()
        .find(|p| file_name_starts(p, "libtorch_cpu.so"))
        .map(|p| p.display().to_string());
    let libtorch_version = libtorch_path.as_deref().and_then(torch_version_beside);
    let libtorch_cuda_linked = maps.iter().any(|p| file_name_starts(p, "libtorch_cuda.so"));
    Report {
        droppos_pipeline: env!("CARGO_PKG_VERSION"),
        libtorch_version,
        libtorch_path,
        libtorch_cuda_linked,
        cuda_available,
        cuda_device_count,
        cuda_devices: if cuda_available {
            gpu_info()
        } else {
            Vec::new()
        },
        cudnn_available: cuda_available && tch::Cuda::cudnn_is_available(),
        cudnn_version: cudnn_version(),
        nccl_version: nccl_version(),
        onnxruntime: ort_runtime::init()
            .map(|i| OrtReport {
                path: i.path.display().to_string(),
                version: i.version,
            })
            .map_err(|e| format!("{e:#}")),
        torch_threads: tch::get_num_threads(),
        torch_interop_threads: tch::get_num_interop_threads(),
        cpu_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
    }
}

fn print_text(r: &Report) {
    let or_unknown = |o: &Option<String>| o.clone().unwrap_or_else(|| "unknown".into());
    println!("droppos-pipeline   {}", r.droppos_pipeline);
    println!(
        "libtorch           {} ({})",
        or_unknown(&r.libtorch_version),
        or_unknown(&r.libtorch_path)
    );
    println!(
        "libtorch_cuda      {}",
        if r.libtorch_cuda_linked {
            "linked"
        } else {
            "not linked (CPU-only libtorch)"
        }
    );
    if r.cuda_available {
        println!(
            "CUDA               available, {} device(s)",
            r.cuda_device_count
        );
        for d in &r.cuda_devices {
            println!(
                "  cuda:{}           {} (compute capability {}, {:.1} GiB)",
                d.index, d.name, d.compute_capability, d.memory_gib
            );
        }
    } else {
        println!("CUDA               not available: no GPU or driver on this machine; training runs on CPU");
    }
    println!(
        "cuDNN              {}{}",
        if r.cudnn_available {
            "available"
        } else {
            "not available"
        },
        r.cudnn_version
            .as_ref()
            .map(|v| format!(" (library {v})"))
            .unwrap_or_default()
    );
    println!(
        "NCCL               {}",
        r.nccl_version
            .as_ref()
            .map(|v| format!(
                "library {v}{}",
                if r.cuda_available {
                    ""
                } else {
                    " (unused without CUDA)"
                }
            ))
            .unwrap_or_else(|| "not found".into())
    );
    match &r.onnxruntime {
        Ok(o) => println!("ONNX Runtime       {} ({})", o.version, o.path),
        Err(e) => println!("ONNX Runtime       not available: {e}"),
    }
    println!(
        "threads            torch {} (inter-op {}), CPUs {}",
        r.torch_threads, r.torch_interop_threads, r.cpu_threads
    );
}

fn file_name_starts(p: &std::path::Path, prefix: &str) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(prefix))
}

/// Shared objects mapped into this process (Linux `/proc/self/maps`).
fn loaded_libraries() -> Vec<PathBuf> {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return Vec::new();
    };
    let mut libs: Vec<PathBuf> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.contains(".so"))
        .map(PathBuf::from)
        .collect();
    libs.sort();
    libs.dedup();
    libs
}

/// A pip libtorch lives in `site-packages/torch/lib`; its version is in `torch/version.py`.
fn torch_version_beside(lib: &str) -> Option<String> {
    let torch_dir = std::path::Path::new(lib).parent()?.parent()?;
    let text = std::fs::read_to_string(torch_dir.join("version.py")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("__version__"))
        .map(|v| {
            v.trim_start_matches([' ', '=', ':'])
                .trim()
                .trim_matches(['\'', '"'])
                .to_string()
        })
}

// The versions of cuDNN and NCCL are asked from the libraries themselves. Both are already in
// the process when libtorch_cuda is, so opening them by soname returns the loaded copy.
fn cudnn_version() -> Option<String> {
    // SAFETY: cudnnGetVersion takes no arguments and returns a size_t.
    unsafe {
        let lib = libloading::Library::new("libcudnn.so.9").ok()?;
        let f: libloading::Symbol<unsafe extern "C" fn() -> usize> =
            lib.get(b"cudnnGetVersion").ok()?;
        let v = f();
        Some(format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100))
    }
}

fn nccl_version() -> Option<String> {
    // SAFETY: ncclGetVersion writes one int.
    unsafe {
        let lib = libloading::Library::new("libnccl.so.2").ok()?;
        let f: libloading::Symbol<unsafe extern "C" fn(*mut c_int) -> c_int> =
            lib.get(b"ncclGetVersion").ok()?;
        let mut v: c_int = 0;
        if f(&mut v) != 0 {
            return None;
        }
        Some(format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100))
    }
}

/// Device names and compute capabilities through the CUDA driver API, whose ABI is stable.
fn gpu_info() -> Vec<GpuInfo> {
    const ATTR_CC_MAJOR: c_int = 75;
    const ATTR_CC_MINOR: c_int = 76;
    type CuInit = unsafe extern "C" fn(u32) -> c_int;
    type CuDeviceGetCount = unsafe extern "C" fn(*mut c_int) -> c_int;
    type CuDeviceGetName = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;
    type CuDeviceGetAttribute = unsafe extern "C" fn(*mut c_int, c_int, c_int) -> c_int;
    type CuDeviceTotalMem = unsafe extern "C" fn(*mut usize, c_int) -> c_int;
    let mut out = Vec::new();
    // SAFETY: documented driver API signatures; every out-pointer is valid for its write.
    unsafe {
        let Ok(lib) = libloading::Library::new("libcuda.so.1") else {
            return out;
        };
        let (Ok(init), Ok(count), Ok(name), Ok(attr), Ok(mem)) = (
            lib.get::<CuInit>(b"cuInit"),
            lib.get::<CuDeviceGetCount>(b"cuDeviceGetCount"),
            lib.get::<CuDeviceGetName>(b"cuDeviceGetName"),
            lib.get::<CuDeviceGetAttribute>(b"cuDeviceGetAttribute"),
            lib.get::<CuDeviceTotalMem>(b"cuDeviceTotalMem_v2"),
        ) else {
            return out;
        };
        if init(0) != 0 {
            return out;
        }
        let mut n: c_int = 0;
        if count(&mut n) != 0 {
            return out;
        }
        for dev in 0..n {
            let mut buf = [0 as c_char; 256];
            let _ = name(buf.as_mut_ptr(), buf.len() as c_int, dev);
            let (mut major, mut minor) = (0, 0);
            let _ = attr(&mut major, ATTR_CC_MAJOR, dev);
            let _ = attr(&mut minor, ATTR_CC_MINOR, dev);
            let mut bytes = 0usize;
            let _ = mem(&mut bytes, dev);
            out.push(GpuInfo {
                index: dev,
                name: CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned(),
                compute_capability: format!("{major}.{minor}"),
                memory_gib: bytes as f64 / (1u64 << 30) as f64,
            });
        }
    }
    out
}
