//! Host-side fp32 copies of named parameters, the exporters' input. Kept apart from tch modules
//! so any source with reference (timm) parameter names can be exported: a VarStore, a
//! safetensors file written by our trainer or by timm.

use std::collections::BTreeMap;
use std::path::Path;

use tch::{Kind, Tensor};

use super::OnnxError;

/// A dense fp32 tensor in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub dims: Vec<i64>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(dims: Vec<i64>, data: Vec<f32>) -> Result<Self, OnnxError> {
        let n: i64 = dims.iter().product();
        if n < 0 || n as usize != data.len() {
            return Err(OnnxError::Invalid(format!(
                "shape {dims:?} does not hold {} values",
                data.len()
            )));
        }
        Ok(Self { dims, data })
    }

    pub fn from_tch(t: &Tensor) -> Result<Self, OnnxError> {
        let t = t
            .detach()
            .to_device(tch::Device::Cpu)
            .to_kind(Kind::Float)
            .contiguous();
        let dims = t.size();
        let data = Vec::<f32>::try_from(t.view(-1)).map_err(|e| OnnxError::Tch(e.to_string()))?;
        Self::new(dims, data)
    }

    /// The transpose of a 2-D tensor ([out, in] Linear weight -> [in, out] MatMul operand).
    pub fn transposed_2d(&self) -> Result<Self, OnnxError> {
        let [r, c] = self.dims[..] else {
            return Err(OnnxError::Invalid(format!(
                "expected a 2-D tensor, got shape {:?}",
                self.dims
            )));
        };
        let (r, c) = (r as usize, c as usize);
        let mut data = vec![0f32; r * c];
        for i in 0..r {
            for j in 0..c {
                data[j * r + i] = self.data[i * c + j];
            }
        }
        Self::new(vec![c as i64, r as i64], data)
    }
}

/// Parameters by reference name (`blocks.3.attn.qkv.weight`, ...).
#[derive(Debug, Clone, Default)]
pub struct Weights {
    map: BTreeMap<String, HostTensor>,
}

impl Weights {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, name: impl Into<String>, t: HostTensor) {
        self.map.insert(name.into(), t);
    }

    pub fn from_named_tensors<'a>(
        named: impl IntoIterator<Item = (String, &'a Tensor)>,
    ) -> Result<Self, OnnxError> {
        let mut w = Self::new();
        for (name, t) in named {
            w.insert(name, HostTensor::from_tch(t)?);
        }
        Ok(w)
    }

    /// Every tensor of a safetensors file (any float dtype, converted to fp32).
    pub fn load_safetensors(path: &Path) -> Result<Self, OnnxError> {
        // The checkpoint reader bounds shapes (a zero-sized tensor with absurd dims reached
        // libtorch, whose refusal carried a C++ stack trace).
        let (named, _) = crate::checkpoint::load(path)
            .map_err(|e| OnnxError::Tch(format!("reading {}: {e}", path.display())))?;
        Self::from_named_tensors(named.iter().map(|(n, t)| (n.clone(), t)))
    }

    /// The `__metadata__` strings of a safetensors file (empty when it has none).
    pub fn safetensors_metadata(
        path: &Path,
    ) -> Result<std::collections::HashMap<String, String>, OnnxError> {
        use std::io::Read;
        let bad = |m: String| OnnxError::Invalid(format!("{}: {m}", path.display()));
        let mut f = std::fs::File::open(path)
            .map_err(|e| OnnxError::Read(path.display().to_string(), e))?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len)
            .map_err(|e| OnnxError::Read(path.display().to_string(), e))?;
        let len = u64::from_le_bytes(len);
        if len > 100 << 20 {
            return Err(bad(format!("safetensors header of {len} bytes")));
        }
        let mut header = vec![0u8; len as usize];
        f.read_exact(&mut header)
            .map_err(|e| OnnxError::Read(path.display().to_string(), e))?;
        let v: serde_json::Value =
            serde_json::from_slice(&header).map_err(|e| bad(format!("bad header: {e}")))?;
        Ok(v.get("__metadata__")
            .and_then(|m| m.as_object())
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                    .collect()
            })
            .unwrap_or_default())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    pub fn get(&self, name: &str) -> Result<&HostTensor, OnnxError> {
        self.map
            .get(name)
            .ok_or_else(|| OnnxError::MissingWeight(name.to_string()))
    }

    /// `get` plus a shape check.
    pub fn get_shaped(&self, name: &str, dims: &[i64]) -> Result<&HostTensor, OnnxError> {
        let t = self.get(name)?;
        if t.dims != dims {
            return Err(OnnxError::Shape {
                name: name.to_string(),
                expected: dims.to_vec(),
                got: t.dims.clone(),
            });
        }
        Ok(t)
    }

    /// How many `{prefix}.{i}.` groups exist, counting from 0 without gaps.
    pub fn count_indexed(&self, prefix: &str) -> usize {
        (0..)
            .take_while(|i| {
                let p = format!("{prefix}.{i}.");
                self.map
                    .range(p.clone()..)
                    .next()
                    .is_some_and(|(k, _)| k.starts_with(&p))
            })
            .count()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_and_count() {
        let t = HostTensor::new(vec![2, 3], vec![0., 1., 2., 3., 4., 5.]).unwrap();
        let tt = t.transposed_2d().unwrap();
        assert_eq!(tt.dims, vec![3, 2]);
        assert_eq!(tt.data, vec![0., 3., 1., 4., 2., 5.]);
        let mut w = Weights::new();
        for name in [
            "blocks.0.a",
            "blocks.1.a",
            "blocks.10.a",
            "decoder_blocks.0.a",
        ] {
            w.insert(name, t.clone());
        }
        assert_eq!(w.count_indexed("blocks"), 2);
        assert_eq!(w.count_indexed("decoder_blocks"), 1);
        assert_eq!(w.count_indexed("aux_decoder_blocks"), 0);
        assert!(HostTensor::new(vec![2, 2], vec![1.0]).is_err());
        assert!(matches!(
            w.get_shaped("blocks.0.a", &[3, 2]),
            Err(OnnxError::Shape { .. })
        ));
    }
}
