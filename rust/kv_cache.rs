//! Per-sequence key/value cache. Memory grows in fixed pages as the sequence grows, so a
//! model with a 32K training context does not reserve 32K positions for a 20-token chat,
//! and nothing is ever copied to grow it (candle#1188 measured what concatenation costs).
//!
//! Within a page, each KV head's keys (and values) for the page's positions are contiguous
//! (`[kv_head][position][head_dim]`): attention reads one head's keys for every position,
//! and this layout makes that a sequential stream instead of `n_head_kv` interleaved ones.
//!
//! Entries are f16 by default, as llama.cpp's (`type_k`/`type_v` = f16): half the memory
//! and half the bytes attention reads per token. f32 entries are kept for exactness
//! checks: the synthetic-model tests hold the engine to 1e-5 between one pass and one pass
//! per prefix, and the golden files were made with llama.cpp's f32 cache.

use std::ops::Range;

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::error::{EngineError, Result};

/// Positions per page: large enough that page bookkeeping is negligible, small enough
/// that a short sequence wastes little. The last page of a sequence holds only the
/// positions up to its capacity, so nothing is allocated past what it may use.
pub const PAGE_POSITIONS: usize = 256;

/// How cached keys and values are stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KvType {
    /// IEEE half precision, rounded to nearest even as the K/V projections are stored
    /// (llama.cpp's default cache type).
    #[default]
    F16,
    F32,
}

impl KvType {
    pub const ALL: [KvType; 2] = [Self::F16, Self::F32];

    /// The name used by the Python API (`kv_cache_type=`), as llama.cpp's type names.
    pub fn name(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::F32 => "f32",
        }
    }

    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name() == name.trim().to_ascii_lowercase())
            .ok_or_else(|| {
                EngineError::invalid(
                    "kv_cache_type",
                    format!("{name:?} is not one of \"f16\", \"f32\""),
                )
            })
    }

    fn bytes(self) -> usize {
        match self {
            Self::F16 => 2,
            Self::F32 => 4,
        }
    }
}

/// One page of one layer's keys or values.
enum Page {
    F32(Box<[f32]>),
    F16(Box<[f16]>),
}

impl Page {
    fn zeroed(ty: KvType, len: usize) -> Self {
        match ty {
            KvType::F32 => Self::F32(vec![0.0; len].into_boxed_slice()),
            KvType::F16 => Self::F16(vec![f16::ZERO; len].into_boxed_slice()),
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::F32(p) => p.len(),
            Self::F16(p) => p.len(),
        }
    }

    fn write(&mut self, at: usize, src: &[f32]) {
        match self {
            Self::F32(p) => p[at..at + src.len()].copy_from_slice(src),
            Self::F16(p) => p[at..at + src.len()].convert_from_f32_slice(src),
        }
    }

    fn rows(&self, span: Range<usize>) -> CacheRows<'_> {
        match self {
            Self::F32(p) => CacheRows::F32(&p[span]),
            Self::F16(p) => CacheRows::F16(&p[span]),
        }
    }
}

/// Cached entries as stored: consecutive rows of `head_dim` values.
#[derive(Clone, Copy)]
pub enum CacheRows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl CacheRows<'_> {
    /// Values held (rows × `head_dim`).
    pub fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::F16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values `range` as f32 (exactly: every f16 is an f32).
    pub fn widen_into(&self, range: Range<usize>, out: &mut [f32]) {
        match self {
            Self::F32(v) => out.copy_from_slice(&v[range]),
            Self::F16(v) => crate::kernels::ggml_f32::widen_f16(&v[range], out),
        }
    }

    /// Every value as f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        self.widen_into(0..self.len(), &mut out);
        out
    }
}

pub struct KvCache {
    n_layer: usize,
    n_head_kv: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
    kv_type: KvType,
    /// [layer][page] -> `n_head_kv * page_positions(page) * head_dim` keys; the same for
    /// values.
    keys: Vec<Vec<Page>>,
    values: Vec<Vec<Page>>,
}

/// Consecutive positions of one KV head whose keys and values are contiguous in memory.
pub struct HeadRun<'a> {
    /// The first position of the run.
    pub start: usize,
    /// `len * head_dim` keys, position-major.
    pub keys: CacheRows<'a>,
    /// `len * head_dim` values, position-major.
    pub values: CacheRows<'a>,
}

impl KvCache {
    /// An empty cache able to hold up to `capacity` positions of `n_head_kv` heads of
    /// `head_dim` values, in each of `n_layer` layers, stored as `kv_type`.
    pub fn new(
        n_layer: usize,
        n_head_kv: usize,
        head_dim: usize,
        capacity: usize,
        kv_type: KvType,
    ) -> Self {
        Self {
            n_layer,
            n_head_kv,
            head_dim,
            capacity,
            len: 0,
            kv_type,
            keys: (0..n_layer).map(|_| Vec::new()).collect(),
            values: (0..n_layer).map(|_| Vec::new()).collect(),
        }
    }

    /// Positions filled so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    pub fn n_head_kv(&self) -> usize {
        self.n_head_kv
    }

    pub fn kv_type(&self) -> KvType {
        self.kv_type
    }

    /// Forgets positions from `len` on (prefix reuse keeps the rest); pages stay allocated.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Positions page `page` holds: `PAGE_POSITIONS`, except the last page, which ends at
    /// the capacity.
    fn page_positions(&self, page: usize) -> usize {
        PAGE_POSITIONS.min(self.capacity.saturating_sub(page * PAGE_POSITIONS))
    }

    /// Makes room for positions up to `end` (exclusive, at most the capacity) in every layer.
    pub fn reserve_to(&mut self, end: usize) {
        let end = end.min(self.capacity);
        let pages_needed = end.div_ceil(PAGE_POSITIONS);
        for layer in 0..self.n_layer {
            while self.keys[layer].len() < pages_needed {
                let page = self.keys[layer].len();
                let len = self.n_head_kv * self.page_positions(page) * self.head_dim;
                self.keys[layer].push(Page::zeroed(self.kv_type, len));
                self.values[layer].push(Page::zeroed(self.kv_type, len));
            }
        }
    }

    /// Marks positions up to `end` as filled, after every layer has written them.
    pub fn set_len(&mut self, end: usize) {
        debug_assert!(end <= self.keys.first().map_or(0, |p| p.len() * PAGE_POSITIONS));
        self.len = end;
    }

    /// Page of `pos` and the offset of head `kv_head`'s entry within it.
    fn slot(&self, pos: usize, kv_head: usize) -> (usize, usize) {
        let page = pos / PAGE_POSITIONS;
        let in_page = pos % PAGE_POSITIONS;
        (
            page,
            (kv_head * self.page_positions(page) + in_page) * self.head_dim,
        )
    }

    /// Stores one position's keys and values (`n_head_kv * head_dim` each, head-major as
    /// the K/V projections produce them).
    pub fn store(&mut self, layer: usize, pos: usize, key: &[f32], value: &[f32]) {
        let hd = self.head_dim;
        for (h, (k, v)) in key.chunks_exact(hd).zip(value.chunks_exact(hd)).enumerate() {
            let (page, at) = self.slot(pos, h);
            self.keys[layer][page].write(at, k);
            self.values[layer][page].write(at, v);
        }
    }

    /// Head `kv_head`'s key at `pos`, as f32.
    pub fn key(&self, layer: usize, pos: usize, kv_head: usize) -> Vec<f32> {
        let (page, at) = self.slot(pos, kv_head);
        self.keys[layer][page]
            .rows(at..at + self.head_dim)
            .to_f32_vec()
    }

    /// Head `kv_head`'s value at `pos`, as f32.
    pub fn value(&self, layer: usize, pos: usize, kv_head: usize) -> Vec<f32> {
        let (page, at) = self.slot(pos, kv_head);
        self.values[layer][page]
            .rows(at..at + self.head_dim)
            .to_f32_vec()
    }

    /// Head `kv_head`'s keys and values for `positions` (which must have been reserved),
    /// as one contiguous run per page touched, in position order.
    pub fn head_runs(
        &self,
        layer: usize,
        kv_head: usize,
        positions: Range<usize>,
    ) -> impl Iterator<Item = HeadRun<'_>> + '_ {
        let hd = self.head_dim;
        let mut next = positions.start;
        std::iter::from_fn(move || {
            if next >= positions.end {
                return None;
            }
            let start = next;
            let end = positions
                .end
                .min((start / PAGE_POSITIONS + 1) * PAGE_POSITIONS);
            next = end;
            let (page, at) = self.slot(start, kv_head);
            let span = at..at + (end - start) * hd;
            Some(HeadRun {
                start,
                keys: self.keys[layer][page].rows(span.clone()),
                values: self.values[layer][page].rows(span),
            })
        })
    }

    /// Bytes currently allocated (reported in usage and benches).
    pub fn allocated_bytes(&self) -> usize {
        let values: usize = self.keys.iter().flatten().map(Page::len).sum();
        values * 2 * self.kv_type.bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_allocated_on_demand_and_values_round_trip() {
        let mut cache = KvCache::new(2, 2, 2, 1024, KvType::F32);
        assert_eq!(cache.allocated_bytes(), 0);
        cache.reserve_to(PAGE_POSITIONS + 1);
        assert_eq!(cache.allocated_bytes(), 2 * 2 * 2 * PAGE_POSITIONS * 4 * 4);
        // A capacity that ends inside a page allocates only up to it.
        let mut short = KvCache::new(1, 2, 2, PAGE_POSITIONS + 3, KvType::F32);
        short.reserve_to(10 * PAGE_POSITIONS);
        assert_eq!(
            short.allocated_bytes(),
            (PAGE_POSITIONS + 3) * 2 * 2 * 2 * 4
        );
        let last = PAGE_POSITIONS + 2;
        short.store(0, last, &[1.0, 2.0, 3.0, 4.0], &[5.0, 6.0, 7.0, 8.0]);
        assert_eq!(short.key(0, last, 1), &[3.0, 4.0]);
        let run = short.head_runs(0, 1, PAGE_POSITIONS..last + 1).last();
        assert_eq!(
            run.map(|r| (r.start, r.keys.len(), r.keys.to_f32_vec()[4..].to_vec())),
            Some((PAGE_POSITIONS, 6, vec![3.0, 4.0]))
        );
        let pos = PAGE_POSITIONS;
        cache.store(1, pos, &[1.0, 2.0, 3.0, 4.0], &[5.0, 6.0, 7.0, 8.0]);
        cache.set_len(pos + 1);
        assert_eq!(cache.key(1, pos, 0), &[1.0, 2.0]);
        assert_eq!(cache.key(1, pos, 1), &[3.0, 4.0]);
        assert_eq!(cache.value(1, pos, 1), &[7.0, 8.0]);
        cache.truncate(3);
        assert_eq!(cache.len(), 3);
    }

    #[test]
    fn head_runs_follow_pages_and_match_single_lookups() {
        let (n_head_kv, hd) = (3, 4);
        let mut cache = KvCache::new(1, n_head_kv, hd, 4 * PAGE_POSITIONS, KvType::F32);
        let end = 2 * PAGE_POSITIONS + 10;
        cache.reserve_to(end);
        for pos in 0..end {
            let key: Vec<f32> = (0..n_head_kv * hd)
                .map(|i| (pos * 100 + i) as f32)
                .collect();
            let value: Vec<f32> = key.iter().map(|k| -k).collect();
            cache.store(0, pos, &key, &value);
        }
        cache.set_len(end);
        for kv_head in 0..n_head_kv {
            let range = 5..end;
            let runs: Vec<HeadRun<'_>> = cache.head_runs(0, kv_head, range.clone()).collect();
            assert_eq!(
                runs.iter().map(|r| r.start).collect::<Vec<_>>(),
                [5, PAGE_POSITIONS, 2 * PAGE_POSITIONS]
            );
            let mut pos = range.start;
            for run in &runs {
                let (keys, values) = (run.keys.to_f32_vec(), run.values.to_f32_vec());
                for (k, v) in keys.chunks_exact(hd).zip(values.chunks_exact(hd)) {
                    assert_eq!(k, cache.key(0, pos, kv_head));
                    assert_eq!(v, cache.value(0, pos, kv_head));
                    assert_eq!(k[0], (pos * 100 + kv_head * hd) as f32);
                    pos += 1;
                }
            }
            assert_eq!(pos, end);
        }
        assert_eq!(cache.head_runs(0, 0, 7..7).count(), 0);
    }

    #[test]
    fn f16_entries_round_to_nearest_even_and_take_half_the_memory() {
        let mut cache = KvCache::new(1, 1, 4, 8, KvType::F16);
        cache.reserve_to(1);
        assert_eq!(cache.allocated_bytes(), 8 * 4 * 2 * 2);
        // 1 + 2^-11 lies halfway between two halves and rounds to the even one (1.0);
        // 1 + 3 * 2^-11 rounds up; 65520 overflows to +inf, as F16C's conversion does.
        let key = [
            1.0 + 2f32.powi(-11),
            1.0 + 3.0 * 2f32.powi(-11),
            65520.0,
            -0.1,
        ];
        cache.store(0, 0, &key, &[0.5, 1e-8, -2.0, 3.0]);
        let stored = cache.key(0, 0, 0);
        assert_eq!(stored[..3], [1.0, 1.0 + 2f32.powi(-9), f32::INFINITY]);
        assert_eq!(stored[3], half::f16::from_f32(-0.1).to_f32());
        assert_eq!(cache.value(0, 0, 0), [0.5, 0.0, -2.0, 3.0]);
        assert_eq!(KvType::from_name(" F16").unwrap(), KvType::F16);
        assert!(KvType::from_name("q8_0").is_err());
    }
}
