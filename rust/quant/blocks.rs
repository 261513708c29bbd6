//! ggml's block layouts (ggml-common.h), one struct per format.
//!
//! The structs are `#[repr(C)]` only so that a compile-time assertion can check that the
//! field list adds up to ggml's block size; they are never transmuted from file bytes. Model
//! data comes from an mmap with no alignment promise, so every block is read field by field
//! with `from_le_bytes` ([`Block::read`]) and activation blocks are written the same way.

use half::f16;

/// Elements in one K-quant super-block (ggml's `QK_K`).
pub const QK_K: usize = super::types::QK_K;

/// A fixed-size block of `ELEMENTS` values stored in `SIZE` bytes.
pub trait Block: Sized + Copy + 'static {
    const SIZE: usize;
    const ELEMENTS: usize;
    /// Reads one block from the first `SIZE` bytes; `None` if there are fewer.
    fn read(bytes: &[u8]) -> Option<Self>;
}

/// The blocks in `bytes`, in order; a trailing partial block is ignored.
pub fn blocks<B: Block>(bytes: &[u8]) -> impl Iterator<Item = B> + '_ {
    bytes.chunks_exact(B::SIZE).filter_map(B::read)
}

/// Consumes a byte slice front to back, one field at a time.
struct FieldReader<'a>(&'a [u8]);

impl FieldReader<'_> {
    fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }

    fn i8s<const N: usize>(&mut self) -> Option<[i8; N]> {
        Some(self.bytes::<N>()?.map(|b| b as i8))
    }

    fn f16(&mut self) -> Option<f16> {
        self.bytes::<2>().map(f16::from_le_bytes)
    }

    fn f32(&mut self) -> Option<f32> {
        self.bytes::<4>().map(f32::from_le_bytes)
    }
}

/// Fills a byte slice front to back, one field at a time.
struct FieldWriter<'a>(&'a mut [u8]);

impl FieldWriter<'_> {
    fn bytes<const N: usize>(&mut self, value: [u8; N]) -> Option<()> {
        let (head, rest) = std::mem::take(&mut self.0).split_first_chunk_mut::<N>()?;
        *head = value;
        self.0 = rest;
        Some(())
    }
}

/// Declares a block struct and checks at compile time that its `repr(C)` size is ggml's.
macro_rules! block_struct {
    ($(#[$doc:meta])* $name:ident, size $size:expr,
     { $($(#[$fdoc:meta])* $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$doc])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, PartialEq)]
        pub struct $name {
            $($(#[$fdoc])* pub $field: $ty),*
        }
        const _: () = assert!(std::mem::size_of::<$name>() == $size);
    };
}

block_struct!(
    /// 4-bit quants with one scale: `x = (q - 8) * d`.
    BlockQ4_0, size 18, {
        d: f16,
        /// Element `j` in the low nibble of byte `j`, element `j + 16` in the high nibble.
        qs: [u8; 16],
    }
);

block_struct!(
    /// 4-bit quants with scale and minimum: `x = q * d + m`.
    BlockQ4_1, size 20, {
        d: f16,
        m: f16,
        qs: [u8; 16],
    }
);

block_struct!(
    /// 5-bit quants with one scale: `x = (q - 16) * d`; bit 4 of element `j` is bit `j` of `qh`.
    BlockQ5_0, size 22, {
        d: f16,
        qh: [u8; 4],
        qs: [u8; 16],
    }
);

block_struct!(
    /// 5-bit quants with scale and minimum: `x = q * d + m`.
    BlockQ5_1, size 24, {
        d: f16,
        m: f16,
        qh: [u8; 4],
        qs: [u8; 16],
    }
);

block_struct!(
    /// 8-bit quants with one scale: `x = q * d`.
    BlockQ8_0, size 34, {
        d: f16,
        qs: [i8; 32],
    }
);

block_struct!(
    /// 8-bit quants as Q8_0 plus `s = d * sum(qs)`, which the `_1` dot products use for the minimum term.
    BlockQ8_1, size 36, {
        d: f16,
        s: f16,
        qs: [i8; 32],
    }
);

block_struct!(
    /// 2-bit quants in 16 groups of 16, each with a 4-bit scale and 4-bit minimum.
    BlockQ2K, size 84, {
        /// Low nibble: scale, high nibble: minimum, of group `i`.
        scales: [u8; 16],
        qs: [u8; 64],
        d: f16,
        dmin: f16,
    }
);

block_struct!(
    /// 3-bit quants (2 low bits in `qs`, the high bit in `hmask`) in 16 groups with 6-bit scales.
    BlockQ3K, size 110, {
        hmask: [u8; 32],
        qs: [u8; 64],
        /// Sixteen 6-bit scales packed into 12 bytes; see [`q3k_scales`].
        scales: [u8; 12],
        d: f16,
    }
);

block_struct!(
    /// 4-bit quants in 8 groups of 32, each with a 6-bit scale and 6-bit minimum.
    BlockQ4K, size 144, {
        d: f16,
        dmin: f16,
        /// Eight scales and eight minimums, 6 bits each; see [`k4_scales_mins`].
        scales: [u8; 12],
        qs: [u8; 128],
    }
);

block_struct!(
    /// 5-bit quants laid out as Q4_K plus one high bit per element in `qh`.
    BlockQ5K, size 176, {
        d: f16,
        dmin: f16,
        scales: [u8; 12],
        qh: [u8; 32],
        qs: [u8; 128],
    }
);

block_struct!(
    /// 6-bit quants (4 low bits in `ql`, 2 high bits in `qh`) in 16 groups with 8-bit scales.
    BlockQ6K, size 210, {
        ql: [u8; 128],
        qh: [u8; 64],
        scales: [i8; 16],
        d: f16,
    }
);

block_struct!(
    /// 8-bit quants with an f32 scale and per-16 sums of the quants; only used for activations.
    BlockQ8K, size 292, {
        d: f32,
        qs: [i8; 256],
        bsums: [i16; 16],
    }
);

macro_rules! impl_block {
    ($name:ident, $elements:expr, |$r:ident| $body:expr) => {
        impl Block for $name {
            const SIZE: usize = std::mem::size_of::<$name>();
            const ELEMENTS: usize = $elements;
            fn read(bytes: &[u8]) -> Option<Self> {
                let mut $r = FieldReader(bytes);
                Some($body)
            }
        }
    };
}

impl_block!(BlockQ4_0, 32, |r| Self {
    d: r.f16()?,
    qs: r.bytes()?
});
impl_block!(BlockQ4_1, 32, |r| Self {
    d: r.f16()?,
    m: r.f16()?,
    qs: r.bytes()?
});
impl_block!(BlockQ5_0, 32, |r| Self {
    d: r.f16()?,
    qh: r.bytes()?,
    qs: r.bytes()?
});
impl_block!(BlockQ5_1, 32, |r| Self {
    d: r.f16()?,
    m: r.f16()?,
    qh: r.bytes()?,
    qs: r.bytes()?
});
impl_block!(BlockQ8_0, 32, |r| Self {
    d: r.f16()?,
    qs: r.i8s()?
});
impl_block!(BlockQ8_1, 32, |r| Self {
    d: r.f16()?,
    s: r.f16()?,
    qs: r.i8s()?
});
impl_block!(BlockQ2K, QK_K, |r| Self {
    scales: r.bytes()?,
    qs: r.bytes()?,
    d: r.f16()?,
    dmin: r.f16()?
});
impl_block!(BlockQ3K, QK_K, |r| Self {
    hmask: r.bytes()?,
    qs: r.bytes()?,
    scales: r.bytes()?,
    d: r.f16()?
});
impl_block!(BlockQ4K, QK_K, |r| Self {
    d: r.f16()?,
    dmin: r.f16()?,
    scales: r.bytes()?,
    qs: r.bytes()?
});
impl_block!(BlockQ5K, QK_K, |r| Self {
    d: r.f16()?,
    dmin: r.f16()?,
    scales: r.bytes()?,
    qh: r.bytes()?,
    qs: r.bytes()?
});
impl_block!(BlockQ6K, QK_K, |r| Self {
    ql: r.bytes()?,
    qh: r.bytes()?,
    scales: r.i8s()?,
    d: r.f16()?
});
impl_block!(BlockQ8K, QK_K, |r| {
    let d = r.f32()?;
    let qs = r.i8s()?;
    let mut bsums = [0i16; 16];
    for sum in &mut bsums {
        *sum = i16::from_le_bytes(r.bytes()?);
    }
    Self { d, qs, bsums }
});

impl BlockQ8_0 {
    /// Writes the block into the first [`Block::SIZE`] bytes of `out`; `None` if `out` is shorter.
    pub fn write(&self, out: &mut [u8]) -> Option<()> {
        let mut w = FieldWriter(out);
        w.bytes(self.d.to_le_bytes())?;
        w.bytes(self.qs.map(|q| q as u8))
    }
}

impl BlockQ8_1 {
    /// Writes the block into the first [`Block::SIZE`] bytes of `out`; `None` if `out` is shorter.
    pub fn write(&self, out: &mut [u8]) -> Option<()> {
        let mut w = FieldWriter(out);
        w.bytes(self.d.to_le_bytes())?;
        w.bytes(self.s.to_le_bytes())?;
        w.bytes(self.qs.map(|q| q as u8))
    }
}

impl BlockQ8K {
    /// Writes the block into the first [`Block::SIZE`] bytes of `out`; `None` if `out` is shorter.
    pub fn write(&self, out: &mut [u8]) -> Option<()> {
        let mut w = FieldWriter(out);
        w.bytes(self.d.to_le_bytes())?;
        w.bytes(self.qs.map(|q| q as u8))?;
        for sum in self.bsums {
            w.bytes(sum.to_le_bytes())?;
        }
        Some(())
    }
}

/// The eight 6-bit scales and eight 6-bit minimums of a Q4_K/Q5_K block (ggml's
/// `get_scale_min_k4` for every group). Groups 0..4 keep both in the low 6 bits of bytes
/// `j` and `j + 4`; groups 4..8 take their low 4 bits from the nibbles of byte `j + 4` and
/// their top 2 bits from the spare top bits of bytes `j - 4` (scale) and `j` (minimum).
#[inline]
pub fn k4_scales_mins(packed: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let mut scales = [0u8; 8];
    let mut mins = [0u8; 8];
    for j in 0..4 {
        scales[j] = packed[j] & 63;
        mins[j] = packed[j + 4] & 63;
        scales[j + 4] = (packed[j + 8] & 0x0F) | ((packed[j] >> 6) << 4);
        mins[j + 4] = (packed[j + 8] >> 4) | ((packed[j + 4] >> 6) << 4);
    }
    (scales, mins)
}

/// The sixteen signed Q3_K group scales (already offset by -32). Scale `i` takes its low
/// 4 bits from a nibble of byte `i % 8` (low nibble for `i < 8`) and its top 2 bits from
/// bits `2 * (i / 4)` of byte `8 + i % 4`.
#[inline]
pub fn q3k_scales(scales: &[u8; 12]) -> [i32; 16] {
    let mut out = [0i32; 16];
    for (i, scale) in out.iter_mut().enumerate() {
        let low = if i < 8 {
            scales[i % 8] & 0x0F
        } else {
            scales[i % 8] >> 4
        };
        let high = (scales[8 + i % 4] >> (2 * (i / 4))) & 3;
        *scale = i32::from(low | (high << 4)) - 32;
    }
    out
}

/// Exact f16 -> f32 widening without `half`'s per-call CPU-feature check, for loops over
/// F16 elements (block scales use `half`). Integer-only, so a flush-to-zero or
/// denormals-are-zero mode inherited from the host process cannot change f16 subnormals.
#[inline]
pub fn f16_bits_to_f32(bits: u16) -> f32 {
    let sign = u32::from(bits & 0x8000) << 16;
    let exponent = u32::from((bits >> 10) & 0x1F);
    let mantissa = u32::from(bits & 0x03FF);
    let magnitude = match (exponent, mantissa) {
        (0, 0) => 0,
        (0, _) => {
            // mantissa * 2^-24 with its top set bit at `top` is 1.f * 2^(top - 24).
            let top = 31 - mantissa.leading_zeros();
            ((top + 103) << 23) | ((mantissa << (23 - top)) & 0x007F_FFFF)
        }
        (0x1F, _) => 0x7F80_0000 | (mantissa << 13),
        _ => ((exponent + 112) << 23) | (mantissa << 13),
    };
    f32::from_bits(sign | magnitude)
}

/// bf16 -> f32 as ggml does it: the bits shifted into the top half, NaN payloads untouched.
#[inline]
pub fn bf16_bits_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// [`f16_bits_to_f32`] of a block scale.
#[inline]
pub fn widen(value: f16) -> f32 {
    f16_bits_to_f32(value.to_bits())
}

/// The 5-bit values of a Q5_0/Q5_1 block: element `j` takes its low 4 bits from nibble
/// `j / 16` of byte `j % 16` and bit 4 from bit `j` of the little-endian `qh`.
#[inline]
pub fn q5_values(qh: [u8; 4], qs: &[u8; 16]) -> [u8; 32] {
    let high = u32::from_le_bytes(qh);
    let mut v = [0u8; 32];
    for (j, q) in qs.iter().enumerate() {
        v[j] = (q & 0x0F) | ((((high >> j) & 1) as u8) << 4);
        v[j + 16] = (q >> 4) | ((((high >> (j + 16)) & 1) as u8) << 4);
    }
    v
}

// K-quant element order. Q2_K, Q3_K: each 128-element half uses 32 bytes of 2-bit quants;
// element `128 * half + 32 * s + l` sits in bits `2 * s` of byte `32 * half + l`. Q4_K, Q5_K:
// each 64 elements use 32 bytes, the low nibbles first. Q6_K: see `BlockQ6K::values`.
// Every 16 (Q2/Q3/Q6) or 32 (Q4/Q5) elements share a scale. The loops run over whole
// bytes, as ggml's do, so the compiler can vectorise them.

impl BlockQ2K {
    /// The 2-bit quants (0..=3) in element order.
    #[inline]
    pub fn values(&self) -> [u8; QK_K] {
        let mut v = [0u8; QK_K];
        for (out, qs) in v.chunks_exact_mut(128).zip(self.qs.chunks_exact(32)) {
            for (s, out) in out.chunks_exact_mut(32).enumerate() {
                for (o, q) in out.iter_mut().zip(qs) {
                    *o = (q >> (2 * s)) & 3;
                }
            }
        }
        v
    }
}

impl BlockQ3K {
    /// The signed 3-bit quants (-4..=3) in element order. The high bit of element `i` is bit
    /// `i / 32` of `hmask[i % 32]`, stored inverted: clear means "subtract 4".
    #[inline]
    pub fn values(&self) -> [i8; QK_K] {
        let mut v = [0i8; QK_K];
        for (half, (out, qs)) in v
            .chunks_exact_mut(128)
            .zip(self.qs.chunks_exact(32))
            .enumerate()
        {
            for (s, out) in out.chunks_exact_mut(32).enumerate() {
                let bit = 4 * half + s;
                for ((o, q), h) in out.iter_mut().zip(qs).zip(&self.hmask) {
                    let low = ((q >> (2 * s)) & 3) as i8;
                    *o = low - 4 * (((h >> bit) & 1) ^ 1) as i8;
                }
            }
        }
        v
    }
}

impl BlockQ4K {
    /// The 4-bit quants (0..=15) in element order.
    #[inline]
    pub fn values(&self) -> [u8; QK_K] {
        let mut v = [0u8; QK_K];
        for (out, qs) in v.chunks_exact_mut(64).zip(self.qs.chunks_exact(32)) {
            let (low, high) = out.split_at_mut(32);
            for ((l, h), q) in low.iter_mut().zip(high).zip(qs) {
                *l = q & 0x0F;
                *h = q >> 4;
            }
        }
        v
    }
}

impl BlockQ5K {
    /// The 5-bit quants (0..=31) in element order; bit 4 of element `i` is bit `i / 32` of
    /// `qh[i % 32]`.
    #[inline]
    pub fn values(&self) -> [u8; QK_K] {
        let mut v = [0u8; QK_K];
        for (j, (out, qs)) in v
            .chunks_exact_mut(64)
            .zip(self.qs.chunks_exact(32))
            .enumerate()
        {
            let (low, high) = out.split_at_mut(32);
            for (((l, h), q), qh) in low.iter_mut().zip(high).zip(qs).zip(&self.qh) {
                *l = (q & 0x0F) | (((qh >> (2 * j)) & 1) << 4);
                *h = (q >> 4) | (((qh >> (2 * j + 1)) & 1) << 4);
            }
        }
        v
    }
}

impl BlockQ6K {
    /// The signed 6-bit quants (-32..=31) in element order. Each 128-element half uses 64
    /// bytes of `ql` (low nibbles: its elements 0..64, high nibbles: 64..128) and 32 bytes of
    /// `qh` (2 bits per element, the four 32-element quarters at shifts 0, 2, 4, 6).
    #[inline]
    pub fn values(&self) -> [i8; QK_K] {
        let mut v = [0i8; QK_K];
        let halves = v
            .chunks_exact_mut(128)
            .zip(self.ql.chunks_exact(64))
            .zip(self.qh.chunks_exact(32));
        for ((out, ql), qh) in halves {
            let (ql_a, ql_b) = ql.split_at(32);
            let (out_ab, out_cd) = out.split_at_mut(64);
            let (out_a, out_b) = out_ab.split_at_mut(32);
            let (out_c, out_d) = out_cd.split_at_mut(32);
            let quarters = out_a.iter_mut().zip(out_b).zip(out_c).zip(out_d);
            for ((((a, b), c), d), ((la, lb), h)) in quarters.zip(ql_a.iter().zip(ql_b).zip(qh)) {
                *a = ((la & 0x0F) | ((h & 3) << 4)) as i8 - 32;
                *b = ((lb & 0x0F) | (((h >> 2) & 3) << 4)) as i8 - 32;
                *c = ((la >> 4) | (((h >> 4) & 3) << 4)) as i8 - 32;
                *d = ((lb >> 4) | (((h >> 6) & 3) << 4)) as i8 - 32;
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::GgmlType;

    #[test]
    fn block_sizes_match_the_type_table() {
        let table = [
            (GgmlType::Q4_0, BlockQ4_0::SIZE, BlockQ4_0::ELEMENTS),
            (GgmlType::Q4_1, BlockQ4_1::SIZE, BlockQ4_1::ELEMENTS),
            (GgmlType::Q5_0, BlockQ5_0::SIZE, BlockQ5_0::ELEMENTS),
            (GgmlType::Q5_1, BlockQ5_1::SIZE, BlockQ5_1::ELEMENTS),
            (GgmlType::Q8_0, BlockQ8_0::SIZE, BlockQ8_0::ELEMENTS),
            (GgmlType::Q8_1, BlockQ8_1::SIZE, BlockQ8_1::ELEMENTS),
            (GgmlType::Q2K, BlockQ2K::SIZE, BlockQ2K::ELEMENTS),
            (GgmlType::Q3K, BlockQ3K::SIZE, BlockQ3K::ELEMENTS),
            (GgmlType::Q4K, BlockQ4K::SIZE, BlockQ4K::ELEMENTS),
            (GgmlType::Q5K, BlockQ5K::SIZE, BlockQ5K::ELEMENTS),
            (GgmlType::Q6K, BlockQ6K::SIZE, BlockQ6K::ELEMENTS),
            (GgmlType::Q8K, BlockQ8K::SIZE, BlockQ8K::ELEMENTS),
        ];
        for (ty, size, elements) in table {
            assert_eq!(ty.type_size(), size, "{ty}");
            assert_eq!(ty.block_size(), elements, "{ty}");
        }
    }

    #[test]
    fn read_takes_fields_in_order_and_rejects_short_input() {
        let mut bytes = vec![0u8; BlockQ4_1::SIZE];
        bytes[..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        bytes[2..4].copy_from_slice(&f16::from_f32(-2.0).to_le_bytes());
        bytes[4] = 0xAB;
        let block = BlockQ4_1::read(&bytes);
        assert_eq!(
            block.map(|b| (b.d.to_f32(), b.m.to_f32(), b.qs[0])),
            Some((0.5, -2.0, 0xAB))
        );
        assert!(BlockQ4_1::read(&bytes[..BlockQ4_1::SIZE - 1]).is_none());
    }

    #[test]
    fn q8_blocks_round_trip_through_bytes() {
        let mut qs = [0i8; 256];
        for (i, q) in qs.iter_mut().enumerate() {
            *q = (i as i32 - 128) as i8;
        }
        let mut bsums = [0i16; 16];
        for (i, s) in bsums.iter_mut().enumerate() {
            *s = -1000 + 137 * i as i16;
        }
        let block = BlockQ8K {
            d: -0.125,
            qs,
            bsums,
        };
        let mut bytes = vec![0u8; BlockQ8K::SIZE];
        assert_eq!(block.write(&mut bytes), Some(()));
        assert_eq!(BlockQ8K::read(&bytes), Some(block));
        assert_eq!(block.write(&mut bytes[1..]), None);

        let block = BlockQ8_1 {
            d: f16::from_f32(0.25),
            s: f16::from_f32(-3.0),
            qs: [-7; 32],
        };
        let mut bytes = [0u8; 36];
        assert_eq!(block.write(&mut bytes), Some(()));
        assert_eq!(BlockQ8_1::read(&bytes), Some(block));
    }

    #[test]
    fn f16_widening_is_exact_for_every_bit_pattern() {
        for bits in 0..=u16::MAX {
            let want = f16::from_bits(bits).to_f32();
            let got = f16_bits_to_f32(bits);
            if want.is_nan() {
                assert!(
                    got.is_nan() && got.is_sign_negative() == want.is_sign_negative(),
                    "{bits:#06x}"
                );
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{bits:#06x}");
            }
        }
    }

    #[test]
    fn k4_scales_unpack_six_bit_fields() {
        // Group j < 4: scale in bits 0..6 of byte j, minimum in bits 0..6 of byte j + 4.
        // Group j >= 4: low nibbles in byte j + 4, top two bits from bytes j - 4 and j.
        let mut scales = [0u8; 12];
        scales[1] = 0b11_000101; // group 1 scale 5; top bits 3 feed group 5's scale
        scales[5] = 0b10_000111; // group 1 min 7; top bits 2 feed group 5's min
        scales[9] = 0x9A; // group 5: scale low nibble 0xA, min low nibble 0x9
        let (sc, mn) = k4_scales_mins(&scales);
        assert_eq!((sc[1], mn[1]), (5, 7));
        assert_eq!((sc[5], mn[5]), (0xA | (3 << 4), 0x9 | (2 << 4)));
    }

    #[test]
    fn q3k_scales_unpack_six_bit_fields() {
        let mut scales = [0u8; 12];
        scales[2] = 0x7C; // scale 2 low nibble 0xC, scale 10 low nibble 0x7
        scales[10] = 0b01_10_11_00; // top bits: scale 2 -> 0, 6 -> 3, 10 -> 2, 14 -> 1
        let s = q3k_scales(&scales);
        assert_eq!(s[2], 0x0C - 32);
        assert_eq!(s[6], (3 << 4) - 32);
        assert_eq!(s[10], (0x7 | (2 << 4)) - 32);
        assert_eq!(s[14], (1 << 4) - 32);
    }
}
