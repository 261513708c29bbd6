//! Quantized weight matrix times a batch of activation rows. Each weight row is read once
//! per call and dotted with every token's activations, so prefill and batched decode pay
//! for the weight traffic once per step rather than once per token.

use crate::error::{EngineError, Result};
use crate::gguf::TensorInfo;
use crate::quant::{self, GgmlType, QuantizedActivations};

/// A 2-D weight tensor left in its quantized blocks inside the mapped file.
#[derive(Clone, Debug)]
pub struct WeightMatrix {
    pub name: String,
    pub ty: GgmlType,
    /// Output features.
    pub n_rows: usize,
    /// Input features (the dot-product length).
    pub row_len: usize,
    pub row_bytes: usize,
    /// Absolute byte offset of row 0 in the file.
    pub offset: usize,
}

impl WeightMatrix {
    /// Checks the tensor is 2-D with the expected shape (`row_len` inputs, `n_rows` outputs).
    pub fn from_tensor(info: &TensorInfo, row_len: usize, n_rows: usize) -> Result<Self> {
        let dims: Vec<u64> = info.dims.clone();
        let shape_ok = match dims.as_slice() {
            [cols] => *cols as usize == row_len && n_rows == 1,
            [cols, rows] => *cols as usize == row_len && *rows as usize == n_rows,
            [cols, rows, rest @ ..] => {
                rest.iter().all(|&d| d == 1)
                    && *cols as usize == row_len
                    && *rows as usize == n_rows
            }
            [] => false,
        };
        if !shape_ok {
            return Err(EngineError::malformed(
                format!("tensor {}", info.name),
                format!("shape {dims:?}, expected [{row_len}, {n_rows}]"),
            ));
        }
        Ok(Self {
            name: info.name.clone(),
            ty: info.ggml_type,
            n_rows,
            row_len,
            row_bytes: info.row_bytes(),
            offset: usize::try_from(info.offset).map_err(|_| {
                EngineError::malformed(
                    format!("tensor {}", info.name),
                    "offset exceeds address space",
                )
            })?,
        })
    }

    pub fn row<'a>(&self, file: &'a [u8], r: usize) -> &'a [u8] {
        let start = self.offset + r * self.row_bytes;
        &file[start..start + self.row_bytes]
    }

    /// Dequantises row `r` (an embedding lookup) into `out`.
    pub fn dequantize_row(&self, file: &[u8], r: usize, out: &mut [f32]) -> Result<()> {
        quant::dequantize(self.ty, self.row(file, r), out)
    }
}

/// Activation rows of one layer input, quantized lazily into each format the weights that
/// consume them need (Q/K/V may be stored in different types, e.g. Q5_0 and Q8_0).
#[derive(Default)]
pub struct ActivationBatch {
    n_tokens: usize,
    width: usize,
    /// (activation format, one quantized row per token); valid until `set_input`.
    prepared: Vec<(GgmlType, Vec<QuantizedActivations>)>,
    valid: Vec<bool>,
}

impl ActivationBatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares a new input; previously quantized rows become stale (buffers are kept).
    pub fn set_input(&mut self, n_tokens: usize, width: usize) {
        self.n_tokens = n_tokens;
        self.width = width;
        self.valid.iter_mut().for_each(|v| *v = false);
    }

    /// Quantized rows of `x` (n_tokens × width) for a weight of type `weight_type`.
    pub fn for_weight(
        &mut self,
        weight_type: GgmlType,
        x: &[f32],
    ) -> Result<&[QuantizedActivations]> {
        let format = quant::activation_type(weight_type);
        let slot = match self.prepared.iter().position(|(f, _)| *f == format) {
            Some(i) => i,
            None => {
                self.prepared.push((format, Vec::new()));
                self.valid.push(false);
                self.prepared.len() - 1
            }
        };
        if !self.valid[slot] {
            let rows = &mut self.prepared[slot].1;
            rows.resize_with(self.n_tokens.max(rows.len()), QuantizedActivations::new);
            for (t, row) in rows.iter_mut().take(self.n_tokens).enumerate() {
                row.quantize(weight_type, &x[t * self.width..(t + 1) * self.width])?;
            }
            self.valid[slot] = true;
        }
        Ok(&self.prepared[slot].1[..self.n_tokens])
    }
}

/// `out[t * n_rows + r] = W[r] · x[t]` for every token t and output row r.
pub fn matmul(w: &WeightMatrix, file: &[u8], acts: &[QuantizedActivations], out: &mut [f32]) {
    let n_rows = w.n_rows;
    debug_assert_eq!(out.len(), acts.len() * n_rows);
    for r in 0..n_rows {
        let row = w.row(file, r);
        for (t, act) in acts.iter().enumerate() {
            out[t * n_rows + r] = quant::dot_row(w.ty, row, act);
        }
    }
}
