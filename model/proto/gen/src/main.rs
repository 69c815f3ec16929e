//! Regenerates `model/src/onnx/proto.rs` from the vendored `model/proto/onnx.proto`.
//!
//! Run from the repository root:
//!   cargo run --manifest-path model/proto/gen/Cargo.toml
//! protox parses the .proto in pure Rust (no protoc), prost-build writes the Rust types. The
//! output is committed, so building the model crate needs only `prost`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../..").canonicalize()?;
    let proto_dir = root.join("model/proto");
    let out_dir = tempdir()?;
    let fds = protox::compile([proto_dir.join("onnx.proto")], [&proto_dir])?;
    prost_build::Config::new()
        .out_dir(&out_dir)
        // onnx.proto's comments hold indented text that rustdoc would run as doctests.
        .disable_comments(["."])
        .compile_fds(fds)?;
    let generated = std::fs::read_to_string(out_dir.join("onnx.rs"))?;
    let header = "// @generated from model/proto/onnx.proto (ONNX, Apache-2.0) by model/proto/gen \
                  (prost-build + protox). Do not edit; regenerate with\n// `cargo run --manifest-path \
                  model/proto/gen/Cargo.toml`.\n";
    let dest = root.join("model/src/onnx/proto.rs");
    std::fs::write(&dest, format!("{header}{generated}"))?;
    std::fs::remove_dir_all(&out_dir)?;
    println!("wrote {}", dest.display());
    Ok(())
}

fn tempdir() -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("gen-onnx-proto-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
