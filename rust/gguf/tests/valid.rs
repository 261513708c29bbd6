use super::writer::*;
use crate::gguf::{GgufFile, MetadataArray, MetadataValue};
use crate::quant::GgmlType;

#[test]
fn valid_small_file_round_trips() {
    let bytes = valid_small().build();
    let file = GgufFile::from_bytes(bytes.clone()).unwrap();
    assert_eq!(file.version(), 3);
    assert_eq!(file.alignment(), 32);
    assert_eq!(file.data(), &bytes[..]);

    let md = file.metadata();
    assert_eq!(md.len(), 7);
    assert_eq!(md.keys().next(), Some("general.architecture"));
    assert_eq!(md.get_str("general.architecture").unwrap(), Some("llama"));
    assert_eq!(md.require_u32("llama.block_count").unwrap(), 2);
    assert_eq!(md.get_u64("llama.block_count").unwrap(), Some(2));
    assert_eq!(md.require_f32("llama.rope.freq_base").unwrap(), 10000.0);
    assert_eq!(
        md.get_str_array("tokenizer.ggml.tokens").unwrap().unwrap(),
        ["<s>", "</s>", "a", "é"]
    );
    assert_eq!(
        md.get_f32_array("tokenizer.ggml.scores").unwrap().unwrap(),
        [0.0, 0.0, -1.0, -2.0]
    );
    assert_eq!(
        md.get_i32_array("tokenizer.ggml.token_type")
            .unwrap()
            .unwrap(),
        [3, 3, 1, 1]
    );
    assert_eq!(
        md.get_u32_array("tokenizer.ggml.token_type")
            .unwrap()
            .unwrap(),
        vec![3, 3, 1, 1]
    );
    assert_eq!(
        md.get_bool("tokenizer.ggml.add_bos_token").unwrap(),
        Some(true)
    );

    let names: Vec<&str> = file.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "token_embd.weight",
            "output_norm.weight",
            "blk.0.ffn_down.weight"
        ]
    );

    let embd = file.tensor("token_embd.weight").unwrap();
    assert_eq!(embd.ggml_type, GgmlType::Q8_0);
    assert_eq!(embd.dims, [64, 4]);
    assert_eq!(embd.n_elements, 256);
    assert_eq!(embd.size_bytes, 8 * 34);
    assert_eq!(embd.row_bytes(), 2 * 34);
    assert_eq!(embd.n_rows(), 4);
    assert_eq!(embd.offset % 32, 0);

    let down = file.tensor("blk.0.ffn_down.weight").unwrap();
    assert_eq!(down.ggml_type, GgmlType::Q4K);
    assert_eq!(down.size_bytes, 2 * 144);
    // The last tensor ends exactly at the end of the file.
    assert_eq!(down.offset + down.size_bytes, bytes.len() as u64);

    for t in file.tensors() {
        let data = file.tensor_data(t);
        assert_eq!(data.len() as u64, t.size_bytes, "{}", t.name);
        assert_eq!(
            data,
            &bytes[t.offset as usize..(t.offset + t.size_bytes) as usize]
        );
        // from_bytes keeps the in-memory alignment of the data section.
        assert_eq!(data.as_ptr() as usize % 32, 0, "{}", t.name);
    }
    assert!(file.tensor("missing").is_none());
}

#[test]
fn version_2_and_custom_alignment_are_accepted() {
    let mut w = GgufWriter::new()
        .alignment(64)
        .tensor("a", &[3], 0)
        .tensor("b", &[5], 0);
    w.version = 2;
    let file = GgufFile::from_bytes(w.build()).unwrap();
    assert_eq!(file.version(), 2);
    assert_eq!(file.alignment(), 64);
    for t in file.tensors() {
        assert_eq!(t.offset % 64, 0);
    }
}

#[test]
fn empty_model_and_every_value_type_parse() {
    let nested = raw_array(T_ARRAY, 2, {
        let mut body = i32_array(&[1, 2]).bytes;
        body.extend_from_slice(&str_array(&["x"]).bytes);
        body
    });
    let w = GgufWriter::new()
        .kv("u8", u8v(200))
        .kv(
            "i8",
            Value {
                type_id: T_I8,
                bytes: vec![0xff],
            },
        )
        .kv(
            "u16",
            Value {
                type_id: T_U16,
                bytes: 513u16.to_le_bytes().to_vec(),
            },
        )
        .kv(
            "i16",
            Value {
                type_id: T_I16,
                bytes: (-2i16).to_le_bytes().to_vec(),
            },
        )
        .kv("i32", i32v(-5))
        .kv("u64", u64v(1 << 40))
        .kv(
            "i64",
            Value {
                type_id: T_I64,
                bytes: (-7i64).to_le_bytes().to_vec(),
            },
        )
        .kv(
            "f64",
            Value {
                type_id: T_F64,
                bytes: 0.5f64.to_le_bytes().to_vec(),
            },
        )
        .kv("bools", raw_array(T_BOOL, 3, vec![1, 0, 1]))
        .kv("u16s", raw_array(T_U16, 2, vec![1, 0, 2, 0]))
        .kv("nested", nested)
        .kv("empty", raw_array(T_STRING, 0, vec![]));
    let file = GgufFile::from_bytes(w.build()).unwrap();
    let md = file.metadata();
    assert!(file.tensors().is_empty());
    assert_eq!(md.get("u8"), Some(&MetadataValue::U8(200)));
    assert_eq!(md.get("i8"), Some(&MetadataValue::I8(-1)));
    assert_eq!(md.get("u16"), Some(&MetadataValue::U16(513)));
    assert_eq!(md.get("i16"), Some(&MetadataValue::I16(-2)));
    assert_eq!(md.get_i64("i32").unwrap(), Some(-5));
    assert_eq!(md.get_u64("u64").unwrap(), Some(1 << 40));
    assert!(md
        .get_u32("u64")
        .unwrap_err()
        .to_string()
        .contains("does not fit in u32"));
    assert_eq!(md.get_i64("i64").unwrap(), Some(-7));
    assert_eq!(md.get_f32("f64").unwrap(), Some(0.5));
    assert_eq!(
        md.get("bools"),
        Some(&MetadataValue::Array(MetadataArray::Bool(vec![
            true, false, true
        ])))
    );
    assert_eq!(md.get_u32_array("u16s").unwrap().unwrap(), vec![1, 2]);
    assert_eq!(
        md.get("nested"),
        Some(&MetadataValue::Array(MetadataArray::Array(vec![
            MetadataArray::I32(vec![1, 2]),
            MetadataArray::String(vec!["x".into()]),
        ])))
    );
    assert_eq!(md.get_str_array("empty").unwrap().unwrap().len(), 0);
}

#[test]
fn open_reports_missing_file_and_reads_real_files() {
    let missing = std::path::Path::new("/nonexistent/dir/model.gguf");
    assert!(matches!(
        GgufFile::open(missing),
        Err(crate::EngineError::FileNotFound { .. })
    ));

    let dir = std::env::temp_dir().join(format!("gguf-open-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("small.gguf");
    std::fs::write(&path, valid_small().build()).unwrap();
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.tensors().len(), 3);

    let empty = dir.join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    let err = GgufFile::open(&empty).unwrap_err().to_string();
    assert!(err.contains("magic"), "{err}");

    // A directory cannot be mapped: an I/O error naming the path, not a panic.
    assert!(GgufFile::open(&dir).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gguf_file_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<GgufFile>();
}
