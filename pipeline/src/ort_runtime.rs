//! Finding and loading the ONNX Runtime shared library.
//!
//! ort is built with `load-dynamic`: nothing is downloaded at build time and the library is
//! opened at run time. Search order: `ORT_DYLIB_PATH`; the venv named by `DROPPOS_VENV`; the
//! default venv of `scripts/env.sh`; the site-packages folder beside the libtorch this binary
//! was linked against (both come from the same venv).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};

/// What was loaded.
#[derive(Debug, Clone)]
pub struct RuntimeInfo {
    pub path: PathBuf,
    pub version: String,
}

const FIX_HINT: &str = "install it with `pip install onnxruntime==1.31.1` (scripts/env.sh does) \
and point ORT_DYLIB_PATH at onnxruntime/capi/libonnxruntime.so.1.31.1";

fn site_packages_candidates() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Ok(venv) = std::env::var("DROPPOS_VENV") {
        roots.push(PathBuf::from(venv));
    }
    let cache = std::env::var("DROPPOS_CACHE")
        .map(PathBuf::from)
        .ok()
        .or_else(|| {
            std::env::var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|_| std::env::var("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .ok()
                .map(|c| c.join("droppos-pipeline"))
        });
    if let Some(cache) = cache {
        roots.push(cache.join("venv"));
    }
    let mut out = Vec::new();
    for root in roots {
        if let Ok(entries) = std::fs::read_dir(root.join("lib")) {
            for e in entries.flatten() {
                out.push(e.path().join("site-packages"));
            }
        }
    }
    // <site-packages>/torch/lib -> <site-packages>
    if let Some(lib) = option_env!("DROPPOS_LIBTORCH_LIB") {
        if let Some(site) = Path::new(lib).parent().and_then(Path::parent) {
            out.push(site.to_path_buf());
        }
    }
    out
}

fn find_in_site(site: &Path) -> Option<PathBuf> {
    let capi = site.join("onnxruntime").join("capi");
    let mut libs: Vec<PathBuf> = std::fs::read_dir(&capi)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so"))
        })
        .collect();
    // Prefer the fully versioned name (libonnxruntime.so.1.31.1) over bare symlinks.
    libs.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    libs.into_iter().next()
}

/// Where the ONNX Runtime library is, without loading it.
pub fn locate() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("ORT_DYLIB_PATH") {
        let p = PathBuf::from(p);
        if !p.exists() {
            bail!(
                "ORT_DYLIB_PATH points at {}, which does not exist; {FIX_HINT}",
                p.display()
            );
        }
        return Ok(p);
    }
    site_packages_candidates()
        .iter()
        .find_map(|s| find_in_site(s))
        .ok_or_else(|| anyhow!("the ONNX Runtime library was not found; {FIX_HINT}"))
}

type Loaded = (RuntimeInfo, ort::environment::Environment);

/// Load ONNX Runtime once per process; later calls return the same result. The environment is
/// kept for the life of the process so every session shares it.
pub fn init() -> Result<RuntimeInfo> {
    static LOADED: OnceLock<std::result::Result<Loaded, String>> = OnceLock::new();
    match LOADED.get_or_init(|| load().map_err(|e| format!("{e:#}"))) {
        Ok((info, _env)) => Ok(info.clone()),
        Err(e) => Err(anyhow!("{e}")),
    }
}

fn load() -> Result<Loaded> {
    let path = locate()?;
    let builder = ort::init_from(&path)
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("loading ONNX Runtime from {}; {FIX_HINT}", path.display()))?;
    let env = builder
        .with_name("droppos-pipeline")
        .build()
        .map_err(|e| anyhow!("creating the ONNX Runtime environment: {e}"))?;
    let info = RuntimeInfo {
        version: version_from_build_info(ort::info()).unwrap_or_else(|| "unknown".into()),
        path,
    };
    Ok((info, env))
}

/// `ort::info()` reads "ORT Build Info: git-branch=rel-1.31.1, ..."; take the release number.
fn version_from_build_info(info: &str) -> Option<String> {
    let branch = info.split("git-branch=").nth(1)?;
    let branch = branch.split(',').next()?.trim();
    Some(branch.strip_prefix("rel-").unwrap_or(branch).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_release_from_build_info() {
        let s = "ORT Build Info: git-branch=rel-1.31.1, git-commit-id=abc, build type=Release";
        assert_eq!(version_from_build_info(s).as_deref(), Some("1.31.1"));
        assert_eq!(version_from_build_info("nothing here"), None);
    }
}
