//! Per-sequence key/value cache. Memory grows in fixed pages as the sequence grows, so a
//! model with a 32K training context does not reserve 32K positions for a 20-token chat,
//! and nothing is ever copied to grow it (candle#1188 measured what concatenation costs).
//!
//! Within a page, each KV head's keys (and values) for the page's positions are contiguous
//! (`[kv_head][position][head_dim]`): attention reads one head's keys for every position,
//! and this layout makes that a sequential stream instead of `n_head_kv` interleaved ones.
//! Entries stay f32: the synthetic-model tests hold the engine to 1e-5 between one pass and
//! one pass per prefix, which f16 rounding of cached keys would not meet.

use std::ops::Range;

/// Positions per page: large enough that page bookkeeping is negligible, small enough
/// that a short sequence wastes little. The last page of a sequence holds only the
/// positions up to its capacity, so nothing is allocated past what it may use.
pub const PAGE_POSITIONS: usize = 256;

pub struct KvCache {
    n_layer: usize,
    n_head_kv: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
    /// [layer][page] -> `n_head_kv * page_positions(page) * head_dim` keys; the same for
    /// values.
    keys: Vec<Vec<Box<[f32]>>>,
    values: Vec<Vec<Box<[f32]>>>,
}

/// Consecutive positions of one KV head whose keys and values are contiguous in memory.
pub struct HeadRun<'a> {
    /// The first position of the run.
    pub start: usize,
    /// `len * head_dim` keys, position-major.
    pub keys: &'a [f32],
    /// `len * head_dim` values, position-major.
    pub values: &'a [f32],
}

impl KvCache {
    /// An empty cache able to hold up to `capacity` positions of `n_head_kv` heads of
    /// `head_dim` values, in each of `n_layer` layers.
    pub fn new(n_layer: usize, n_head_kv: usize, head_dim: usize, capacity: usize) -> Self {
        Self {
            n_layer,
            n_head_kv,
            head_dim,
            capacity,
            len: 0,
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
                self.keys[layer].push(vec![0.0; len].into_boxed_slice());
                self.values[layer].push(vec![0.0; len].into_boxed_slice());
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
            self.keys[layer][page][at..at + hd].copy_from_slice(k);
            self.values[layer][page][at..at + hd].copy_from_slice(v);
        }
    }

    /// Head `kv_head`'s key at `pos`.
    pub fn key(&self, layer: usize, pos: usize, kv_head: usize) -> &[f32] {
        let (page, at) = self.slot(pos, kv_head);
        &self.keys[layer][page][at..at + self.head_dim]
    }

    /// Head `kv_head`'s value at `pos`.
    pub fn value(&self, layer: usize, pos: usize, kv_head: usize) -> &[f32] {
        let (page, at) = self.slot(pos, kv_head);
        &self.values[layer][page][at..at + self.head_dim]
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
                keys: &self.keys[layer][page][span.clone()],
                values: &self.values[layer][page][span],
            })
        })
    }

    /// Bytes currently allocated (reported in usage and benches).
    pub fn allocated_bytes(&self) -> usize {
        let values: usize = self.keys.iter().flatten().map(|page| page.len()).sum();
        values * 2 * std::mem::size_of::<f32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_allocated_on_demand_and_values_round_trip() {
        let mut cache = KvCache::new(2, 2, 2, 1024);
        assert_eq!(cache.allocated_bytes(), 0);
        cache.reserve_to(PAGE_POSITIONS + 1);
        assert_eq!(cache.allocated_bytes(), 2 * 2 * 2 * PAGE_POSITIONS * 4 * 4);
        // A capacity that ends inside a page allocates only up to it.
        let mut short = KvCache::new(1, 2, 2, PAGE_POSITIONS + 3);
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
            run.map(|r| (r.start, r.keys.len(), r.keys[4..].to_vec())),
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
        let mut cache = KvCache::new(1, n_head_kv, hd, 4 * PAGE_POSITIONS);
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
                for (k, v) in run.keys.chunks_exact(hd).zip(run.values.chunks_exact(hd)) {
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
}
