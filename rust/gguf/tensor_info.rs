//! Tensor descriptors: name, type, dims, offset. Every size is computed with checked
//! arithmetic when the descriptor is read, so later users can rely on the fields.

use super::reader::ByteReader;
use crate::error::{EngineError, Result};
use crate::quant::GgmlType;

/// ggml's GGML_MAX_NAME is 64 including the terminating NUL; a longer name cannot be a
/// tensor ggml itself could hold.
pub const MAX_TENSOR_NAME_BYTES: usize = 63;

/// ggml tensors have at most four dimensions (GGML_MAX_DIMS).
pub const MAX_DIMS: u32 = 4;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the row length (the fastest-varying dimension).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Absolute byte offset of the tensor's data from the start of the file.
    pub offset: u64,
    pub n_elements: u64,
    pub size_bytes: u64,
}

impl TensorInfo {
    /// Number of rows: the product of every dimension but the first.
    pub fn n_rows(&self) -> u64 {
        // Validated at open: the full product fits in u64, so this partial one does too.
        self.dims.iter().skip(1).product()
    }

    /// Elements per row (`dims[0]`).
    pub fn row_len(&self) -> u64 {
        self.dims.first().copied().unwrap_or(0)
    }

    /// Bytes per row; a whole number of blocks, since the row length was checked to be a
    /// multiple of the block size at open.
    pub fn row_bytes(&self) -> usize {
        let blocks = self.row_len() / self.ggml_type.block_size() as u64;
        // At most size_bytes, which fits in usize (checked at open).
        (blocks as usize).saturating_mul(self.ggml_type.type_size())
    }
}

/// A tensor descriptor as stored: the offset is still relative to the data section.
pub(crate) struct RawTensorInfo {
    pub info: TensorInfo,
    pub relative_offset: u64,
}

fn tensor_context(name: &str) -> String {
    format!("tensor '{name}'")
}

/// Reads and validates one tensor descriptor (`index` names it until its name is known).
pub(crate) fn read_tensor_info(reader: &mut ByteReader<'_>, index: u64) -> Result<RawTensorInfo> {
    let name_offset = reader.position();
    let name = reader.str(&format!("tensor #{index} name"))?;
    if name.is_empty() {
        return Err(EngineError::malformed(
            format!("tensor #{index} name"),
            format!("empty tensor name at offset {name_offset}"),
        ));
    }
    if name.len() > MAX_TENSOR_NAME_BYTES {
        let shown: String = name.chars().take(80).collect();
        return Err(EngineError::malformed(
            format!("tensor #{index} name"),
            format!(
                "name '{shown}' is {} bytes long, more than the ggml limit of {MAX_TENSOR_NAME_BYTES}",
                name.len()
            ),
        ));
    }
    let context = tensor_context(name);

    let n_dims = reader.u32(&context)?;
    if !(1..=MAX_DIMS).contains(&n_dims) {
        return Err(EngineError::malformed(
            context,
            format!("n_dims is {n_dims}, must be between 1 and {MAX_DIMS}"),
        ));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    let mut n_elements: u64 = 1;
    for axis in 0..n_dims {
        let dim = reader.u64(&context)?;
        // ggml stores dims as int64_t; zero or negative sizes are not real tensors.
        if dim == 0 || dim > i64::MAX as u64 {
            return Err(EngineError::malformed(
                context,
                format!(
                    "dimension {axis} is {dim}, must be between 1 and {}",
                    i64::MAX
                ),
            ));
        }
        n_elements = n_elements
            .checked_mul(dim)
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| {
                EngineError::malformed(
                    &context,
                    format!("element count overflows: dims so far {dims:?} times {dim}"),
                )
            })?;
        dims.push(dim);
    }

    let type_id = reader.u32(&context)?;
    let ggml_type = GgmlType::from_id(type_id).map_err(|e| match e {
        EngineError::Unsupported { message, .. } => {
            EngineError::unsupported(format!("tensor type of '{name}'"), message)
        }
        EngineError::MalformedFile { message, .. } => EngineError::malformed(&context, message),
        other => other,
    })?;

    let block_size = ggml_type.block_size() as u64;
    let row_len = dims[0];
    if row_len % block_size != 0 {
        return Err(EngineError::malformed(
            context,
            format!(
                "row length {row_len} is not a multiple of the {ggml_type} block size {block_size}"
            ),
        ));
    }
    let size_bytes = ggml_type
        .bytes_for(n_elements)
        .filter(|&bytes| usize::try_from(bytes).is_ok())
        .ok_or_else(|| {
            EngineError::malformed(
                &context,
                format!("byte size of {n_elements} {ggml_type} elements is not representable"),
            )
        })?;

    let relative_offset = reader.u64(&context)?;
    Ok(RawTensorInfo {
        info: TensorInfo {
            name: name.to_string(),
            dims,
            ggml_type,
            offset: 0,
            n_elements,
            size_bytes,
        },
        relative_offset,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn info(dims: Vec<u64>, ggml_type: GgmlType) -> TensorInfo {
        let n_elements = dims.iter().product();
        TensorInfo {
            name: "t".into(),
            dims,
            ggml_type,
            offset: 0,
            n_elements,
            size_bytes: ggml_type.bytes_for(n_elements).unwrap(),
        }
    }

    #[test]
    fn row_geometry() {
        let t = info(vec![576, 49152], GgmlType::Q8_0);
        assert_eq!(t.row_len(), 576);
        assert_eq!(t.n_rows(), 49152);
        assert_eq!(t.row_bytes(), 576 / 32 * 34);
        assert_eq!(t.row_bytes() as u64 * t.n_rows(), t.size_bytes);

        let v = info(vec![7], GgmlType::F32);
        assert_eq!(v.n_rows(), 1);
        assert_eq!(v.row_bytes(), 28);

        let k = info(vec![256, 2, 3, 4], GgmlType::Q4K);
        assert_eq!(k.n_rows(), 24);
        assert_eq!(k.row_bytes(), 144);
    }
}
