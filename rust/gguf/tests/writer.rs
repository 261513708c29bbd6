//! A hand-rolled GGUF writer for tests: builds valid files and, through its raw knobs
//! (explicit type ids, dims, offsets, data lengths), every kind of broken one.

pub const T_U8: u32 = 0;
pub const T_I8: u32 = 1;
pub const T_U16: u32 = 2;
pub const T_I16: u32 = 3;
pub const T_U32: u32 = 4;
pub const T_I32: u32 = 5;
pub const T_F32: u32 = 6;
pub const T_BOOL: u32 = 7;
pub const T_STRING: u32 = 8;
pub const T_ARRAY: u32 = 9;
pub const T_U64: u32 = 10;
pub const T_I64: u32 = 11;
pub const T_F64: u32 = 12;

/// An encoded metadata value: its type id and its bytes.
#[derive(Clone)]
pub struct Value {
    pub type_id: u32,
    pub bytes: Vec<u8>,
}

pub fn string_bytes(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

pub fn u8v(v: u8) -> Value {
    Value {
        type_id: T_U8,
        bytes: vec![v],
    }
}
pub fn i32v(v: i32) -> Value {
    Value {
        type_id: T_I32,
        bytes: v.to_le_bytes().to_vec(),
    }
}
pub fn u32v(v: u32) -> Value {
    Value {
        type_id: T_U32,
        bytes: v.to_le_bytes().to_vec(),
    }
}
pub fn u64v(v: u64) -> Value {
    Value {
        type_id: T_U64,
        bytes: v.to_le_bytes().to_vec(),
    }
}
pub fn f32v(v: f32) -> Value {
    Value {
        type_id: T_F32,
        bytes: v.to_le_bytes().to_vec(),
    }
}
pub fn boolv(v: bool) -> Value {
    Value {
        type_id: T_BOOL,
        bytes: vec![u8::from(v)],
    }
}
pub fn strv(s: &str) -> Value {
    Value {
        type_id: T_STRING,
        bytes: string_bytes(s),
    }
}

/// An array of `count` elements of `element_type` whose encoded elements are `body`.
pub fn raw_array(element_type: u32, count: u64, body: Vec<u8>) -> Value {
    let mut bytes = element_type.to_le_bytes().to_vec();
    bytes.extend_from_slice(&count.to_le_bytes());
    bytes.extend_from_slice(&body);
    Value {
        type_id: T_ARRAY,
        bytes,
    }
}

pub fn str_array(items: &[&str]) -> Value {
    raw_array(
        T_STRING,
        items.len() as u64,
        items.iter().flat_map(|s| string_bytes(s)).collect(),
    )
}
pub fn f32_array(items: &[f32]) -> Value {
    raw_array(
        T_F32,
        items.len() as u64,
        items.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
}
pub fn i32_array(items: &[i32]) -> Value {
    raw_array(
        T_I32,
        items.len() as u64,
        items.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
}

#[derive(Clone)]
pub struct TensorSpec {
    pub name: String,
    pub dims: Vec<u64>,
    pub type_id: u32,
    /// Relative offset to write; None = the running padded sum, as real writers do.
    pub offset: Option<u64>,
    /// Data bytes to append; None = the size the type and dims imply.
    pub data_len: Option<usize>,
    /// n_dims to write; None = dims.len().
    pub n_dims: Option<u32>,
}

#[derive(Clone)]
pub struct GgufWriter {
    pub magic: [u8; 4],
    pub version: u32,
    pub kvs: Vec<(String, Value)>,
    pub tensors: Vec<TensorSpec>,
    /// Overrides the declared counts (the entries written are unchanged).
    pub n_tensors_override: Option<u64>,
    pub n_kv_override: Option<u64>,
    /// Alignment used for padding; follows general.alignment when set via `alignment()`.
    pub align: u64,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self {
            magic: *b"GGUF",
            version: 3,
            kvs: Vec::new(),
            tensors: Vec::new(),
            n_tensors_override: None,
            n_kv_override: None,
            align: 32,
        }
    }
}

/// ggml (block size, bytes per block) for the type ids the tests use.
pub fn block_geometry(type_id: u32) -> (u64, u64) {
    match type_id {
        0 => (1, 4),
        1 | 30 => (1, 2),
        2 => (32, 18),
        3 => (32, 20),
        8 => (32, 34),
        12 => (256, 144),
        14 => (256, 210),
        _ => (1, 1),
    }
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn kv(mut self, key: &str, value: Value) -> Self {
        self.kvs.push((key.to_string(), value));
        self
    }

    pub fn alignment(mut self, alignment: u32) -> Self {
        self.align = u64::from(alignment);
        self.kv("general.alignment", u32v(alignment))
    }

    pub fn tensor(mut self, name: &str, dims: &[u64], type_id: u32) -> Self {
        self.tensors.push(TensorSpec {
            name: name.to_string(),
            dims: dims.to_vec(),
            type_id,
            offset: None,
            data_len: None,
            n_dims: None,
        });
        self
    }

    /// Edits the last tensor added.
    pub fn with_last(mut self, edit: impl FnOnce(&mut TensorSpec)) -> Self {
        if let Some(last) = self.tensors.last_mut() {
            edit(last);
        }
        self
    }

    fn natural_size(spec: &TensorSpec) -> u64 {
        let (block, type_size) = block_geometry(spec.type_id);
        let n: u64 = spec.dims.iter().fold(1u64, |acc, &d| acc.wrapping_mul(d));
        n / block * type_size
    }

    pub fn build(&self) -> Vec<u8> {
        let mut out = self.magic.to_vec();
        out.extend_from_slice(&self.version.to_le_bytes());
        let n_tensors = self.n_tensors_override.unwrap_or(self.tensors.len() as u64);
        let n_kv = self.n_kv_override.unwrap_or(self.kvs.len() as u64);
        out.extend_from_slice(&n_tensors.to_le_bytes());
        out.extend_from_slice(&n_kv.to_le_bytes());
        for (key, value) in &self.kvs {
            out.extend_from_slice(&string_bytes(key));
            out.extend_from_slice(&value.type_id.to_le_bytes());
            out.extend_from_slice(&value.bytes);
        }
        let align = self.align.max(1);
        let pad = |n: u64| n.div_ceil(align).saturating_mul(align);
        let mut running = 0u64;
        let mut data_lens = Vec::new();
        for spec in &self.tensors {
            out.extend_from_slice(&string_bytes(&spec.name));
            let n_dims = spec.n_dims.unwrap_or(spec.dims.len() as u32);
            out.extend_from_slice(&n_dims.to_le_bytes());
            for d in &spec.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&spec.type_id.to_le_bytes());
            let offset = spec.offset.unwrap_or(running);
            out.extend_from_slice(&offset.to_le_bytes());
            let len = spec
                .data_len
                .map_or_else(|| Self::natural_size(spec), |l| l as u64);
            data_lens.push((offset, len));
            running = pad(offset.saturating_add(len));
        }
        if !self.tensors.is_empty() {
            out.resize(pad(out.len() as u64) as usize, 0);
            let data_start = out.len();
            // Lay data where the offsets say, so overridden offsets stay consistent; the
            // file ends exactly at the last byte of the last tensor.
            let end = data_lens
                .iter()
                .map(|(o, l)| o.saturating_add(*l))
                .max()
                .unwrap_or(0);
            let end = usize::try_from(end).unwrap_or(0).min(1 << 20);
            out.resize(data_start + end, 0);
            for (i, byte) in out[data_start..].iter_mut().enumerate() {
                *byte = (i % 251) as u8;
            }
        }
        out
    }
}

/// A small valid file: metadata of several types plus three tensors of different types.
pub fn valid_small() -> GgufWriter {
    GgufWriter::new()
        .kv("general.architecture", strv("llama"))
        .kv("llama.block_count", u32v(2))
        .kv("llama.rope.freq_base", f32v(10000.0))
        .kv(
            "tokenizer.ggml.tokens",
            str_array(&["<s>", "</s>", "a", "é"]),
        )
        .kv("tokenizer.ggml.scores", f32_array(&[0.0, 0.0, -1.0, -2.0]))
        .kv("tokenizer.ggml.token_type", i32_array(&[3, 3, 1, 1]))
        .kv("tokenizer.ggml.add_bos_token", boolv(true))
        .tensor("token_embd.weight", &[64, 4], 8)
        .tensor("output_norm.weight", &[64], 0)
        .tensor("blk.0.ffn_down.weight", &[256, 2], 12)
}
