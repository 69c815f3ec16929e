//! A small ONNX graph builder: named values, nodes with attributes, fp32 initializers stored as
//! raw little-endian bytes, and the model wrapper (IR version, opset import, graph name).

use super::proto::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

/// IR version written into every model. ONNX Runtime 1.31 rejects the schema's own IR 14; IR 10
/// is what opset 20 requires and what ORT 1.31 reads.
pub const IR_VERSION: i64 = 10;

/// One dimension of a graph input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(i64),
    /// A symbolic (dynamic) dimension, e.g. the batch axis `"batch"`.
    Param(String),
}

impl Dim {
    pub fn param(name: &str) -> Self {
        Dim::Param(name.to_string())
    }
}

/// Element types the exporters use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemType {
    F32,
    I64,
    Bool,
}

impl ElemType {
    fn data_type(self) -> i32 {
        match self {
            ElemType::F32 => DataType::Float as i32,
            ElemType::I64 => DataType::Int64 as i32,
            ElemType::Bool => DataType::Bool as i32,
        }
    }
}

/// A node attribute value.
#[derive(Debug, Clone)]
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
    Str(String),
}

/// Builds one `GraphProto`; value names are generated unless given.
#[derive(Debug)]
pub struct GraphBuilder {
    name: String,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    next_id: usize,
}

fn value_info(name: &str, elem: ElemType, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: Some(match d {
                Dim::Fixed(v) => tensor_shape_proto::dimension::Value::DimValue(*v),
                Dim::Param(p) => tensor_shape_proto::dimension::Value::DimParam(p.clone()),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem.data_type()),
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn attribute(name: &str, value: Attr) -> AttributeProto {
    let mut a = AttributeProto {
        name: Some(name.to_string()),
        ..Default::default()
    };
    match value {
        Attr::Int(i) => {
            a.r#type = Some(AttributeType::Int as i32);
            a.i = Some(i);
        }
        Attr::Ints(v) => {
            a.r#type = Some(AttributeType::Ints as i32);
            a.ints = v;
        }
        Attr::Float(f) => {
            a.r#type = Some(AttributeType::Float as i32);
            a.f = Some(f);
        }
        Attr::Str(s) => {
            a.r#type = Some(AttributeType::String as i32);
            a.s = Some(s.into_bytes());
        }
    }
    a
}

/// A tensor initializer holding `data` as raw little-endian bytes.
pub fn raw_tensor(name: &str, elem: ElemType, dims: &[i64], raw: Vec<u8>) -> TensorProto {
    TensorProto {
        name: Some(name.to_string()),
        dims: dims.to_vec(),
        data_type: Some(elem.data_type()),
        raw_data: Some(raw),
        ..Default::default()
    }
}

fn f32_bytes(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn i64_bytes(data: &[i64]) -> Vec<u8> {
    data.iter().flat_map(|v| v.to_le_bytes()).collect()
}

impl GraphBuilder {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            nodes: Vec::new(),
            initializers: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            next_id: 0,
        }
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.next_id += 1;
        format!("{hint}_{}", self.next_id)
    }

    /// Declares a graph input and returns its name.
    pub fn input(&mut self, name: &str, elem: ElemType, dims: &[Dim]) -> String {
        self.inputs.push(value_info(name, elem, dims));
        name.to_string()
    }

    /// Declares `value` as a graph output called `name` (through an Identity node, which ONNX
    /// Runtime removes, so the internal name can stay generated).
    pub fn output(&mut self, value: &str, name: &str, elem: ElemType, dims: &[Dim]) {
        self.nodes.push(NodeProto {
            input: vec![value.to_string()],
            output: vec![name.to_string()],
            name: Some(format!("{name}_out")),
            op_type: Some("Identity".into()),
            ..Default::default()
        });
        self.outputs.push(value_info(name, elem, dims));
    }

    /// Adds an fp32 initializer under `name` and returns the name.
    pub fn weight(&mut self, name: &str, dims: &[i64], data: &[f32]) -> String {
        debug_assert_eq!(dims.iter().product::<i64>() as usize, data.len());
        self.initializers
            .push(raw_tensor(name, ElemType::F32, dims, f32_bytes(data)));
        name.to_string()
    }

    /// A 1-D int64 constant (shapes, axes, indices).
    pub fn const_i64(&mut self, values: &[i64]) -> String {
        let name = self.fresh("const_i64");
        self.initializers.push(raw_tensor(
            &name,
            ElemType::I64,
            &[values.len() as i64],
            i64_bytes(values),
        ));
        name
    }

    /// An int64 scalar constant (rank 0), e.g. a Gather index that drops the axis.
    pub fn scalar_i64(&mut self, value: i64) -> String {
        let name = self.fresh("scalar_i64");
        self.initializers
            .push(raw_tensor(&name, ElemType::I64, &[], i64_bytes(&[value])));
        name
    }

    /// An fp32 scalar constant (rank 0).
    pub fn scalar_f32(&mut self, value: f32) -> String {
        let name = self.fresh("scalar_f32");
        self.initializers
            .push(raw_tensor(&name, ElemType::F32, &[], f32_bytes(&[value])));
        name
    }

    /// Adds a node with one output and returns the output's name.
    pub fn op(&mut self, op_type: &str, inputs: &[&str], attrs: Vec<(&str, Attr)>) -> String {
        self.op_n(op_type, inputs, attrs, 1).remove(0)
    }

    /// Adds a node with `n_out` outputs.
    pub fn op_n(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        attrs: Vec<(&str, Attr)>,
        n_out: usize,
    ) -> Vec<String> {
        let node_name = self.fresh(op_type);
        let outputs: Vec<String> = (0..n_out).map(|i| format!("{node_name}_o{i}")).collect();
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.clone(),
            name: Some(node_name),
            op_type: Some(op_type.to_string()),
            attribute: attrs.into_iter().map(|(k, v)| attribute(k, v)).collect(),
            ..Default::default()
        });
        outputs
    }

    /// Wraps the graph in a model with IR 10 and the default-domain opset `opset`.
    pub fn finish(self, opset: i64, doc: &str, metadata: &[(&str, String)]) -> ModelProto {
        let graph = GraphProto {
            node: self.nodes,
            name: Some(self.name),
            initializer: self.initializers,
            input: self.inputs,
            output: self.outputs,
            ..Default::default()
        };
        ModelProto {
            ir_version: Some(IR_VERSION),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(opset),
            }],
            producer_name: Some("droppos-pipeline".into()),
            producer_version: Some(env!("CARGO_PKG_VERSION").into()),
            doc_string: Some(doc.to_string()),
            graph: Some(graph),
            metadata_props: metadata
                .iter()
                .map(|(k, v)| StringStringEntryProto {
                    key: Some(k.to_string()),
                    value: Some(v.clone()),
                })
                .collect(),
            ..Default::default()
        }
    }
}
