include!("build_support.rs");

fn main() {
    link_libtorch_into(None);
    build_dist_shim();
}

/// Compiles csrc/ (the C ABI over PyTorch's c10d used by `distributed`) against the headers that
/// ship with the libtorch torch-sys links. Gloo is needed for CPU training (Debian's libgloo-dev
/// provides its headers; the code itself is inside libtorch_cpu); NCCL is compiled only when
/// nccl.h, the CUDA headers and libtorch_cuda are all present, else the build degrades to
/// Gloo-only and says why.
fn build_dist_shim() {
    use std::path::PathBuf;
    for f in [
        "droppos_dist.h",
        "droppos_dist.cpp",
        "droppos_dist_internal.h",
        "droppos_dist_nccl.cpp",
        "droppos_ffi.h",
        "droppos_optim.h",
        "droppos_optim.cpp",
    ] {
        println!("cargo:rerun-if-changed=csrc/{f}");
    }
    for v in [
        "DROPPOS_TORCH_INCLUDE",
        "GLOO_INCLUDE_DIR",
        "NCCL_INCLUDE_DIR",
        "CUDA_HOME",
        "DROPPOS_NO_NCCL",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    let env_path = |k: &str| std::env::var_os(k).map(PathBuf::from);
    let lib = env_path("DEP_TCH_LIBTORCH_LIB");

    // torch's include folder: beside lib/ in both the pip wheel and the libtorch zip.
    let c10d = "torch/csrc/distributed/c10d/reducer.hpp";
    let torch_include = env_path("DROPPOS_TORCH_INCLUDE")
        .or_else(|| lib.as_ref().map(|l| l.join("..").join("include")))
        .filter(|d| d.join(c10d).exists())
        .or_else(torch_include_from_python)
        .unwrap_or_else(|| {
            panic!(
                "droppos-model: PyTorch's c10d headers ({c10d}) were not found beside libtorch \
                 ({lib:?}/../include) nor through python's torch; set DROPPOS_TORCH_INCLUDE to \
                 torch's include folder (source scripts/env.sh sets up a venv that has them)"
            )
        });

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .warnings(false)
        .extra_warnings(false)
        .debug(false)
        .flag_if_supported("-w")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .include(&torch_include)
        .include(torch_include.join("torch/csrc/api/include"))
        .include("csrc")
        .file("csrc/droppos_dist.cpp")
        .file("csrc/droppos_dist_nccl.cpp")
        .file("csrc/droppos_optim.cpp");

    let gloo = env_path("GLOO_INCLUDE_DIR")
        .into_iter()
        .chain([
            PathBuf::from("/usr/include"),
            PathBuf::from("/usr/local/include"),
        ])
        .find(|d| d.join("gloo/algorithm.h").exists());
    match &gloo {
        Some(dir) => {
            build.define("USE_C10D_GLOO", None).include(dir);
        }
        None => println!(
            "cargo:warning=droppos-model: Gloo headers (gloo/algorithm.h) not found: distributed \
             training on CPU is disabled in this build. Install libgloo-dev (scripts/env.sh does) \
             or set GLOO_INCLUDE_DIR, then rebuild."
        ),
    }

    // NCCL: nccl.h (nvidia-nccl-cu13 wheel), CUDA runtime + crt headers (nvidia-cuda-runtime,
    // nvidia-cuda-crt, nvidia-cuda-cccl wheels, or a CUDA toolkit) and libtorch_cuda.
    let site = torch_include.join("../..");
    let nccl_inc = env_path("NCCL_INCLUDE_DIR")
        .into_iter()
        .chain([
            site.join("nvidia/nccl/include"),
            PathBuf::from("/usr/include"),
        ])
        .find(|d| d.join("nccl.h").exists());
    let cuda_inc = env_path("CUDA_HOME")
        .map(|h| h.join("include"))
        .into_iter()
        .chain([
            site.join("nvidia/cu13/include"),
            PathBuf::from("/usr/local/cuda/include"),
        ])
        .find(|d| d.join("cuda_runtime.h").exists() && d.join("crt/host_config.h").exists());
    let torch_cuda = lib
        .as_ref()
        .map(|l| l.join("libtorch_cuda.so"))
        .filter(|p| p.exists());
    let nccl_off = std::env::var_os("DROPPOS_NO_NCCL").is_some();
    let nccl = match (&nccl_inc, &cuda_inc, &torch_cuda, nccl_off) {
        (Some(n), Some(c), Some(_), false) => {
            build
                .define("USE_C10D_NCCL", None)
                .define("USE_CUDA", None)
                .include(n)
                .include(c);
            let cccl = c.join("cccl");
            if cccl.exists() {
                build.include(cccl);
            }
            true
        }
        _ => {
            let why = if nccl_off {
                "DROPPOS_NO_NCCL is set".to_string()
            } else {
                let mut missing = Vec::new();
                if nccl_inc.is_none() {
                    missing.push("nccl.h (pip nvidia-nccl-cu13 or NCCL_INCLUDE_DIR)");
                }
                if cuda_inc.is_none() {
                    missing.push(
                        "CUDA headers with crt/ (pip nvidia-cuda-runtime, nvidia-cuda-crt, \
                         nvidia-cuda-cccl, or CUDA_HOME)",
                    );
                }
                if torch_cuda.is_none() {
                    missing.push("libtorch_cuda.so (a CUDA build of libtorch)");
                }
                format!("missing {}", missing.join(", "))
            };
            println!(
                "cargo:warning=droppos-model: building the distributed shim without NCCL ({why}); \
                 multi-GPU training will need --dist-backend gloo"
            );
            build.define("DROPPOS_DIST_NO_NCCL", None);
            false
        }
    };
    build.compile("droppos_dist");

    if let Some(l) = &lib {
        println!("cargo:rustc-link-search=native={}", l.display());
    }
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    if nccl {
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
}

fn torch_include_from_python() -> Option<std::path::PathBuf> {
    let python = std::env::var("DROPPOS_PYTHON")
        .or_else(|_| std::env::var("PYTHON_SYS_EXECUTABLE"))
        .unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(python)
        .args([
            "-c",
            "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))",
        ])
        .output()
        .ok()?;
    let dir = std::path::PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    dir.join("torch/csrc/distributed/c10d/reducer.hpp")
        .exists()
        .then_some(dir)
}
