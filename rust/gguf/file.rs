//! `GgufFile`: owns the file bytes (a read-only mmap), parses the header, metadata and
//! tensor table, and validates every tensor's data region before anything is handed out.

use std::collections::HashMap;
use std::path::Path;

use memmap2::{Mmap, MmapMut};

use super::metadata::{read_metadata, Metadata, MetadataValue};
use super::reader::ByteReader;
use super::tensor_info::{read_tensor_info, TensorInfo};
use crate::error::{EngineError, Result};

/// "GGUF" as it appears in the file.
const MAGIC: [u8; 4] = *b"GGUF";
const OLDEST_VERSION: u32 = 2;
const NEWEST_VERSION: u32 = 3;
pub const DEFAULT_ALIGNMENT: u64 = 32;
const ALIGNMENT_KEY: &str = "general.alignment";

/// Smallest possible encodings, used to bound declared counts by the bytes that remain.
/// A KV pair: key length (8), a one-byte key, value type (4), a one-byte value.
const MIN_KV_BYTES: u64 = 8 + 1 + 4 + 1;
/// A tensor descriptor: name length (8), a one-byte name, n_dims (4), one dim (8),
/// type (4), offset (8).
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 1 + 4 + 8 + 4 + 8;

enum Storage {
    /// A map of the file.
    Mapped(Mmap),
    /// Bytes handed over in memory, copied into an anonymous map.
    Copied(Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Mapped(map) | Self::Copied(map) => map,
            Self::Owned(bytes) => bytes,
        }
    }
}

/// A validated GGUF file. Once `open` or `from_bytes` returns it, every tensor's byte range
/// lies inside the file, is aligned, and overlaps no other tensor, so `tensor_data` needs no
/// further checks. Tensor data normally sits at a memory address aligned to
/// `min(alignment(), page size)` (both constructors map the bytes); code that reinterprets
/// it as wider types should still go through `align_to` or unaligned reads.
pub struct GgufFile {
    storage: Storage,
    version: u32,
    alignment: u64,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("alignment", &self.alignment)
            .field("n_bytes", &self.data().len())
            .field("n_metadata", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

/// Everything parsed from the bytes; kept apart from the storage so parsing borrows it.
struct Parsed {
    version: u32,
    alignment: u64,
    metadata: Metadata,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl GgufFile {
    /// Maps the file read-only and validates it.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let io_error = |source: std::io::Error| {
            if source.kind() == std::io::ErrorKind::NotFound {
                EngineError::FileNotFound {
                    path: path.to_path_buf(),
                }
            } else {
                EngineError::Io {
                    path: path.to_path_buf(),
                    source,
                }
            }
        };
        let file = std::fs::File::open(path).map_err(io_error)?;
        let len = file.metadata().map_err(io_error)?.len();
        if len == 0 {
            // Mapping zero bytes fails on some platforms; an empty file is simply malformed.
            return Self::from_storage(Storage::Owned(Vec::new()));
        }
        // SAFETY: the map is read-only and private to this struct. Another process truncating
        // or rewriting the model file while it is open is outside what we can guard against
        // (every mmap-based loader shares this); we never write through the map.
        let map = unsafe { Mmap::map(&file) }.map_err(io_error)?;
        Self::from_storage(Storage::Mapped(map))
    }

    /// Validates bytes already in memory. They are copied into a page-aligned anonymous
    /// map when possible, so tensor data has the same memory alignment as with `open`.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile> {
        let storage = match copy_to_aligned_map(&bytes) {
            Some(map) => Storage::Copied(map),
            None => Storage::Owned(bytes),
        };
        Self::from_storage(storage)
    }

    fn from_storage(storage: Storage) -> Result<GgufFile> {
        let Parsed {
            version,
            alignment,
            metadata,
            tensors,
            tensor_index,
        } = parse(storage.bytes())?;
        Ok(GgufFile {
            storage,
            version,
            alignment,
            metadata,
            tensors,
            tensor_index,
        })
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of the data section and of every tensor offset within it.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Tensor descriptors in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index
            .get(name)
            .and_then(|&i| self.tensors.get(i))
    }

    /// The bytes of `info`'s data. Bounds were validated at open; a descriptor that did
    /// not come from this file and does not fit it yields an empty slice.
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        let range = usize::try_from(info.offset).ok().and_then(|start| {
            let len = usize::try_from(info.size_bytes).ok()?;
            Some(start..start.checked_add(len)?)
        });
        range.and_then(|r| self.data().get(r)).unwrap_or(&[])
    }

    /// The whole file.
    pub fn data(&self) -> &[u8] {
        self.storage.bytes()
    }

    /// The map of the file, when the bytes are read through one (`open`), not from memory.
    pub(crate) fn file_mapping(&self) -> Option<&Mmap> {
        match &self.storage {
            Storage::Mapped(map) => Some(map),
            Storage::Copied(_) | Storage::Owned(_) => None,
        }
    }
}

fn copy_to_aligned_map(bytes: &[u8]) -> Option<Mmap> {
    if bytes.is_empty() {
        return None;
    }
    let mut map = MmapMut::map_anon(bytes.len()).ok()?;
    map.copy_from_slice(bytes);
    map.make_read_only().ok()
}

fn parse(bytes: &[u8]) -> Result<Parsed> {
    let mut reader = ByteReader::new(bytes);

    let magic = reader.take(4, "header magic")?;
    if magic != MAGIC {
        return Err(EngineError::malformed(
            "header",
            format!(
                "bad magic {magic:02x?} ({:?}), expected \"GGUF\": not a GGUF file",
                String::from_utf8_lossy(magic)
            ),
        ));
    }

    let version = reader.u32("header version")?;
    check_version(version)?;

    let n_tensors = reader.u64("header tensor count")?;
    let n_kv = reader.u64("header metadata count")?;
    check_count("tensor count", n_tensors, MIN_TENSOR_INFO_BYTES, &reader)?;
    check_count("metadata count", n_kv, MIN_KV_BYTES, &reader)?;

    let metadata = read_metadata(&mut reader, n_kv)?;
    let alignment = read_alignment(&metadata)?;
    // Again, now that the metadata is consumed: bounds the table allocation below by what
    // the tensor descriptors can really occupy.
    check_count("tensor count", n_tensors, MIN_TENSOR_INFO_BYTES, &reader)?;

    // Both counts were bounded by the remaining bytes, so they fit in usize.
    let mut raw = Vec::with_capacity(usize::try_from(n_tensors).unwrap_or(0));
    let mut tensor_index = HashMap::with_capacity(raw.capacity());
    for i in 0..n_tensors {
        let tensor = read_tensor_info(&mut reader, i)?;
        let position = raw.len();
        if tensor_index
            .insert(tensor.info.name.clone(), position)
            .is_some()
        {
            return Err(EngineError::malformed(
                format!("tensor '{}'", tensor.info.name),
                format!("duplicate tensor name (tensor #{i})"),
            ));
        }
        raw.push(tensor);
    }

    let data_start = align_up(reader.position() as u64, alignment).ok_or_else(|| {
        EngineError::malformed("header", "data section offset overflows".to_string())
    })?;
    let file_len = bytes.len() as u64;
    let mut tensors = Vec::with_capacity(raw.len());
    for tensor in raw {
        let mut info = tensor.info;
        let context = format!("tensor '{}'", info.name);
        if tensor.relative_offset % alignment != 0 {
            return Err(EngineError::malformed(
                context,
                format!(
                    "data offset {} is not a multiple of the alignment {alignment}",
                    tensor.relative_offset
                ),
            ));
        }
        let start = data_start.checked_add(tensor.relative_offset);
        let end = start.and_then(|start| start.checked_add(info.size_bytes));
        match (start, end) {
            (Some(start), Some(end)) if end <= file_len => info.offset = start,
            _ => {
                let absolute = start.map_or("overflows u64".to_string(), |s| s.to_string());
                return Err(EngineError::malformed(
                    context,
                    format!(
                        "data at relative offset {} (absolute {absolute}) with {} bytes runs past the end of the {file_len}-byte file",
                        tensor.relative_offset, info.size_bytes
                    ),
                ));
            }
        }
        tensors.push(info);
    }
    check_no_overlap(&tensors)?;

    Ok(Parsed {
        version,
        alignment,
        metadata,
        tensors,
        tensor_index,
    })
}

fn check_version(version: u32) -> Result<()> {
    if (OLDEST_VERSION..=NEWEST_VERSION).contains(&version) {
        return Ok(());
    }
    let swapped = version.swap_bytes();
    if (1..=NEWEST_VERSION).contains(&swapped) {
        return Err(EngineError::unsupported(
            "byte order",
            format!(
                "version field reads {version:#010x}, i.e. version {swapped} stored big-endian; only little-endian GGUF files are supported"
            ),
        ));
    }
    match version {
        0 => Err(EngineError::malformed("header", "GGUF version 0 is invalid")),
        1 => Err(EngineError::unsupported(
            "GGUF version",
            "version 1 (pre-2023 format with 32-bit counts) is not supported; re-convert the model",
        )),
        _ => Err(EngineError::unsupported(
            "GGUF version",
            format!(
                "version {version} is newer than the supported versions {OLDEST_VERSION}..={NEWEST_VERSION}"
            ),
        )),
    }
}

fn check_count(what: &str, count: u64, min_bytes: u64, reader: &ByteReader<'_>) -> Result<()> {
    let remaining = reader.remaining() as u64;
    if count
        .checked_mul(min_bytes)
        .is_none_or(|needed| needed > remaining)
    {
        return Err(EngineError::malformed(
            "header",
            format!(
                "{what} {count} cannot fit in the {remaining} bytes that remain (each takes at least {min_bytes})"
            ),
        ));
    }
    Ok(())
}

fn read_alignment(metadata: &Metadata) -> Result<u64> {
    match metadata.get(ALIGNMENT_KEY) {
        None => Ok(DEFAULT_ALIGNMENT),
        Some(MetadataValue::U32(a)) if a.is_power_of_two() => Ok(u64::from(*a)),
        Some(MetadataValue::U32(a)) => Err(EngineError::malformed(
            format!("metadata key '{ALIGNMENT_KEY}'"),
            format!("alignment {a} is not a non-zero power of two"),
        )),
        Some(other) => Err(EngineError::malformed(
            format!("metadata key '{ALIGNMENT_KEY}'"),
            format!("expected u32, found {}", other.type_name()),
        )),
    }
}

fn align_up(offset: u64, alignment: u64) -> Option<u64> {
    let padded = offset.checked_add(alignment - 1)?;
    Some(padded / alignment * alignment)
}

fn check_no_overlap(tensors: &[TensorInfo]) -> Result<()> {
    let mut by_offset: Vec<&TensorInfo> = tensors.iter().collect();
    by_offset.sort_unstable_by_key(|t| t.offset);
    for pair in by_offset.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        // Offsets and sizes were bounded by the file length, so this cannot overflow.
        let a_end = a.offset + a.size_bytes;
        if a_end > b.offset {
            return Err(EngineError::malformed(
                format!("tensor '{}'", b.name),
                format!(
                    "data at absolute offset {} overlaps tensor '{}' (offset {}, {} bytes)",
                    b.offset, a.name, a.offset, a.size_bytes
                ),
            ));
        }
    }
    Ok(())
}
