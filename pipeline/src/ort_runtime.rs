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

fn loaded() -> Result<&'static Loaded> {
    static LOADED: OnceLock<std::result::Result<Loaded, String>> = OnceLock::new();
    match LOADED.get_or_init(|| load().map_err(|e| format!("{e:#}"))) {
        Ok(l) => Ok(l),
        Err(e) => Err(anyhow!("{e}")),
    }
}

/// Load ONNX Runtime once per process; later calls return the same result. The environment is
/// kept for the life of the process so every session shares it.
pub fn init() -> Result<RuntimeInfo> {
    loaded().map(|(info, _)| info.clone())
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
    let version = library_version(&path)
        .or_else(|| version_from_build_info(ort::info()))
        .unwrap_or_else(|| "unknown".into());
    let info = RuntimeInfo { version, path };
    Ok((info, env))
}

/// The release the library reports itself (`OrtGetApiBase()->GetVersionString()`); pip's build
/// info names only a git branch ("HEAD" for some wheels).
fn library_version(path: &Path) -> Option<String> {
    #[repr(C)]
    struct OrtApiBase {
        get_api: unsafe extern "C" fn(u32) -> *const std::ffi::c_void,
        get_version_string: unsafe extern "C" fn() -> *const std::ffi::c_char,
    }
    // SAFETY: OrtGetApiBase is ONNX Runtime's stable C entry point and OrtApiBase's layout is
    // part of its ABI; the library is already loaded by ort, so this only bumps its refcount.
    unsafe {
        let lib = libloading::Library::new(path).ok()?;
        let base: libloading::Symbol<unsafe extern "C" fn() -> *const OrtApiBase> =
            lib.get(b"OrtGetApiBase").ok()?;
        let base = base();
        if base.is_null() {
            return None;
        }
        let s = ((*base).get_version_string)();
        (!s.is_null()).then(|| std::ffi::CStr::from_ptr(s).to_string_lossy().into_owned())
    }
}

/// `ort::info()` reads "ORT Build Info: git-branch=rel-1.31.1, ..."; take the release number.
fn version_from_build_info(info: &str) -> Option<String> {
    let branch = info.split("git-branch=").nth(1)?;
    let branch = branch.split(',').next()?.trim();
    Some(branch.strip_prefix("rel-").unwrap_or(branch).to_string())
}

/// Input data for [`OrtModel::run`]: plain row-major slices with their shapes (no ndarray, so
/// tch's and ort's ndarray versions never have to agree).
#[derive(Debug, Clone, Copy)]
pub enum InputData<'a> {
    F32(&'a [f32]),
    I64(&'a [i64]),
}

/// One named input.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    pub name: &'a str,
    pub shape: Vec<i64>,
    pub data: InputData<'a>,
}

impl<'a> Input<'a> {
    pub fn f32(name: &'a str, shape: &[i64], data: &'a [f32]) -> Self {
        Self {
            name,
            shape: shape.to_vec(),
            data: InputData::F32(data),
        }
    }

    pub fn i64(name: &'a str, shape: &[i64], data: &'a [i64]) -> Self {
        Self {
            name,
            shape: shape.to_vec(),
            data: InputData::I64(data),
        }
    }
}

/// One fp32 output, copied out of ONNX Runtime.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub shape: Vec<i64>,
    pub data: Vec<f32>,
}

/// An ONNX model loaded into an ONNX Runtime CPU session.
pub struct OrtModel {
    session: ort::session::Session,
    path: PathBuf,
}

impl std::fmt::Debug for OrtModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtModel")
            .field("path", &self.path)
            .finish()
    }
}

impl OrtModel {
    /// Loads `path` (and its external data, if any) with `threads` intra-op threads (0 lets
    /// ONNX Runtime choose) and all graph optimisations.
    pub fn load(path: &Path, threads: usize) -> Result<Self> {
        let (_, env) = loaded()?;
        let fail = |e: &dyn std::fmt::Display| {
            anyhow!("loading {} into ONNX Runtime: {e}", path.display())
        };
        let session = ort::session::Session::builder(env)
            .map_err(|e| fail(&e))?
            .with_optimization_level(ort::session::builder::GraphOptimizationLevel::All)
            .map_err(|e| fail(&e))?
            .with_intra_threads(threads)
            .map_err(|e| fail(&e))?
            .with_inter_threads(1)
            .map_err(|e| fail(&e))?
            .commit_from_file(path)
            .map_err(|e| fail(&e))?;
        Ok(Self {
            session,
            path: path.to_path_buf(),
        })
    }

    pub fn input_names(&self) -> Vec<String> {
        self.session
            .inputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect()
    }

    /// The declared shape of input `name` (-1 for dynamic axes).
    pub fn input_shape(&self, name: &str) -> Option<Vec<i64>> {
        self.session
            .inputs()
            .iter()
            .find(|o| o.name() == name)
            .and_then(|o| o.dtype().tensor_shape())
            .map(|s| s.to_vec())
    }

    /// The declared shape of output `name` (-1 for dynamic axes).
    pub fn output_shape(&self, name: &str) -> Option<Vec<i64>> {
        self.session
            .outputs()
            .iter()
            .find(|o| o.name() == name)
            .and_then(|o| o.dtype().tensor_shape())
            .map(|s| s.to_vec())
    }

    pub fn output_names(&self) -> Vec<String> {
        self.session
            .outputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect()
    }

    /// Runs the model and returns the fp32 outputs named in `wanted`, in that order.
    pub fn run(&mut self, inputs: &[Input<'_>], wanted: &[&str]) -> Result<Vec<Output>> {
        let mut values: Vec<(
            std::borrow::Cow<'_, str>,
            ort::session::SessionInputValue<'_>,
        )> = Vec::with_capacity(inputs.len());
        for input in inputs {
            let bad = |e: ort::Error| anyhow!("input `{}` {:?}: {e}", input.name, input.shape);
            let v: ort::session::SessionInputValue<'_> = match input.data {
                InputData::F32(d) => {
                    ort::value::TensorRef::from_array_view((input.shape.clone(), d))
                        .map_err(bad)?
                        .into()
                }
                InputData::I64(d) => {
                    ort::value::TensorRef::from_array_view((input.shape.clone(), d))
                        .map_err(bad)?
                        .into()
                }
            };
            values.push((input.name.into(), v));
        }
        let path = self.path.clone();
        let outputs = self
            .session
            .run(values)
            .map_err(|e| anyhow!("running {} in ONNX Runtime: {e}", path.display()))?;
        wanted
            .iter()
            .map(|name| {
                let value = outputs
                    .get(*name)
                    .ok_or_else(|| anyhow!("{} has no output `{name}`", path.display()))?;
                let (shape, data) = value
                    .try_extract_tensor::<f32>()
                    .map_err(|e| anyhow!("output `{name}`: {e}"))?;
                Ok(Output {
                    shape: shape.to_vec(),
                    data: data.to_vec(),
                })
            })
            .collect()
    }
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
