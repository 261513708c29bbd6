//! Every malformation is an error, and the message names the problem and the culprit.

use super::writer::*;
use crate::gguf::GgufFile;
use crate::EngineError;

fn error_of(bytes: Vec<u8>) -> EngineError {
    match GgufFile::from_bytes(bytes) {
        Ok(file) => panic!("expected an error, got {file:?}"),
        Err(e) => e,
    }
}

/// Asserts a malformed-file error whose message contains every needle.
fn assert_malformed(bytes: Vec<u8>, needles: &[&str]) {
    let err = error_of(bytes);
    let text = err.to_string();
    assert!(
        matches!(err, EngineError::MalformedFile { .. }),
        "not MalformedFile: {text}"
    );
    for needle in needles {
        assert!(
            text.contains(needle),
            "{text:?} does not mention {needle:?}"
        );
    }
}

fn assert_unsupported(bytes: Vec<u8>, needles: &[&str]) {
    let err = error_of(bytes);
    let text = err.to_string();
    assert!(
        matches!(err, EngineError::Unsupported { .. }),
        "not Unsupported: {text}"
    );
    for needle in needles {
        assert!(
            text.contains(needle),
            "{text:?} does not mention {needle:?}"
        );
    }
}

#[test]
fn bad_magic_shows_the_bytes_found() {
    let mut w = valid_small();
    w.magic = *b"GGML";
    assert_malformed(w.build(), &["magic", "47, 47, 4d, 4c", "GGML"]);
    assert_malformed(Vec::new(), &["magic", "truncated"]);
}

#[test]
fn every_truncation_of_a_valid_file_is_an_error() {
    let bytes = valid_small().build();
    assert!(GgufFile::from_bytes(bytes.clone()).is_ok());
    for len in 0..bytes.len() {
        let err = error_of(bytes[..len].to_vec());
        assert!(
            matches!(err, EngineError::MalformedFile { .. }),
            "prefix {len}: {err}"
        );
    }
}

#[test]
fn versions_other_than_2_and_3_are_rejected() {
    let with_version = |v: u32| {
        let mut w = valid_small();
        w.version = v;
        w.build()
    };
    assert_malformed(with_version(0), &["version 0"]);
    assert_unsupported(with_version(1), &["version 1"]);
    assert_unsupported(with_version(4), &["version 4"]);
    assert_unsupported(
        with_version(3u32.swap_bytes()),
        &["big-endian", "version 3"],
    );
    assert_unsupported(
        with_version(2u32.swap_bytes()),
        &["big-endian", "version 2"],
    );
}

#[test]
fn counts_larger_than_the_file_could_hold() {
    let mut w = valid_small();
    w.n_tensors_override = Some(u64::MAX);
    assert_malformed(w.build(), &["tensor count 18446744073709551615"]);
    let mut w = valid_small();
    w.n_kv_override = Some(1 << 40);
    assert_malformed(w.build(), &["metadata count 1099511627776"]);
    // A count that fits the bound but not the actual entries runs out of bytes.
    let mut w = valid_small();
    w.n_kv_override = Some(8);
    assert!(GgufFile::from_bytes(w.build()).is_err());
}

#[test]
fn huge_string_lengths() {
    // Key length.
    let mut bytes = GgufWriter::new().build();
    bytes[16..24].copy_from_slice(&1u64.to_le_bytes());
    bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
    bytes.extend_from_slice(&[0u8; 64]);
    assert_malformed(bytes, &["metadata key #0", "exceeds the limit"]);

    // Value length within the cap but beyond the file.
    let w = GgufWriter::new().kv(
        "general.name",
        Value {
            type_id: T_STRING,
            bytes: {
                let mut b = 1_000_000u64.to_le_bytes().to_vec();
                b.extend_from_slice(b"short");
                b
            },
        },
    );
    assert_malformed(
        w.build(),
        &["'general.name'", "truncated", "need 1000000 bytes"],
    );

    // A vocabulary element that lies about its length.
    let mut body = string_bytes("ok");
    body.extend_from_slice(&u64::MAX.to_le_bytes());
    let w = GgufWriter::new().kv("tokenizer.ggml.tokens", raw_array(T_STRING, 2, body));
    assert_malformed(
        w.build(),
        &["'tokenizer.ggml.tokens'", "element 1", "exceeds the limit"],
    );
}

#[test]
fn huge_array_lengths() {
    let w = GgufWriter::new().kv(
        "tokenizer.ggml.scores",
        raw_array(T_F32, 1 << 31, vec![0; 16]),
    );
    assert_malformed(
        w.build(),
        &["'tokenizer.ggml.scores'", "2147483648 elements", "limit"],
    );
    let w = GgufWriter::new().kv(
        "tokenizer.ggml.tokens",
        raw_array(T_STRING, 1 << 20, vec![0; 16]),
    );
    assert_malformed(
        w.build(),
        &["'tokenizer.ggml.tokens'", "1048576 elements", "remain"],
    );
    let w = GgufWriter::new().kv("x", raw_array(T_U64, 3, vec![0; 16]));
    assert_malformed(w.build(), &["'x'", "3 elements of at least 8 bytes"]);
}

#[test]
fn nested_arrays_are_capped() {
    let mut value = i32_array(&[1]);
    for _ in 0..10 {
        value = raw_array(T_ARRAY, 1, value.bytes);
    }
    let w = GgufWriter::new().kv("deep", value);
    assert_malformed(w.build(), &["'deep'", "nested"]);
}

#[test]
fn unknown_value_types() {
    let w = GgufWriter::new().kv(
        "weird",
        Value {
            type_id: 13,
            bytes: vec![0; 8],
        },
    );
    assert_malformed(w.build(), &["'weird'", "unknown value type id 13"]);
    let w = GgufWriter::new().kv("weird_array", raw_array(99, 1, vec![0; 8]));
    assert_malformed(w.build(), &["'weird_array'", "unknown value type id 99"]);
}

#[test]
fn invalid_utf8_and_bad_bools() {
    let w = GgufWriter::new().kv(
        "tokenizer.ggml.tokens",
        raw_array(T_STRING, 1, {
            let mut b = 2u64.to_le_bytes().to_vec();
            b.extend_from_slice(&[0xff, 0xfe]);
            b
        }),
    );
    assert_malformed(
        w.build(),
        &["'tokenizer.ggml.tokens'", "element 0", "UTF-8"],
    );
    let mut bytes = GgufWriter::new().build();
    bytes[16..24].copy_from_slice(&1u64.to_le_bytes());
    bytes.extend_from_slice(&2u64.to_le_bytes());
    bytes.extend_from_slice(&[0xc0, 0x80]);
    bytes.extend_from_slice(&T_U8.to_le_bytes());
    bytes.push(1);
    assert_malformed(bytes, &["metadata key #0", "UTF-8"]);
    let w = GgufWriter::new().kv(
        "flag",
        Value {
            type_id: T_BOOL,
            bytes: vec![7],
        },
    );
    assert_malformed(w.build(), &["'flag'", "byte value 7"]);
}

#[test]
fn duplicate_and_empty_keys() {
    let w = valid_small().kv("llama.block_count", u32v(3));
    assert_malformed(w.build(), &["'llama.block_count'", "duplicate"]);
    let w = GgufWriter::new().kv("", u32v(3));
    assert_malformed(w.build(), &["empty key"]);
}

#[test]
fn bad_alignment() {
    let w = valid_small().kv("general.alignment", u64v(32));
    assert_malformed(
        w.build(),
        &["'general.alignment'", "expected u32, found u64"],
    );
    let w = valid_small().kv("general.alignment", u32v(0));
    assert_malformed(w.build(), &["'general.alignment'", "alignment 0"]);
    let w = valid_small().kv("general.alignment", u32v(48));
    assert_malformed(w.build(), &["'general.alignment'", "alignment 48"]);
}

#[test]
fn bad_tensor_names() {
    let w = valid_small().tensor("token_embd.weight", &[32], 0);
    assert_malformed(w.build(), &["'token_embd.weight'", "duplicate tensor"]);
    let long = "x".repeat(64);
    let w = GgufWriter::new().tensor(&long, &[32], 0);
    assert_malformed(w.build(), &["tensor #0 name", "64 bytes long"]);
    let w = GgufWriter::new().tensor("", &[32], 0);
    assert_malformed(w.build(), &["tensor #0 name", "empty"]);
}

#[test]
fn bad_dims() {
    let w = GgufWriter::new().tensor("five_d", &[1, 1, 1, 1, 1], 0);
    assert_malformed(w.build(), &["'five_d'", "n_dims is 5"]);
    let w = GgufWriter::new().tensor("no_dims", &[], 0);
    assert_malformed(w.build(), &["'no_dims'", "n_dims is 0"]);
    let w = GgufWriter::new()
        .tensor("huge_n_dims", &[4], 0)
        .with_last(|t| t.n_dims = Some(u32::MAX));
    assert_malformed(w.build(), &["'huge_n_dims'", "n_dims is 4294967295"]);
    let w = GgufWriter::new()
        .tensor("zero", &[4, 0], 0)
        .with_last(|t| t.data_len = Some(0));
    assert_malformed(w.build(), &["'zero'", "dimension 1 is 0"]);
    let w = GgufWriter::new()
        .tensor("negative", &[u64::MAX], 0)
        .with_last(|t| t.data_len = Some(0));
    assert_malformed(
        w.build(),
        &["'negative'", "dimension 0 is 18446744073709551615"],
    );
    let w = GgufWriter::new()
        .tensor("overflow", &[1 << 32, 1 << 32], 0)
        .with_last(|t| t.data_len = Some(0));
    assert_malformed(w.build(), &["'overflow'", "overflows"]);
    // Element count fits, byte size does not.
    let w = GgufWriter::new()
        .tensor("too_many_bytes", &[1 << 31, 1 << 31], 0)
        .with_last(|t| t.data_len = Some(0));
    assert_malformed(w.build(), &["'too_many_bytes'", "not representable"]);
}

#[test]
fn bad_tensor_types() {
    let w = GgufWriter::new().tensor("mystery", &[32], 99);
    assert_malformed(w.build(), &["'mystery'", "unknown ggml type id 99"]);
    let w = GgufWriter::new().tensor("iq_tensor", &[256], 16);
    assert_unsupported(w.build(), &["'iq_tensor'", "16"]);
    // Q8_0 rows must be whole blocks of 32.
    let w = GgufWriter::new()
        .tensor("ragged", &[33, 2], 8)
        .with_last(|t| t.data_len = Some(68));
    assert_malformed(w.build(), &["'ragged'", "row length 33", "block size 32"]);
}

#[test]
fn bad_tensor_offsets() {
    let w = valid_small().with_last(|t| t.offset = Some(1000 + 4));
    assert_malformed(
        w.build(),
        &[
            "'blk.0.ffn_down.weight'",
            "data offset 1004",
            "alignment 32",
        ],
    );

    let mut bytes = valid_small().build();
    bytes.truncate(bytes.len() - 1);
    assert_malformed(bytes, &["'blk.0.ffn_down.weight'", "past the end"]);

    let w = valid_small().with_last(|t| t.offset = Some(u64::MAX - 31));
    let mut bytes = w.build();
    bytes.truncate(4096);
    assert_malformed(bytes, &["'blk.0.ffn_down.weight'", "past the end"]);

    // Two tensors sharing bytes.
    let w = valid_small().with_last(|t| t.offset = Some(0));
    assert_malformed(w.build(), &["overlaps"]);
}
