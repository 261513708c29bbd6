//! Quantized weight matrices times a batch of activation rows, split across the thread pool.
//!
//! Threads claim chunks of output rows (multiples of [`ROW_GRAIN`]) and compute them for
//! every token; a row is computed by the same kernels in the same order whichever thread
//! claims it, so outputs are bit-identical for any number of threads.
//!
//! Within a thread, rows are taken in tiles of [`TILE_ROWS`]: a tile of weight rows is read
//! from memory once and stays in L1 while it is dotted with every token's activations
//! (which stay in L2), so prefill pays for the weight traffic once per chunk of tokens
//! rather than once per token. With one token (decoding), four rows at a time go through
//! the four-row kernel, which loads each activation block once for four weight rows. With
//! several (prefill, or sequences decoded together), a tile meets [`TOKEN_GROUP`] tokens at
//! a time through the batch kernel ([`quant::DotBatchFn`]), which unpacks each weight block
//! of a quad of rows once for all those tokens instead of once per token. Its results are
//! those of llama.cpp for a token at that place of that batch: the single-row kernel's bits,
//! except for the K-quant formats llama.cpp multiplies by other kernels in batches (each
//! activation row carries its place, set through [`ActivationBatch::set_input_placed`]), so
//! a token's outputs do not depend on which other sequences share the call.
//!
//! Several products that read the same input can share one parallel region
//! ([`matmul_fused`] for Q/K/V, [`matmul_gated`] for the gate and up projections with the
//! activation function applied on the fly), which saves a synchronisation per product and
//! balances small matrices (K and V) across threads together with large ones.

use std::cell::RefCell;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::error::{EngineError, Result};
use crate::gguf::TensorInfo;
use crate::quant::{
    self, Dot4Fn, DotBatchFn, DotFn, DotLanesFn, GgmlType, QuantizedActivations, TokenLanes,
    LANE_TOKENS,
};
use crate::threads::{DisjointSlice, ThreadPool};

/// Output rows are handed to threads in multiples of this: a multiple of the four-row
/// kernel, and 64 bytes of f32 output so two threads never write the same cache line.
pub const ROW_GRAIN: usize = 16;

/// Rows of one matrix a thread takes before the same rows of the other in the gated
/// product: long enough for the prefetchers to stream (at 576 Q8_0 inputs, 157 KB),
/// short enough for the up values to live on the stack. A multiple of [`ROW_GRAIN`], so
/// every span but a thread's last has whole vector steps of the activation.
const GATED_SPAN: usize = 256;

/// Weight rows dotted with every token before moving on; 16 rows of the largest matrices of
/// a small model (1536 inputs at about one byte per weight) fit L1 with room for the
/// activation blocks streaming past.
pub const TILE_ROWS: usize = 16;

/// Tokens whose activations meet a tile together in the rows-by-tokens kernels: their
/// activation rows stay in L1 next to the tile while every quad of rows passes them.
/// (16 measured a few percent faster than 8 on SmolLM2 prefill: fewer calls per tile.)
pub const TOKEN_GROUP: usize = 16;

/// A tile's results for a group of tokens, `[token][row in tile]`.
type TileValues = [[f32; TILE_ROWS]; TOKEN_GROUP];

/// Products one fused region takes at most: a fixed array keeps the decode loop
/// allocation-free.
const MAX_FUSED: usize = 4;

// A lanes group fills a `TileValues`.
const _: () = assert!(TOKEN_GROUP == LANE_TOKENS);

/// Fewest tokens a group needs to go through a lanes kernel: it computes all sixteen lanes
/// whatever the count, and below about ten the rows-by-tokens kernels do the fewer tokens
/// in less time.
const LANES_MIN_TOKENS: usize = 10;

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
    /// Each row's `(index, len)` in the batch llama.cpp would multiply it in.
    places: Vec<(usize, usize)>,
    /// (activation format, one quantized row per token); valid until `set_input`.
    prepared: Vec<(GgmlType, Vec<QuantizedActivations>)>,
    valid: Vec<bool>,
}

impl ActivationBatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares a new input of `n_tokens` rows multiplied together as one batch; previously
    /// quantized rows become stale (buffers are kept).
    pub fn set_input(&mut self, n_tokens: usize, width: usize) {
        self.places.clear();
        self.places.extend((0..n_tokens).map(|t| (t, n_tokens)));
        self.n_tokens = n_tokens;
        self.width = width;
        self.valid.iter_mut().for_each(|v| *v = false);
    }

    /// [`Self::set_input`] for rows that sit in batches of their own: row `t` is row
    /// `places[t].0` of a batch of `places[t].1` (see `quant::DotBatchFn`).
    pub fn set_input_placed(&mut self, places: &[(usize, usize)], width: usize) {
        self.set_input(places.len(), width);
        self.places.clear();
        self.places.extend_from_slice(places);
    }

    fn slot(&mut self, format: GgmlType) -> usize {
        match self.prepared.iter().position(|(f, _)| *f == format) {
            Some(i) => i,
            None => {
                self.prepared.push((format, Vec::new()));
                self.valid.push(false);
                self.prepared.len() - 1
            }
        }
    }

    /// Quantizes the rows of `x` (n_tokens × width) for weights of type `weight_type`,
    /// tokens split across `pool`, unless that format is already prepared for this input.
    pub fn prepare(&mut self, pool: &ThreadPool, weight_type: GgmlType, x: &[f32]) -> Result<()> {
        let slot = self.slot(quant::activation_type(weight_type));
        if self.valid[slot] {
            return Ok(());
        }
        let (n_tokens, width) = (self.n_tokens, self.width);
        if x.len() < n_tokens * width {
            return Err(EngineError::Internal(format!(
                "activation input of {} values for {n_tokens} tokens of {width}",
                x.len()
            )));
        }
        let rows = &mut self.prepared[slot].1;
        if rows.len() < n_tokens {
            rows.resize_with(n_tokens, QuantizedActivations::new);
        }
        for (row, &(index, len)) in rows.iter_mut().zip(&self.places) {
            row.set_batch_place(index, len);
        }
        let rows = DisjointSlice::new(&mut rows[..n_tokens]);
        let first_error = Mutex::new(None);
        pool.parallel_for(n_tokens, 1, |tokens| {
            // SAFETY: parallel_for hands each thread its own token range.
            let rows = unsafe { rows.part(tokens.clone()) };
            for (row, t) in rows.iter_mut().zip(tokens) {
                if let Err(e) = row.quantize(weight_type, &x[t * width..(t + 1) * width]) {
                    let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
                    slot.get_or_insert(e);
                    return;
                }
            }
        });
        if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        self.valid[slot] = true;
        Ok(())
    }

    /// The rows prepared for weights of type `weight_type` by [`Self::prepare`].
    pub fn get(&self, weight_type: GgmlType) -> Result<&[QuantizedActivations]> {
        let format = quant::activation_type(weight_type);
        self.prepared
            .iter()
            .zip(&self.valid)
            .find(|((f, _), &valid)| *f == format && valid)
            .map(|((_, rows), _)| &rows[..self.n_tokens])
            .ok_or_else(|| {
                EngineError::Internal(format!(
                    "activations for {weight_type} weights were not prepared"
                ))
            })
    }

    /// Quantized rows of `x` (n_tokens × width) for a weight of type `weight_type`,
    /// quantized on the calling thread.
    pub fn for_weight(
        &mut self,
        weight_type: GgmlType,
        x: &[f32],
    ) -> Result<&[QuantizedActivations]> {
        let slot = self.slot(quant::activation_type(weight_type));
        if !self.valid[slot] {
            let rows = &mut self.prepared[slot].1;
            rows.resize_with(self.n_tokens.max(rows.len()), QuantizedActivations::new);
            for (t, row) in rows.iter_mut().take(self.n_tokens).enumerate() {
                row.quantize(weight_type, &x[t * self.width..(t + 1) * self.width])?;
                let (index, len) = self.places[t];
                row.set_batch_place(index, len);
            }
            self.valid[slot] = true;
        }
        Ok(&self.prepared[slot].1[..self.n_tokens])
    }
}

/// The kernels of one weight type, looked up once per product.
#[derive(Clone, Copy)]
struct Kernels {
    ty: GgmlType,
    one: DotFn,
    four: Dot4Fn,
    batch: DotBatchFn,
    lanes: Option<DotLanesFn>,
}

/// Whether `acts` is a lone token (not part of a larger batch): the matrix-vector path.
fn lone_token(acts: &[QuantizedActivations]) -> Option<&QuantizedActivations> {
    match acts {
        [act] if act.batch_place().1 == 1 => Some(act),
        _ => None,
    }
}

/// `acts` cut into runs of at most [`TOKEN_GROUP`] rows the batch kernels can take together,
/// each with the offset of its first row in `acts`: consecutive rows of one batch, or lone
/// tokens (several sequences' decode steps, which all have a lone token's arithmetic).
fn token_groups(
    acts: &[QuantizedActivations],
) -> impl Iterator<Item = (usize, &[QuantizedActivations])> {
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= acts.len() {
            return None;
        }
        let (first, len) = acts[start].batch_place();
        let continues = |k: usize| {
            let place = acts[start + k].batch_place();
            place == (first + k, len) || (len == 1 && place.1 == 1)
        };
        let mut end = start + 1;
        while end < acts.len() && end - start < TOKEN_GROUP && continues(end - start) {
            end += 1;
        }
        let group = (start, &acts[start..end]);
        start = end;
        Some(group)
    })
}

/// A product's first tokens laid out for its lanes kernel (see `quant::TokenLanes`), in
/// groups of up to [`LANE_TOKENS`]: built once per product before its region (the groups
/// in parallel), read by every thread of the region.
#[derive(Default)]
struct LaneGroups {
    groups: Vec<TokenLanes>,
    /// Each group's tokens among the product's, and whether they take llama.cpp's batched
    /// arithmetic.
    runs: Vec<(Range<usize>, bool)>,
    used: usize,
    /// Tokens `..covered` are in the groups.
    covered: usize,
}

impl LaneGroups {
    /// Lays out `acts` for `kernels`' lanes kernel, in runs of up to [`LANE_TOKENS`] tokens
    /// that llama.cpp multiplies with the same arithmetic, as long as runs have at least
    /// [`LANES_MIN_TOKENS`]. Nothing for types without a lanes kernel or for a lone token.
    /// For the 32-element formats every token has the single-token arithmetic (which is
    /// llama.cpp's batched arithmetic too, see `quant::DotBatchFn`); for Q4_K the tokens its
    /// gemm takes and the others go in separate runs; for Q6_K only tokens of batches its
    /// tiled kernel takes (8 or more) have lanes.
    fn build(&mut self, pool: &ThreadPool, kernels: &Kernels, acts: &[QuantizedActivations]) {
        self.used = 0;
        self.covered = 0;
        self.runs.clear();
        let offset = quant::lanes_offset(kernels.ty);
        let (Some(_), Some(offset), None) = (kernels.lanes, offset, lone_token(acts)) else {
            return;
        };
        let k_quant = matches!(kernels.ty, GgmlType::Q4K | GgmlType::Q6K);
        let batched = |act: &QuantizedActivations| {
            let (index, len) = act.batch_place();
            match kernels.ty {
                GgmlType::Q4K => index < quant::q4_k_gemm_tokens(len),
                GgmlType::Q6K => index < quant::q6_k_tiled_tokens(len),
                _ => false,
            }
        };
        let mut start = 0;
        while start < acts.len() {
            let mode = batched(&acts[start]);
            if kernels.ty == GgmlType::Q6K && !mode {
                // Q6_K's lanes kernel has the tiled kernel's arithmetic only.
                break;
            }
            let mut end = start + 1;
            while end < acts.len() && end - start < LANE_TOKENS && batched(&acts[end]) == mode {
                end += 1;
            }
            if end - start < LANES_MIN_TOKENS {
                break;
            }
            self.runs.push((start..end, mode));
            start = end;
        }
        let n_groups = self.runs.len();
        if self.groups.len() < n_groups {
            self.groups.resize_with(n_groups, TokenLanes::new);
        }
        // The transposition is serial work otherwise: the region's other threads would wait.
        let failed = AtomicBool::new(false);
        let groups = DisjointSlice::new(&mut self.groups[..n_groups]);
        let runs = &self.runs;
        pool.parallel_for(n_groups, 1, |range| {
            // SAFETY: parallel_for hands each thread its own range of groups.
            let mine = unsafe { groups.part(range.clone()) };
            for (group, (tokens, mode)) in mine.iter_mut().zip(&runs[range]) {
                let built = if k_quant {
                    group.build_q8_k(&acts[tokens.clone()], *mode)
                } else {
                    group.build(&acts[tokens.clone()], offset)
                };
                if !built {
                    failed.store(true, Ordering::Relaxed);
                }
            }
        });
        if failed.load(Ordering::Relaxed) {
            // Rows the lanes cannot hold (mixed lengths): all through the batch kernels.
            return;
        }
        self.used = n_groups;
        self.covered = start;
    }

    /// The groups with the index of their first token.
    fn groups(&self) -> impl Iterator<Item = (usize, &TokenLanes)> {
        self.runs
            .iter()
            .map(|(tokens, _)| tokens.start)
            .zip(&self.groups)
            .take(self.used)
    }
}

thread_local! {
    /// The calling thread's lane groups, one per product of a region, kept between regions
    /// so that their buffers are reused.
    static LANE_GROUPS: RefCell<Vec<LaneGroups>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with lane groups built for each of `products` (kernels and activations), the
/// groups of an earlier product reused when it has the same type and activation rows.
fn with_lane_groups<R>(
    pool: &ThreadPool,
    products: &[(Kernels, &[QuantizedActivations])],
    f: impl FnOnce(&[&LaneGroups]) -> R,
) -> R {
    LANE_GROUPS.with_borrow_mut(|cache| {
        if cache.len() < products.len() {
            cache.resize_with(products.len(), LaneGroups::default);
        }
        let mut source = [0usize; MAX_FUSED];
        for (i, (kernels, acts)) in products.iter().enumerate() {
            let same = |(k, a): &(Kernels, &[QuantizedActivations])| {
                k.ty == kernels.ty && std::ptr::eq(*a, *acts)
            };
            source[i] = products[..i].iter().position(same).unwrap_or(i);
            if source[i] == i {
                cache[i].build(pool, kernels, acts);
            }
        }
        let mut views: [&LaneGroups; MAX_FUSED] = [&cache[0]; MAX_FUSED];
        for (i, view) in views.iter_mut().enumerate().take(products.len()) {
            *view = &cache[source[i]];
        }
        f(&views[..products.len()])
    })
}

/// `values[t][i] = W[tile.start + i] · token t` for the tokens of one lanes group, two
/// rows per kernel call (a last odd row paired with itself).
fn dot_tile_lanes(
    kernel: DotLanesFn,
    w: &WeightMatrix,
    file: &[u8],
    tile: Range<usize>,
    lanes: &TokenLanes,
    values: &mut TileValues,
) {
    let mut pair = [[0f32; 2]; LANE_TOKENS];
    let mut r = tile.start;
    while r < tile.end {
        let second = (r + 1).min(tile.end - 1);
        kernel([w.row(file, r), w.row(file, second)], lanes, &mut pair);
        let i = r - tile.start;
        for (v, p) in values.iter_mut().zip(&pair[..lanes.tokens()]) {
            v[i] = p[0];
            if second > r {
                v[i + 1] = p[1];
            }
        }
        r += 2;
    }
}

impl Kernels {
    fn for_type(ty: GgmlType) -> Self {
        Self {
            ty,
            one: quant::kernel_for(ty),
            four: quant::kernel4_for(ty),
            batch: quant::kernel_batch_for(ty),
            lanes: quant::kernels().dot_lanes(ty),
        }
    }

    /// Every token's values for the rows of one tile: `emit(t, values)` with
    /// `values[i] = W[tile.start + i] · acts[t]`, the tokens `lanes` holds through the lanes
    /// kernel, the others through the batch kernel in [`token_groups`].
    #[allow(clippy::too_many_arguments)]
    fn tile_products(
        &self,
        w: &WeightMatrix,
        file: &[u8],
        tile: Range<usize>,
        acts: &[QuantizedActivations],
        lanes: &LaneGroups,
        values: &mut TileValues,
        mut emit: impl FnMut(usize, &[f32]),
    ) {
        if let Some(kernel) = self.lanes {
            for (first, group) in lanes.groups() {
                dot_tile_lanes(kernel, w, file, tile.clone(), group, values);
                for (t, v) in values[..group.tokens()].iter().enumerate() {
                    emit(first + t, &v[..tile.len()]);
                }
            }
        }
        let covered = if self.lanes.is_some() {
            lanes.covered
        } else {
            0
        };
        for (offset, group) in token_groups(&acts[covered..]) {
            self.dot_tile_tokens(w, file, tile.clone(), group, values);
            for (i, v) in values[..group.len()].iter().enumerate() {
                emit(covered + offset + i, &v[..tile.len()]);
            }
        }
    }

    /// `values[t][i] = W[tile.start + i] · acts[t]` for the rows of one tile and up to
    /// [`TOKEN_GROUP`] tokens: quads of rows through the rows-by-tokens kernel (each weight
    /// block unpacked once for the whole group), the rows after the last quad one by one.
    fn dot_tile_tokens(
        &self,
        w: &WeightMatrix,
        file: &[u8],
        tile: Range<usize>,
        acts: &[QuantizedActivations],
        values: &mut TileValues,
    ) {
        let format = quant::activation_type(self.ty);
        if acts.iter().any(|a| a.format() != format) {
            // Unreachable through `ActivationBatch`; NaN rows, as `quant::dot_row` gives.
            values.iter_mut().for_each(|v| v.fill(f32::NAN));
            return;
        }
        if acts.is_empty() {
            return;
        }
        let acts = &acts[..acts.len().min(TOKEN_GROUP)];
        // The group is consecutive rows of one batch, or lone tokens, whose place (0, 1)
        // gives each the single-token arithmetic (see `token_groups`).
        let (first, batch) = acts[0].batch_place();
        let mut quad_values = [[0f32; 4]; TOKEN_GROUP];
        let mut r = tile.start;
        while r + 4 <= tile.end {
            let rows4 = [
                w.row(file, r),
                w.row(file, r + 1),
                w.row(file, r + 2),
                w.row(file, r + 3),
            ];
            (self.batch)(rows4, acts, first, batch, &mut quad_values);
            let i = r - tile.start;
            for (v, q) in values.iter_mut().zip(&quad_values[..acts.len()]) {
                v[i..i + 4].copy_from_slice(q);
            }
            r += 4;
        }
        while r < tile.end {
            // A row after the last quad goes through the batch kernel as a quad of itself:
            // the single-row kernel has the bits of a lone token, not of a batch's.
            let row = w.row(file, r);
            (self.batch)([row; 4], acts, first, batch, &mut quad_values);
            for (v, q) in values.iter_mut().zip(&quad_values[..acts.len()]) {
                v[r - tile.start] = q[0];
            }
            r += 1;
        }
    }

    /// `dst[i] = W[rows.start + i] · act` for the rows of one tile. (The four-row kernels
    /// prefetch the rows that follow theirs; a second prefetch here was measured slower.)
    #[inline]
    fn dot_rows(
        &self,
        w: &WeightMatrix,
        file: &[u8],
        rows: Range<usize>,
        act: &QuantizedActivations,
        dst: &mut [f32],
    ) {
        if act.format() != quant::activation_type(self.ty) {
            // Unreachable through `ActivationBatch`; a NaN row, as `quant::dot_row` gives.
            dst.fill(f32::NAN);
            return;
        }
        let (bytes, n) = (act.bytes(), act.len());
        let mut r = rows.start;
        let mut quads = dst.chunks_exact_mut(4);
        for quad in quads.by_ref() {
            let rows4 = [
                w.row(file, r),
                w.row(file, r + 1),
                w.row(file, r + 2),
                w.row(file, r + 3),
            ];
            quad.copy_from_slice(&(self.four)(rows4, bytes, n));
            r += 4;
        }
        let single = quads.into_remainder();
        for o in single {
            *o = (self.one)(w.row(file, r), bytes, n);
            r += 1;
        }
    }
}

/// `dst = src` for one token's values of a tile: a whole tile as a fixed-size copy (a few
/// vector moves), where a slice copy of unknown length is a `memcpy` call per token and
/// tile (3% of an F16 prefill).
#[inline(always)]
fn copy_tile(dst: &mut [f32], src: &[f32]) {
    match (
        <&mut [f32; TILE_ROWS]>::try_from(&mut *dst),
        <&[f32; TILE_ROWS]>::try_from(src),
    ) {
        (Ok(dst), Ok(src)) => *dst = *src,
        _ => dst.copy_from_slice(src),
    }
}

/// For rows `rows` of `w` and every token `t`: `out[t * w.n_rows + r] = W[r] · acts[t]`,
/// tile by tile (see the module documentation).
fn product_rows(
    w: &WeightMatrix,
    kernels: Kernels,
    file: &[u8],
    acts: &[QuantizedActivations],
    lanes: &LaneGroups,
    rows: Range<usize>,
    out: &DisjointSlice<'_, f32>,
) {
    let mut values: TileValues = [[0f32; TILE_ROWS]; TOKEN_GROUP];
    let mut tile_start = rows.start;
    while tile_start < rows.end {
        let tile = tile_start..(tile_start + TILE_ROWS).min(rows.end);
        if let Some(act) = lone_token(acts) {
            // SAFETY: threads own disjoint row ranges, so for a given token their output
            // ranges are disjoint too, and this thread holds one part at a time.
            let dst = unsafe { out.part(tile.clone()) };
            kernels.dot_rows(w, file, tile.clone(), act, dst);
        } else {
            let emit = |t: usize, v: &[f32]| {
                let base = t * w.n_rows;
                // SAFETY: as above.
                let dst = unsafe { out.part(base + tile.start..base + tile.end) };
                copy_tile(dst, v);
            };
            kernels.tile_products(w, file, tile.clone(), acts, lanes, &mut values, emit);
        }
        tile_start = tile.end;
    }
}

fn check_product(w: &WeightMatrix, acts: &[QuantizedActivations], out: &[f32]) -> Result<()> {
    let expected = acts.len().checked_mul(w.n_rows);
    if expected != Some(out.len()) || acts.iter().any(|a| a.len() != w.row_len) {
        return Err(EngineError::Internal(format!(
            "{}: {} output values for {} tokens of {} inputs (matrix {} x {})",
            w.name,
            out.len(),
            acts.len(),
            acts.first().map_or(0, QuantizedActivations::len),
            w.n_rows,
            w.row_len
        )));
    }
    Ok(())
}

/// `out[t * n_rows + r] = W[r] · x[t]` for every token t and output row r.
pub fn matmul(
    pool: &ThreadPool,
    w: &WeightMatrix,
    file: &[u8],
    acts: &[QuantizedActivations],
    out: &mut [f32],
) -> Result<()> {
    matmul_fused(pool, file, &mut [Product { w, acts, out }])
}

/// One matrix product of a fused region.
pub struct Product<'a> {
    pub w: &'a WeightMatrix,
    pub acts: &'a [QuantizedActivations],
    pub out: &'a mut [f32],
}

/// A product as the threads of a fused region see it.
type FusedPart<'a> = (
    &'a WeightMatrix,
    Kernels,
    &'a [QuantizedActivations],
    DisjointSlice<'a, f32>,
);

/// Several products in one parallel region: their output rows are laid end to end and
/// split across the threads as one range (so K and V, a third the size of Q, do not get
/// a region of their own).
pub fn matmul_fused(pool: &ThreadPool, file: &[u8], products: &mut [Product<'_>]) -> Result<()> {
    for p in products.iter() {
        check_product(p.w, p.acts, p.out)?;
    }
    let total_rows: usize = products
        .iter()
        .map(|p| p.w.n_rows.next_multiple_of(ROW_GRAIN))
        .sum();
    if products.len() > MAX_FUSED {
        return Err(EngineError::Internal(format!(
            "{} products fused into one region; at most {MAX_FUSED}",
            products.len()
        )));
    }
    let n_products = products.len();
    let mut views: [Option<FusedPart<'_>>; MAX_FUSED] = [None, None, None, None];
    for (view, p) in views.iter_mut().zip(products.iter_mut()) {
        *view = Some((
            p.w,
            Kernels::for_type(p.w.ty),
            p.acts,
            DisjointSlice::new(p.out),
        ));
    }
    let mut inputs = [(Kernels::for_type(GgmlType::F32), &[][..]); MAX_FUSED];
    for (input, (_, kernels, acts, _)) in inputs.iter_mut().zip(views.iter().flatten()) {
        *input = (*kernels, *acts);
    }
    with_lane_groups(pool, &inputs[..n_products], |lanes| {
        pool.parallel_for(total_rows, ROW_GRAIN, |range| {
            // Each product occupies `n_rows` rounded up to the grain in the joint row space,
            // so split boundaries fall on grain multiples of every product.
            let mut offset = 0;
            for ((w, kernels, acts, out), lanes) in views.iter().flatten().zip(lanes) {
                let span = w.n_rows.next_multiple_of(ROW_GRAIN);
                let lo = range.start.max(offset);
                let hi = range.end.min(offset + span);
                if lo < hi {
                    let rows = (lo - offset).min(w.n_rows)..(hi - offset).min(w.n_rows);
                    product_rows(w, *kernels, file, acts, lanes, rows, out);
                }
                offset += span;
            }
        });
    });
    Ok(())
}

/// Applies a gated activation in place: `gate[i] = act(gate[i]) * up[i]`
/// (`ggml_f32::swiglu_in_place`, `ops::geglu_tanh_in_place`, ...).
pub type GateFn = fn(gate: &mut [f32], up: &[f32]);

/// The gated feed-forward input: `out[t * n_ff + r] = act(G[r] · x[t]) * (U[r] · x[t])`
/// (SwiGLU with `act` = SiLU, GeGLU with GELU), both products and the activation in one
/// region, so the gate and up outputs never leave the thread that computed them.
#[allow(clippy::too_many_arguments)]
pub fn matmul_gated(
    pool: &ThreadPool,
    file: &[u8],
    gate: &WeightMatrix,
    gate_acts: &[QuantizedActivations],
    up: &WeightMatrix,
    up_acts: &[QuantizedActivations],
    activation: GateFn,
    out: &mut [f32],
) -> Result<()> {
    check_product(gate, gate_acts, out)?;
    check_product(up, up_acts, out)?;
    let n_rows = gate.n_rows;
    let (gate_kernels, up_kernels) = (Kernels::for_type(gate.ty), Kernels::for_type(up.ty));
    let out = DisjointSlice::new(out);
    let inputs = [(gate_kernels, gate_acts), (up_kernels, up_acts)];
    with_lane_groups(pool, &inputs, |lanes| {
        pool.parallel_for(n_rows, ROW_GRAIN, |rows| {
            if let (Some(g_act), Some(u_act)) = (lone_token(gate_acts), lone_token(up_acts)) {
                // Spans of many rows of one matrix, then the same rows of the other: alternating
                // the two matrices tile by tile (16 rows) halved the rate at which a thread
                // streamed them from memory.
                let mut up_span = [0f32; GATED_SPAN];
                let mut span_start = rows.start;
                while span_start < rows.end {
                    let span = span_start..(span_start + GATED_SPAN).min(rows.end);
                    // SAFETY: as in `product_rows`.
                    let dst = unsafe { out.part(span.clone()) };
                    let up_values = &mut up_span[..span.len()];
                    gate_kernels.dot_rows(gate, file, span.clone(), g_act, dst);
                    up_kernels.dot_rows(up, file, span.clone(), u_act, up_values);
                    activation(dst, up_values);
                    span_start = span.end;
                }
                return;
            }
            // Several tokens: the same spans, tile by tile, the gate products written to the
            // output first, then each up product applied to its gate values.
            let mut values: TileValues = [[0f32; TILE_ROWS]; TOKEN_GROUP];
            let mut span_start = rows.start;
            while span_start < rows.end {
                let span = span_start..(span_start + GATED_SPAN).min(rows.end);
                for gate_pass in [true, false] {
                    let (kernels, w, acts, lanes) = if gate_pass {
                        (gate_kernels, gate, gate_acts, lanes[0])
                    } else {
                        (up_kernels, up, up_acts, lanes[1])
                    };
                    let mut tile_start = span.start;
                    while tile_start < span.end {
                        let tile = tile_start..(tile_start + TILE_ROWS).min(span.end);
                        let emit = |t: usize, v: &[f32]| {
                            let base = t * n_rows;
                            // SAFETY: as in `product_rows`.
                            let dst = unsafe { out.part(base + tile.start..base + tile.end) };
                            if gate_pass {
                                copy_tile(dst, v);
                            } else {
                                activation(dst, v);
                            }
                        };
                        kernels.tile_products(
                            w,
                            file,
                            tile.clone(),
                            acts,
                            lanes,
                            &mut values,
                            emit,
                        );
                        tile_start = tile.end;
                    }
                }
                span_start = span.end;
            }
        });
    });
    Ok(())
}

/// The row-by-row product: one thread, one kernel call per (row, token), the reference the
/// tiled, threaded versions are tested against. A token that is part of a batch gets its
/// batch's arithmetic (the batch kernel on a quad of the one row).
pub fn matmul_reference(
    w: &WeightMatrix,
    file: &[u8],
    acts: &[QuantizedActivations],
    out: &mut [f32],
) {
    let n_rows = w.n_rows;
    let batch_kernel = quant::kernel_batch_for(w.ty);
    let mut value = [[0f32; 4]];
    for r in 0..n_rows {
        let row = w.row(file, r);
        for (t, act) in acts.iter().enumerate() {
            let (index, len) = act.batch_place();
            out[t * n_rows + r] = if len == 1 {
                quant::dot_row(w.ty, row, act)
            } else {
                // One (row, token) pair, as its batch computes it.
                batch_kernel([row; 4], std::slice::from_ref(act), index, len, &mut value);
                value[0][0]
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    fn pseudo_random_bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 32) as u8
            })
            .collect()
    }

    fn small_values(n: usize, seed: u64) -> Vec<f32> {
        pseudo_random_bytes(n, seed)
            .iter()
            .map(|&b| (f32::from(b) - 127.5) / 64.0)
            .collect()
    }

    /// Byte offsets of the f16 scale fields in one block of `ty`; random bytes elsewhere
    /// are valid quants, but a random f16 may be NaN or huge.
    fn scale_offsets(ty: GgmlType) -> &'static [usize] {
        match ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
            GgmlType::Q4_1 | GgmlType::Q5_1 => &[0, 2],
            GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
            GgmlType::Q6K => &[208],
            _ => &[],
        }
    }

    /// `n_rows` rows of `row_len` weights of type `ty` with sane scales.
    fn weight_bytes(ty: GgmlType, n_rows: usize, row_len: usize, seed: u64) -> Vec<u8> {
        match ty {
            GgmlType::F32 => small_values(n_rows * row_len, seed)
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            GgmlType::F16 => small_values(n_rows * row_len, seed)
                .iter()
                .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                .collect(),
            _ => {
                let row_bytes = ty.bytes_for(row_len as u64).unwrap() as usize;
                let mut bytes = pseudo_random_bytes(n_rows * row_bytes, seed);
                let block = ty.type_size();
                for (i, b) in bytes.chunks_exact_mut(block).enumerate() {
                    for &at in scale_offsets(ty) {
                        let scale = 0.01 + (i % 7) as f32 * 0.003;
                        b[at..at + 2].copy_from_slice(&f16::from_f32(scale).to_le_bytes());
                    }
                }
                bytes
            }
        }
    }

    fn matrix(ty: GgmlType, n_rows: usize, row_len: usize) -> WeightMatrix {
        WeightMatrix {
            name: format!("test.{ty}"),
            ty,
            n_rows,
            row_len,
            row_bytes: ty.bytes_for(row_len as u64).unwrap() as usize,
            offset: 0,
        }
    }

    const TYPES: [GgmlType; 8] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q6K,
    ];

    #[test]
    fn tiled_threaded_products_equal_the_row_by_row_reference_bit_for_bit() {
        let row_len = 512;
        for ty in TYPES {
            // Row counts that are and are not multiples of the grain, tile and quad.
            for n_rows in [1, 5, 16, 45, 100] {
                let w = matrix(ty, n_rows, row_len);
                let file = weight_bytes(ty, n_rows, row_len, n_rows as u64);
                for n_tokens in [1, 2, 3, 9, 17] {
                    let x = small_values(n_tokens * row_len, 7);
                    let mut batch = ActivationBatch::new();
                    batch.set_input(n_tokens, row_len);
                    let acts = batch.for_weight(ty, &x).unwrap().to_vec();
                    let mut expected = vec![0f32; n_tokens * n_rows];
                    matmul_reference(&w, &file, &acts, &mut expected);
                    assert!(expected.iter().all(|v| v.is_finite()), "{ty}");
                    for threads in [1, 2, 3, 4] {
                        let pool = ThreadPool::new(threads).unwrap();
                        let mut out = vec![f32::NAN; expected.len()];
                        matmul(&pool, &w, &file, &acts, &mut out).unwrap();
                        let same = out
                            .iter()
                            .zip(&expected)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(
                            same,
                            "{ty} {n_rows} rows, {n_tokens} tokens, {threads} threads"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn placed_tokens_get_their_batch_arithmetic_through_the_lanes_kernels() {
        // Lone tokens of many sequences (batched decoding), the end of a prompt batch that
        // straddles Q4_K's gemm/gemv cut (index 52 of 55), and a short batch Q6_K's tiled
        // kernel does not take (7 tokens).
        let lone = vec![(0, 1); 12];
        let straddling: Vec<(usize, usize)> = (40..55).map(|i| (i, 55)).collect();
        let short: Vec<(usize, usize)> = (0..7).map(|i| (i, 7)).collect();
        let mixed: Vec<(usize, usize)> = straddling.iter().chain(&lone).copied().collect();
        let row_len = 512;
        for ty in [GgmlType::Q4K, GgmlType::Q6K, GgmlType::Q8_0, GgmlType::Q5_0] {
            let n_rows = 45;
            let w = matrix(ty, n_rows, row_len);
            let file = weight_bytes(ty, n_rows, row_len, 11);
            for places in [&lone, &straddling, &short, &mixed] {
                let x = small_values(places.len() * row_len, 13);
                let mut batch = ActivationBatch::new();
                batch.set_input_placed(places, row_len);
                let acts = batch.for_weight(ty, &x).unwrap().to_vec();
                let mut expected = vec![0f32; places.len() * n_rows];
                matmul_reference(&w, &file, &acts, &mut expected);
                for threads in [1, 2] {
                    let pool = ThreadPool::new(threads).unwrap();
                    let mut out = vec![f32::NAN; expected.len()];
                    matmul(&pool, &w, &file, &acts, &mut out).unwrap();
                    for (i, (a, b)) in out.iter().zip(&expected).enumerate() {
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "{ty}, token {} of {places:?}, {threads} threads",
                            i / n_rows
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn fused_and_gated_products_equal_separate_ones() {
        let (row_len, n_tokens) = (256, 3);
        let wq = matrix(GgmlType::Q4_0, 70, row_len);
        let wk = matrix(GgmlType::Q8_0, 20, row_len);
        let file_q = weight_bytes(wq.ty, wq.n_rows, row_len, 1);
        let mut file = file_q.clone();
        let wk = WeightMatrix {
            offset: file.len(),
            ..wk
        };
        file.extend(weight_bytes(wk.ty, wk.n_rows, row_len, 2));
        let x = small_values(n_tokens * row_len, 3);
        let pool = ThreadPool::new(3).unwrap();
        let mut batch = ActivationBatch::new();
        batch.set_input(n_tokens, row_len);
        batch.prepare(&pool, wq.ty, &x).unwrap();
        batch.prepare(&pool, wk.ty, &x).unwrap();
        let (acts_q, acts_k) = (batch.get(wq.ty).unwrap(), batch.get(wk.ty).unwrap());

        let mut q_ref = vec![0f32; n_tokens * wq.n_rows];
        let mut k_ref = vec![0f32; n_tokens * wk.n_rows];
        matmul_reference(&wq, &file, acts_q, &mut q_ref);
        matmul_reference(&wk, &file, acts_k, &mut k_ref);
        let mut q = vec![0f32; q_ref.len()];
        let mut k = vec![0f32; k_ref.len()];
        matmul_fused(
            &pool,
            &file,
            &mut [
                Product {
                    w: &wq,
                    acts: acts_q,
                    out: &mut q,
                },
                Product {
                    w: &wk,
                    acts: acts_k,
                    out: &mut k,
                },
            ],
        )
        .unwrap();
        assert_eq!(q, q_ref);
        assert_eq!(k, k_ref);

        // Gated: Q as the gate, a second Q4_0 matrix as up.
        let up = WeightMatrix {
            offset: file.len(),
            ..matrix(GgmlType::Q4_0, 70, row_len)
        };
        file.extend(weight_bytes(up.ty, up.n_rows, row_len, 4));
        let mut up_ref = vec![0f32; q_ref.len()];
        matmul_reference(&up, &file, acts_q, &mut up_ref);
        let mut gated = vec![0f32; q_ref.len()];
        let product: GateFn = |g, u| g.iter_mut().zip(u).for_each(|(g, u)| *g *= 2.0 * u);
        matmul_gated(&pool, &file, &wq, acts_q, &up, acts_q, product, &mut gated).unwrap();
        for ((g, &q), &u) in gated.iter().zip(&q_ref).zip(&up_ref) {
            assert_eq!(g.to_bits(), (q * 2.0 * u).to_bits());
        }
    }

    #[test]
    fn mismatched_shapes_are_errors_not_panics() {
        let w = matrix(GgmlType::Q8_0, 4, 64);
        let file = weight_bytes(w.ty, 4, 64, 1);
        let mut batch = ActivationBatch::new();
        batch.set_input(1, 64);
        let acts = batch
            .for_weight(w.ty, &small_values(64, 2))
            .unwrap()
            .to_vec();
        let pool = ThreadPool::new(2).unwrap();
        let mut out = vec![0f32; 5];
        let err = matmul(&pool, &w, &file, &acts, &mut out).err();
        assert_eq!(
            err.map(|e| e.to_string()).as_deref(),
            Some("internal error in sampler-sdk (please report this bug): test.Q8_0: 5 output values for 1 tokens of 64 inputs (matrix 4 x 64)")
        );
        assert!(batch.get(GgmlType::F16).is_err());
        let mut too_many: Vec<Product<'_>> = Vec::new();
        let mut outs = vec![vec![0f32; 4]; 5];
        for o in &mut outs {
            too_many.push(Product {
                w: &w,
                acts: &acts,
                out: o,
            });
        }
        assert!(matmul_fused(&pool, &file, &mut too_many).is_err());
    }
}
