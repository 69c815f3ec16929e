//! Serialising a model to disk, with initializers moved to an external data file when the
//! protobuf would pass its 2 GiB limit.

use std::io::Write;
use std::path::{Path, PathBuf};

use prost::Message;

use super::proto::{tensor_proto::DataLocation, ModelProto, StringStringEntryProto};
use super::OnnxError;

/// Where initializer bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExternalData {
    /// Inline unless the initializers exceed [`AUTO_EXTERNAL_BYTES`].
    Auto,
    /// Always write large initializers to `<file>.data` (used by tests on small models).
    Always,
    /// Always inline; fails past the protobuf limit.
    Never,
}

/// Protobuf messages cannot exceed 2 GiB; leave room for the graph itself.
pub const AUTO_EXTERNAL_BYTES: usize = 1 << 30 | 1 << 29; // 1.5 GiB
const PROTOBUF_LIMIT: usize = (1 << 31) - 1;
/// Initializers smaller than this stay inline (shape constants, scalars).
const INLINE_BELOW: usize = 1024;
/// Offsets in the data file are page-aligned so runtimes can memory-map them.
const ALIGN: u64 = 4096;

/// What was written.
#[derive(Debug, Clone)]
pub struct Written {
    pub model_path: PathBuf,
    pub model_bytes: u64,
    /// The external data file and its size, when one was written.
    pub data: Option<(PathBuf, u64)>,
}

fn initializer_bytes(model: &ModelProto) -> usize {
    model.graph.as_ref().map_or(0, |g| {
        g.initializer
            .iter()
            .map(|t| t.raw_data.as_ref().map_or(0, Vec::len))
            .sum()
    })
}

/// Writes `model` to `path`; with external data the tensors go to `<file name>.data` beside it,
/// referenced by a relative location as the ONNX spec requires.
pub fn write_model(
    mut model: ModelProto,
    path: &Path,
    policy: ExternalData,
) -> Result<Written, OnnxError> {
    let io = |e: std::io::Error, p: &Path| OnnxError::Io(p.display().to_string(), e);
    let external = match policy {
        ExternalData::Always => true,
        ExternalData::Never => false,
        ExternalData::Auto => initializer_bytes(&model) > AUTO_EXTERNAL_BYTES,
    };
    let mut data = None;
    if external {
        let file_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| OnnxError::Invalid(format!("bad output path {}", path.display())))?;
        let data_name = format!("{file_name}.data");
        let data_path = path.with_file_name(&data_name);
        let file = std::fs::File::create(&data_path).map_err(|e| io(e, &data_path))?;
        let mut out = std::io::BufWriter::new(file);
        let mut offset = 0u64;
        if let Some(graph) = model.graph.as_mut() {
            for t in graph.initializer.iter_mut() {
                let Some(raw) = t.raw_data.take_if(|r| r.len() >= INLINE_BELOW) else {
                    continue;
                };
                let pad = (ALIGN - offset % ALIGN) % ALIGN;
                out.write_all(&vec![0u8; pad as usize])
                    .map_err(|e| io(e, &data_path))?;
                offset += pad;
                out.write_all(&raw).map_err(|e| io(e, &data_path))?;
                let entry = |k: &str, v: String| StringStringEntryProto {
                    key: Some(k.into()),
                    value: Some(v),
                };
                t.data_location = Some(DataLocation::External as i32);
                t.external_data = vec![
                    entry("location", data_name.clone()),
                    entry("offset", offset.to_string()),
                    entry("length", raw.len().to_string()),
                ];
                offset += raw.len() as u64;
            }
        }
        out.flush().map_err(|e| io(e, &data_path))?;
        data = Some((data_path, offset));
    }
    let len = model.encoded_len();
    if len > PROTOBUF_LIMIT {
        return Err(OnnxError::Invalid(format!(
            "the model needs {len} bytes inline, past protobuf's 2 GiB limit; use external data"
        )));
    }
    let bytes = model.encode_to_vec();
    std::fs::write(path, &bytes).map_err(|e| io(e, path))?;
    Ok(Written {
        model_path: path.to_path_buf(),
        model_bytes: bytes.len() as u64,
        data,
    })
}
