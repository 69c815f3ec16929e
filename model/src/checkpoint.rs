//! safetensors checkpoints under the reference's parameter names.
//!
//! Files are plain safetensors: `torch`/`safetensors.torch.load_file` reads ours into a timm or
//! official DropPos module by name, and a reference `state_dict` saved with
//! `safetensors.torch.save_file` loads here (a `module.` DDP prefix is stripped). Writes are
//! atomic: a temporary file in the same folder, fsync, rename.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, View};
use tch::{Device, Kind, Tensor};

use crate::error::{ModelError, Result};
use crate::layers::NamedTensors;

fn ck_err(path: &Path, msg: impl Into<String>) -> ModelError {
    ModelError::Checkpoint {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Bool => Dtype::BOOL,
        Kind::Uint8 => Dtype::U8,
        Kind::Int8 => Dtype::I8,
        Kind::Int16 => Dtype::I16,
        Kind::Int => Dtype::I32,
        Kind::Int64 => Dtype::I64,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Half => Dtype::F16,
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        _ => return None,
    })
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::BOOL => Kind::Bool,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::I16 => Kind::Int16,
        Dtype::I32 => Kind::Int,
        Dtype::I64 => Kind::Int64,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        _ => return None,
    })
}

struct HostTensor {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &HostTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn to_host(name: &str, t: &Tensor, path: &Path) -> Result<HostTensor> {
    let dtype = dtype_of(t.kind())
        .ok_or_else(|| ck_err(path, format!("{name}: unsupported dtype {:?}", t.kind())))?;
    let t = t.detach().to_device(Device::Cpu).contiguous();
    let numel = t.numel();
    let mut bytes = vec![0u8; numel * t.kind().elt_size_in_bytes()];
    t.f_copy_data_u8(&mut bytes, numel)?;
    Ok(HostTensor {
        dtype,
        shape: t.size().iter().map(|&d| d as usize).collect(),
        bytes,
    })
}

/// Writes `tensors` (+ string metadata) to `path` atomically.
pub fn save(
    path: impl AsRef<Path>,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let path = path.as_ref();
    let host = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), to_host(n, t, path)?)))
        .collect::<Result<Vec<_>>>()?;
    let bytes =
        safetensors::tensor::serialize(host.iter().map(|(n, h)| (n.as_str(), h)), &metadata)
            .map_err(|e| ck_err(path, e.to_string()))?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .ok_or_else(|| ck_err(path, "not a file path"))?;
    let tmp: PathBuf = dir.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let io = |source| ModelError::Io {
        path: tmp.clone(),
        source,
    };
    {
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(())
}

/// Reads every tensor (on the CPU) and the string metadata of a safetensors file.
pub fn load(path: impl AsRef<Path>) -> Result<(NamedTensors, HashMap<String, String>)> {
    let path = path.as_ref();
    let buf = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let (_, meta) = SafeTensors::read_metadata(&buf).map_err(|e| ck_err(path, e.to_string()))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(&buf).map_err(|e| ck_err(path, e.to_string()))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let kind = kind_of(view.dtype()).ok_or_else(|| {
            ck_err(
                path,
                format!("{name}: unsupported dtype {:?}", view.dtype()),
            )
        })?;
        // A zero-sized tensor passes safetensors' size check whatever its other dims say:
        // bound each dim (libtorch rejects > 2^62 with a C++ trace) and the element count.
        let shape: Vec<i64> = view
            .shape()
            .iter()
            .map(|&d| i64::try_from(d).ok().filter(|&d| d < 1 << 40))
            .collect::<Option<_>>()
            .ok_or_else(|| ck_err(path, format!("{name}: shape {:?} is absurd", view.shape())))?;
        out.push((name, Tensor::f_from_data_size(view.data(), &shape, kind)?));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((out, metadata))
}

/// What [`load_into`] did not match.
#[derive(Debug, Default, PartialEq)]
pub struct LoadReport {
    /// Model parameters absent from the file.
    pub missing: Vec<String>,
    /// File tensors that are not model parameters.
    pub unexpected: Vec<String>,
}

/// Copies tensors into the model parameters with the same names (a leading `module.` is
/// ignored). Shape mismatches are errors; with `strict`, so are missing or unexpected names.
pub fn load_into(
    params: &[(String, Tensor)],
    tensors: &[(String, Tensor)],
    strict: bool,
    path: &Path,
) -> Result<LoadReport> {
    let by_name: HashMap<&str, &Tensor> = tensors
        .iter()
        .map(|(n, t)| (n.strip_prefix("module.").unwrap_or(n), t))
        .collect();
    let mut report = LoadReport::default();
    let mut used = std::collections::HashSet::new();
    tch::no_grad(|| -> Result<()> {
        for (name, dst) in params {
            match by_name.get(name.as_str()) {
                None => report.missing.push(name.clone()),
                Some(src) => {
                    if src.size() != dst.size() {
                        return Err(ck_err(
                            path,
                            format!(
                                "{name}: shape {:?} in file, {:?} in model",
                                src.size(),
                                dst.size()
                            ),
                        ));
                    }
                    let mut d = dst.shallow_clone();
                    d.f_copy_(&src.to_kind(dst.kind()))?;
                    used.insert(name.as_str());
                }
            }
        }
        Ok(())
    })?;
    report.unexpected = by_name
        .keys()
        .filter(|n| !used.contains(*n))
        .map(|n| n.to_string())
        .collect();
    report.unexpected.sort();
    if strict && (!report.missing.is_empty() || !report.unexpected.is_empty()) {
        return Err(ck_err(
            path,
            format!(
                "missing {:?}, unexpected {:?}",
                report.missing, report.unexpected
            ),
        ));
    }
    Ok(report)
}

/// Saves a model's parameters (frozen tables included, like a PyTorch `state_dict`).
pub fn save_params(
    path: impl AsRef<Path>,
    params: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    save(path, params, metadata)
}

/// Loads a safetensors file into a model's parameters; returns the file's metadata.
pub fn load_params(
    path: impl AsRef<Path>,
    params: &[(String, Tensor)],
    strict: bool,
) -> Result<(LoadReport, HashMap<String, String>)> {
    let path = path.as_ref();
    let (tensors, meta) = load(path)?;
    let report = load_into(params, &tensors, strict, path)?;
    Ok((report, meta))
}
