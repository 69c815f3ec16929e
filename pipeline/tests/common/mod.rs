//! Helpers shared by the CLI tests: the binary, the sample data, success checks.

#![allow(dead_code)] // each test binary uses a subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The bundled sample data, or the folder named by `DROPPOS_TEST_DATA`.
pub fn data_root() -> PathBuf {
    match std::env::var_os("DROPPOS_TEST_DATA") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/data"),
    }
}

/// The binary under test, logging warnings only.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_droppos-pipeline"));
    c.env("DROPPOS_LOG", "warn");
    c
}

/// Runs `c` and fails the test with its output unless it succeeds.
pub fn run_ok(c: &mut Command) -> Output {
    let out = c.output().expect("spawn droppos-pipeline");
    assert!(
        out.status.success(),
        "{:?} failed:\nstdout: {}\nstderr: {}",
        c,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
