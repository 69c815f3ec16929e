//! ONNX export written in Rust: the protobuf types (generated once from the vendored
//! `model/proto/onnx.proto`), a small graph builder, the ViT encoder / DropPos graphs and the
//! file writer (inline weights, or external data past protobuf's 2 GiB limit).

mod builder;
#[rustfmt::skip]
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto;
mod vit;
mod weights;
mod writer;

pub use builder::{Attr, Dim, ElemType, GraphBuilder, IR_VERSION};
pub use vit::{
    check_supported, classifier_io, classifier_model, droppos_io, droppos_model, encoder_io,
    encoder_model, DecoderSpec, EncoderSpec, HeadSpec, Opset,
};
pub use weights::{HostTensor, Weights};
pub use writer::{write_model, ExternalData, Written, AUTO_EXTERNAL_BYTES};

/// Errors of the ONNX writer.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("the weights have no parameter `{0}`")]
    MissingWeight(String),
    #[error("parameter `{name}` has shape {got:?}, expected {expected:?}")]
    Shape {
        name: String,
        expected: Vec<i64>,
        got: Vec<i64>,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("writing {0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("reading {0}: {1}")]
    Read(String, #[source] std::io::Error),
    #[error("reading tensors: {0}")]
    Tch(String),
}
