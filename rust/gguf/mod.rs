//! GGUF files: see reader, metadata, tensor_info, file.
