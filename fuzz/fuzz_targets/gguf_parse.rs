//! Arbitrary bytes into the GGUF reader: it must return Ok or Err, never panic, hang or
//! read out of bounds, and whatever it accepts must be self-consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sampler_sdk::gguf::GgufFile;

fuzz_target!(|data: &[u8]| {
    let len = data.len() as u64;
    if let Ok(file) = GgufFile::from_bytes(data.to_vec()) {
        for tensor in file.tensors() {
            assert!(tensor.offset + tensor.size_bytes <= len);
            assert_eq!(file.tensor_data(tensor).len() as u64, tensor.size_bytes);
            assert_eq!(file.tensor(&tensor.name), Some(tensor));
        }
        for key in file.metadata().keys() {
            assert!(file.metadata().get(key).is_some());
        }
    }
});
