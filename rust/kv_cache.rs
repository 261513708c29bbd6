//! Per-sequence key/value cache. Memory grows in fixed pages as the sequence grows, so a
//! model with a 32K training context does not reserve 32K positions for a 20-token chat,
//! and nothing is ever copied to grow it (candle#1188 measured what concatenation costs).

/// Positions per page: large enough that page bookkeeping is negligible, small enough
/// that a short sequence wastes little.
pub const PAGE_POSITIONS: usize = 256;

pub struct KvCache {
    n_layer: usize,
    kv_dim: usize,
    capacity: usize,
    len: usize,
    /// [layer][page] -> PAGE_POSITIONS * kv_dim keys, then the same for values.
    keys: Vec<Vec<Box<[f32]>>>,
    values: Vec<Vec<Box<[f32]>>>,
}

impl KvCache {
    /// An empty cache able to hold up to `capacity` positions.
    pub fn new(n_layer: usize, kv_dim: usize, capacity: usize) -> Self {
        Self {
            n_layer,
            kv_dim,
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

    /// Forgets positions from `len` on (prefix reuse keeps the rest); pages stay allocated.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Makes room for positions up to `end` (exclusive) in every layer.
    pub fn reserve_to(&mut self, end: usize) {
        let pages_needed = end.div_ceil(PAGE_POSITIONS);
        let page_len = PAGE_POSITIONS * self.kv_dim;
        for layer in 0..self.n_layer {
            while self.keys[layer].len() < pages_needed {
                self.keys[layer].push(vec![0.0; page_len].into_boxed_slice());
                self.values[layer].push(vec![0.0; page_len].into_boxed_slice());
            }
        }
    }

    /// Marks positions up to `end` as filled, after every layer has written them.
    pub fn set_len(&mut self, end: usize) {
        debug_assert!(end <= self.keys.first().map_or(0, |p| p.len() * PAGE_POSITIONS));
        self.len = end;
    }

    fn slot(&self, pos: usize) -> (usize, std::ops::Range<usize>) {
        let start = (pos % PAGE_POSITIONS) * self.kv_dim;
        (pos / PAGE_POSITIONS, start..start + self.kv_dim)
    }

    pub fn store(&mut self, layer: usize, pos: usize, key: &[f32], value: &[f32]) {
        let (page, range) = self.slot(pos);
        self.keys[layer][page][range.clone()].copy_from_slice(key);
        self.values[layer][page][range].copy_from_slice(value);
    }

    pub fn key(&self, layer: usize, pos: usize) -> &[f32] {
        let (page, range) = self.slot(pos);
        &self.keys[layer][page][range]
    }

    pub fn value(&self, layer: usize, pos: usize) -> &[f32] {
        let (page, range) = self.slot(pos);
        &self.values[layer][page][range]
    }

    /// Bytes currently allocated (reported in usage and benches).
    pub fn allocated_bytes(&self) -> usize {
        let pages: usize = self.keys.iter().map(Vec::len).sum();
        pages * 2 * PAGE_POSITIONS * self.kv_dim * std::mem::size_of::<f32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_allocated_on_demand_and_values_round_trip() {
        let mut cache = KvCache::new(2, 4, 1024);
        assert_eq!(cache.allocated_bytes(), 0);
        cache.reserve_to(PAGE_POSITIONS + 1);
        assert_eq!(cache.allocated_bytes(), 2 * 2 * 2 * PAGE_POSITIONS * 4 * 4);
        let pos = PAGE_POSITIONS;
        cache.store(1, pos, &[1.0, 2.0, 3.0, 4.0], &[5.0, 6.0, 7.0, 8.0]);
        cache.set_len(pos + 1);
        assert_eq!(cache.key(1, pos), &[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(cache.value(1, pos), &[5.0, 6.0, 7.0, 8.0]);
        cache.truncate(3);
        assert_eq!(cache.len(), 3);
    }
}
