//! Regression set: the committed files in tests/malformed (written by its
//! make_malformed.py) each fail with the kind and message listed in expected.tsv.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::gguf::GgufFile;
use crate::EngineError;

fn malformed_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("malformed")
}

#[test]
fn every_committed_malformed_file_fails_as_listed() {
    let dir = malformed_dir();
    let table = std::fs::read_to_string(dir.join("expected.tsv")).unwrap();
    let mut listed = BTreeSet::new();
    let mut failures = Vec::new();
    for line in table.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split('\t').collect();
        let [file, kind, needle] = fields[..] else {
            panic!("bad expected.tsv line {line:?}")
        };
        listed.insert(file.to_string());
        let err = match GgufFile::open(&dir.join(file)) {
            Ok(parsed) => {
                failures.push(format!("{file} opened: {parsed:?}"));
                continue;
            }
            Err(e) => e,
        };
        let found_kind = match err {
            EngineError::MalformedFile { .. } => "MalformedFile",
            EngineError::Unsupported { .. } => "Unsupported",
            _ => "other",
        };
        let text = err.to_string();
        eprintln!("{file}: {text}");
        if found_kind != kind || !text.contains(needle) {
            failures.push(format!(
                "{file}: expected {kind} mentioning {needle:?}, got {text:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".gguf"))
        .collect();
    assert_eq!(on_disk, listed, "expected.tsv and the .gguf files differ");
    assert!(listed.len() >= 40);
}

#[test]
fn the_unbroken_control_file_opens() {
    let file = GgufFile::open(&malformed_dir().join("control").join("valid_small.gguf")).unwrap();
    assert_eq!(file.tensors().len(), 3);
    assert_eq!(file.metadata().require_u32("llama.block_count").unwrap(), 1);
}
