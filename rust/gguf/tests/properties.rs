//! Random damage to a valid file: `from_bytes` must return Ok or Err, never panic, and
//! whatever it accepts must be internally consistent.

use proptest::prelude::*;

use super::writer::valid_small;
use crate::gguf::GgufFile;

/// Values that tend to break size arithmetic, written over counts, lengths, dims and offsets.
const NASTY_U64: [u64; 8] = [
    0,
    1,
    31,
    1 << 30,
    1 << 32,
    i64::MAX as u64,
    u64::MAX - 31,
    u64::MAX,
];

fn check_consistent(bytes: Vec<u8>) {
    let len = bytes.len() as u64;
    if let Ok(file) = GgufFile::from_bytes(bytes) {
        for t in file.tensors() {
            assert!(t.offset + t.size_bytes <= len, "{t:?}");
            assert_eq!(file.tensor_data(t).len() as u64, t.size_bytes);
            assert_eq!(t.row_bytes() as u64 * t.n_rows(), t.size_bytes);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_byte_flips_never_panic(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut bytes = valid_small().build();
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= value;
        }
        check_consistent(bytes);
    }

    #[test]
    fn nasty_words_never_panic(at in any::<prop::sample::Index>(), which in 0..NASTY_U64.len(), width in prop::sample::select(vec![4usize, 8])) {
        let mut bytes = valid_small().build();
        let i = at.index(bytes.len() - width);
        let word = NASTY_U64[which].to_le_bytes();
        bytes[i..i + width].copy_from_slice(&word[..width]);
        check_consistent(bytes);
    }

    #[test]
    fn truncation_and_garbage_tails_never_panic(cut in any::<prop::sample::Index>(), tail in prop::collection::vec(any::<u8>(), 0..64)) {
        let mut bytes = valid_small().build();
        let len = cut.index(bytes.len() + 1);
        bytes.truncate(len);
        bytes.extend_from_slice(&tail);
        check_consistent(bytes);
    }

    #[test]
    fn arbitrary_bytes_after_the_magic_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut bytes = b"GGUF\x03\0\0\0".to_vec();
        bytes.extend_from_slice(&body);
        check_consistent(bytes);
    }
}
