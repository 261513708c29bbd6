//! Model weights copied into memory backed by transparent huge pages.
//!
//! Decoding one token streams every weight of the model through the CPU once; for a small
//! model that is a memory-bound scan of about 100 MB. Through the file mapping those bytes
//! sit in 4 KiB pages: the scan takes a TLB miss every 4 KiB, and the hardware prefetchers
//! stop at every page boundary. In 2 MiB pages both go away: on the development machine a
//! matrix-vector product over SmolLM2's 30 MB vocabulary matrix went from about 11 to
//! 14.5 GB/s. Page-cache pages of a file are rarely mapped huge, so the weights are read
//! (`pread`, which does not map the file's pages into this process) into an anonymous map
//! advised `MADV_HUGEPAGE`, at the same offsets as in the file.
//!
//! Measured on a whole decode step (SmolLM2 Q4_1, one thread) the gain is smaller, about
//! 7 % of CPU time per token, and the copy has costs: it is not shared between processes as
//! the page cache is, and the first huge-page faults can stall on memory compaction (load
//! went from 0.04 s to 0.3 s on a fragmented machine, against llama.cpp's 0.15 s). So it is
//! opt-in: `SAMPLER_SDK_RESIDENT_WEIGHTS=1`. Resident memory is the same either way (every
//! weight is touched every token).

use std::path::Path;

use crate::error::{EngineError, Result};

/// Set to `1` to copy weights into huge pages at load.
pub const RESIDENT_ENV: &str = "SAMPLER_SDK_RESIDENT_WEIGHTS";

const HUGE_PAGE: usize = 2 << 20;

/// Bytes `data_start..len` of a file at the same offsets as in the file; the bytes before
/// `data_start` (the header, which the forward pass never reads) are zero.
pub struct ResidentBytes {
    #[cfg(target_os = "linux")]
    map: memmap2::Mmap,
    shift: usize,
    len: usize,
}

impl std::fmt::Debug for ResidentBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResidentBytes")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// Whether the kernel hands out transparent huge pages to a region that asks for them.
fn huge_pages_available() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .is_ok_and(|mode| mode.contains("[always]") || mode.contains("[madvise]"))
}

impl ResidentBytes {
    /// Copies bytes `data_start..len` of the file at `path` (`len` its length) into huge
    /// pages. `None` unless `SAMPLER_SDK_RESIDENT_WEIGHTS=1` and the system has transparent
    /// huge pages (Linux): use the file mapping.
    pub fn load(path: &Path, data_start: usize, len: usize) -> Result<Option<Self>> {
        if data_start > len {
            return Err(EngineError::Internal(format!(
                "tensor data starts at {data_start}, past the end of a {len}-byte file"
            )));
        }
        if !std::env::var(RESIDENT_ENV).is_ok_and(|v| v.trim() == "1") || !huge_pages_available() {
            return Ok(None);
        }
        Self::load_linux(path, data_start, len)
    }

    #[cfg(target_os = "linux")]
    fn load_linux(path: &Path, data_start: usize, len: usize) -> Result<Option<Self>> {
        use std::os::unix::fs::FileExt;

        let io_error = |source: std::io::Error| EngineError::Io {
            path: path.to_path_buf(),
            source,
        };
        let Some(map_len) = len.checked_add(HUGE_PAGE) else {
            return Ok(None);
        };
        let mut map = memmap2::MmapMut::map_anon(map_len).map_err(io_error)?;
        if map.advise(memmap2::Advice::HugePage).is_err() {
            return Ok(None);
        }
        // File offset 0 at a 2 MiB boundary, so the file's 2 MiB-aligned spans are pages.
        let shift = (HUGE_PAGE - map.as_ptr() as usize % HUGE_PAGE) % HUGE_PAGE;
        let file = std::fs::File::open(path).map_err(io_error)?;
        file.read_exact_at(&mut map[shift + data_start..shift + len], data_start as u64)
            .map_err(io_error)?;
        let map = map.make_read_only().map_err(io_error)?;
        Ok(Some(Self { map, shift, len }))
    }

    #[cfg(not(target_os = "linux"))]
    fn load_linux(_path: &Path, _data_start: usize, _len: usize) -> Result<Option<Self>> {
        Ok(None)
    }

    /// The file's bytes at their file offsets (zero before `data_start`).
    pub fn bytes(&self) -> &[u8] {
        #[cfg(target_os = "linux")]
        {
            &self.map[self.shift..self.shift + self.len]
        }
        #[cfg(not(target_os = "linux"))]
        {
            &[]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_the_data_at_file_offsets() {
        let dir = std::env::temp_dir().join(format!("resident-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("weights.bin");
        let content: Vec<u8> = (0..3 * HUGE_PAGE + 123).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let data_start = 1000;
        let loaded = if huge_pages_available() {
            ResidentBytes::load_linux(&path, data_start, content.len()).unwrap()
        } else {
            None
        };
        match loaded {
            Some(resident) => {
                let bytes = resident.bytes();
                assert_eq!(bytes.len(), content.len());
                assert!(bytes[..data_start].iter().all(|&b| b == 0));
                assert_eq!(&bytes[data_start..], &content[data_start..]);
                assert_eq!(bytes.as_ptr() as usize % HUGE_PAGE, 0);
            }
            None => eprintln!("no transparent huge pages here: nothing to check"),
        }
        assert!(ResidentBytes::load(&path, content.len() + 1, content.len()).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
