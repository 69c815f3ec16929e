// Shared by the build scripts of droppos-model and droppos-pipeline (included with `include!`).
//
// torch-sys links libtorch dynamically but leaves finding it at run time to LD_LIBRARY_PATH. We
// record its folder as an rpath so binaries and test executables run without that variable, and
// force libtorch_cuda into DT_NEEDED: nothing references its symbols directly, so the default
// `--as-needed` would drop it and CUDA would silently be unavailable on GPU machines.

/// libtorch_cuda is forced into every binary of the package, or only into `cuda_bin` when given
/// (the package's other binaries then stay free of libtorch).
fn link_libtorch_into(cuda_bin: Option<&str>) {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=torch-sys did not report its libtorch folder; no rpath is set");
        return;
    };
    let lib = std::path::PathBuf::from(lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // Lets the binary report where libtorch came from and find the venv's ONNX Runtime beside it.
    println!("cargo:rustc-env=DROPPOS_LIBTORCH_LIB={}", lib.display());
    let cuda = lib.join("libtorch_cuda.so");
    if cuda.exists() {
        let target = cuda_bin.map_or_else(|| "".to_string(), |b| format!("-bin={b}="));
        let sep = if cuda_bin.is_some() { "" } else { "=" };
        println!(
            "cargo:rustc-link-arg{target}{sep}-Wl,--no-as-needed,{},--as-needed",
            cuda.display()
        );
    }
}
