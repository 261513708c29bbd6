//! With the `python` feature: compiles `python/sampler_sdk/protos/**/*.proto` into one
//! `FileDescriptorSet` (imports included, in dependency order) that the binding module
//! embeds as `PROTO_DESCRIPTOR_SET`. The protocol is compiled with the package, never
//! committed as generated code, and a `.proto` edit rebuilds it.

fn main() {
    #[cfg(feature = "python")]
    protos::compile();
}

#[cfg(feature = "python")]
mod protos {
    use std::path::{Path, PathBuf};

    const ROOT: &str = "python/sampler_sdk/protos";

    fn proto_files(dir: &Path, found: &mut Vec<PathBuf>) {
        let entries =
            std::fs::read_dir(dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        for entry in entries {
            let path = entry
                .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
                .path();
            if path.is_dir() {
                proto_files(&path, found);
            } else if path.extension().is_some_and(|ext| ext == "proto") {
                found.push(path);
            }
        }
    }

    pub fn compile() {
        println!("cargo:rerun-if-changed={ROOT}");
        let mut files = Vec::new();
        proto_files(Path::new(ROOT), &mut files);
        files.sort();
        assert!(!files.is_empty(), "no .proto files under {ROOT}");
        let mut compiler =
            protox::Compiler::new([ROOT]).unwrap_or_else(|e| panic!("cannot read {ROOT}: {e}"));
        compiler.include_imports(true);
        for file in &files {
            println!("cargo:rerun-if-changed={}", file.display());
            let name = file
                .strip_prefix(ROOT)
                .ok()
                .and_then(Path::to_str)
                .unwrap_or_else(|| panic!("{} is not a UTF-8 path under {ROOT}", file.display()));
            if let Err(e) = compiler.open_file(name) {
                panic!("{e:?}");
            }
        }
        let out_dir = std::env::var_os("OUT_DIR")
            .unwrap_or_else(|| panic!("OUT_DIR is unset: run through cargo"));
        let out = Path::new(&out_dir).join("protos.binpb");
        std::fs::write(&out, compiler.encode_file_descriptor_set())
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", out.display()));
    }
}
