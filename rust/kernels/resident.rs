//! Model weights copied into memory backed by transparent huge pages.
//!
//! Decoding one token streams every weight of the model through the CPU once; for a small
//! model that is a memory-bound scan of 100 to 350 MB. Through the file mapping those bytes
//! sit in 4 KiB pages: the scan takes a TLB miss every 4 KiB (in a virtual machine a
//! two-level page walk), and the hardware prefetchers stop at every page boundary. In 2 MiB
//! pages both go away. On the development machine (a 2-core VM) SmolLM2 Q8_0 decoded 62
//! tokens/s on one thread from the mapping and 86 from huge pages, 111 and 134 on two
//! threads; a bare scan in the four-row kernels' access order went from 18 to 28 GB/s.
//! Page-cache pages of a file are rarely mapped huge, so the weights are read (`pread`,
//! which does not map the file's pages into this process, so resident memory counts them
//! once) into an anonymous map advised `MADV_HUGEPAGE`, at the same offsets as in the file.
//!
//! The copy costs load time: about 0.03 s for 150 MB read by two threads, more when the
//! kernel must first compact memory into free 2 MiB pages (0.4 s seen once on a fragmented
//! machine). And unlike the page cache, it is not shared between processes that load the
//! same file. So it can be turned off: `SAMPLER_SDK_RESIDENT_WEIGHTS=0` reads the weights
//! through the file mapping. Resident memory is otherwise the same either way (every weight
//! is touched every token).

use std::path::Path;

use crate::error::{EngineError, Result};

/// Set to `0` to read weights through the file mapping instead of copying them into huge
/// pages at load.
pub const RESIDENT_ENV: &str = "SAMPLER_SDK_RESIDENT_WEIGHTS";

/// Threads that read the file into the huge pages: page faults and copies of separate
/// 2 MiB spans proceed in parallel (two threads took 0.027 s where one took 0.045 s).
const COPY_THREADS: usize = 2;

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
    /// pages. `None` when `SAMPLER_SDK_RESIDENT_WEIGHTS=0` or the system has no transparent
    /// huge pages (or is not Linux): use the file mapping.
    pub fn load(path: &Path, data_start: usize, len: usize) -> Result<Option<Self>> {
        if data_start > len {
            return Err(EngineError::Internal(format!(
                "tensor data starts at {data_start}, past the end of a {len}-byte file"
            )));
        }
        if std::env::var(RESIDENT_ENV).is_ok_and(|v| v.trim() == "0") || !huge_pages_available() {
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
        // Spans that start on 2 MiB boundaries, so no huge page is faulted by two threads.
        let span = len.div_ceil(COPY_THREADS).next_multiple_of(HUGE_PAGE);
        let destination = &mut map[shift..shift + len];
        std::thread::scope(|scope| {
            let copies: Vec<_> = destination
                .chunks_mut(span)
                .enumerate()
                .map(|(i, chunk)| {
                    let file = &file;
                    scope.spawn(move || {
                        let start = (i * span).max(data_start);
                        let end = i * span + chunk.len();
                        if start >= end {
                            return Ok(());
                        }
                        let bytes = &mut chunk[start - i * span..];
                        file.read_exact_at(bytes, start as u64)
                    })
                })
                .collect();
            copies.into_iter().try_for_each(|copy| {
                copy.join()
                    .map_err(|_| std::io::Error::other("a weight-copying thread panicked"))?
            })
        })
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
        // Data in both copying threads' spans, and data in the second span only.
        for data_start in [1000, 5 * HUGE_PAGE / 2] {
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
        }
        assert!(ResidentBytes::load(&path, content.len() + 1, content.len()).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
