//! Model weights in memory backed by transparent huge pages.
//!
//! Decoding one token streams every weight of the model through the CPU once; for a small
//! model that is a memory-bound scan of 100 to 350 MB. In 4 KiB pages the scan takes a TLB
//! miss every 4 KiB (in a virtual machine a two-level page walk), and the hardware
//! prefetchers stop at every page boundary. In 2 MiB pages both go away. On the development
//! machine (a 2-core VM) SmolLM2 Q8_0 decoded 62 tokens/s on one thread from 4 KiB pages and
//! 86-99 from huge pages, 111 and 134 on two threads; a bare scan in the four-row kernels'
//! access order went from 18 to 28 GB/s.
//!
//! Two ways there, tried in order:
//! 1. The file mapping itself. On kernels whose page cache holds large folios for the
//!    file system (ext4 from Linux 6.16, XFS, ...), a mapping advised `MADV_HUGEPAGE` at a
//!    2 MiB-aligned address reads the file in 2 MiB folios and maps them whole. Nothing is
//!    copied, the pages stay shared with other processes, and once the file is cached this
//!    way a load maps it in about a millisecond. A file already cached in small pages
//!    (written by a download, or read without the advice) is evicted from the page cache
//!    (`POSIX_FADV_DONTNEED`, which leaves pages other processes map alone) and read again,
//!    once; a 2 MiB probe first checks that the file system gives large folios at all.
//! 2. A copy: the weights are read (`pread`, which maps none of the file's pages into this
//!    process, so resident memory counts them once) into an anonymous map advised
//!    `MADV_HUGEPAGE`, at the same offsets as in the file. It costs load time (about 0.03 s
//!    for 150 MB read by two threads, up to 0.4 s when the kernel must first find free
//!    2 MiB pages) and is private to the process.
//!
//! `SAMPLER_SDK_RESIDENT_WEIGHTS=0` turns both off: the weights are read through the file
//! mapping as it comes.

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
    /// Puts bytes `data_start..len` of the file at `path` (`len` its length) in huge pages:
    /// `mapping` (the file's map, when the model reads one) if it can be mapped in them,
    /// and then `None` is returned; otherwise a copy. `None` too when
    /// `SAMPLER_SDK_RESIDENT_WEIGHTS=0` or the system has no transparent huge pages (or is
    /// not Linux): read the file mapping.
    pub fn load(
        path: &Path,
        mapping: Option<&memmap2::Mmap>,
        data_start: usize,
        len: usize,
    ) -> Result<Option<Self>> {
        if data_start > len {
            return Err(EngineError::Internal(format!(
                "tensor data starts at {data_start}, past the end of a {len}-byte file"
            )));
        }
        if std::env::var(RESIDENT_ENV).is_ok_and(|v| v.trim() == "0")
            || len - data_start < HUGE_PAGE
            || !huge_pages_available()
        {
            // (Less than one huge page of weights: nothing to gain.)
            return Ok(None);
        }
        #[cfg(target_os = "linux")]
        if let Some(map) = mapping {
            if huge_file_mapping::establish(path, map, data_start) {
                log::debug!(
                    "{}: weights read from the file mapping in 2 MiB pages",
                    path.display()
                );
                return Ok(None);
            }
            // The copy replaces the mapping's data: drop the pages the attempt mapped.
            huge_file_mapping::release(map, data_start);
        }
        #[cfg(not(target_os = "linux"))]
        let _ = mapping;
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

/// The file mapping in 2 MiB pages (way 1 of the module documentation).
#[cfg(target_os = "linux")]
mod huge_file_mapping {
    use std::os::unix::io::AsRawFd;
    use std::path::Path;

    use memmap2::{Advice, Mmap, UncheckedAdvice};

    use super::HUGE_PAGE;

    /// Whether the 2 MiB pages of `map` (the file at `path`) from `data_start` on are now
    /// mapped whole, reading or re-reading the file as needed.
    pub(super) fn establish(path: &Path, map: &Mmap, data_start: usize) -> bool {
        let Some(span) = huge_span(map, data_start) else {
            return false;
        };
        // File offsets sit at the same place in 2 MiB pages as the addresses they map to
        // only when the map starts on a 2 MiB boundary (Linux places large file maps so).
        if !(map.as_ptr() as usize).is_multiple_of(HUGE_PAGE)
            || map.advise(Advice::HugePage).is_err()
        {
            return false;
        }
        fault(map, span.clone());
        if mostly_huge(map, span.len()) {
            return true;
        }
        let Ok(file) = std::fs::File::open(path) else {
            return false;
        };
        // Small pages in the page cache: evict one 2 MiB page's worth and see whether it
        // comes back as one page before evicting the rest.
        let probe = span.start..span.start + HUGE_PAGE;
        if !(reread(map, &file, probe.clone()) && pmd_mapped_bytes(map).unwrap_or(0) >= HUGE_PAGE) {
            return false;
        }
        reread(map, &file, span.clone()) && mostly_huge(map, span.len())
    }

    /// Unmaps the pages of `map` from `data_start` on from this process (they stay in the
    /// page cache; touching them again maps them again).
    pub(super) fn release(map: &Mmap, data_start: usize) {
        if data_start < map.len() {
            // SAFETY: the map is read-only and file-backed, so dropping its pages loses
            // nothing: a later read faults the same bytes back in from the file.
            unsafe {
                let _ = map.unchecked_advise_range(
                    UncheckedAdvice::DontNeed,
                    data_start,
                    map.len() - data_start,
                );
            }
        }
    }

    /// The whole 2 MiB pages of the file from `data_start` on; `None` when there are none.
    fn huge_span(map: &Mmap, data_start: usize) -> Option<std::ops::Range<usize>> {
        let start = data_start.next_multiple_of(HUGE_PAGE);
        let end = map.len() / HUGE_PAGE * HUGE_PAGE;
        (start < end).then_some(start..end)
    }

    /// Reads one byte in each 2 MiB page of `span`: a fault maps a whole cached folio.
    fn fault(map: &Mmap, span: std::ops::Range<usize>) {
        for offset in span.step_by(HUGE_PAGE) {
            std::hint::black_box(map[offset]);
        }
    }

    /// Drops `span` of the file from this mapping and from the page cache, then faults it
    /// in again. False when the kernel refused either step.
    fn reread(map: &Mmap, file: &std::fs::File, span: std::ops::Range<usize>) -> bool {
        // SAFETY: as in `release`.
        let unmapped = unsafe {
            map.unchecked_advise_range(UncheckedAdvice::DontNeed, span.start, span.len())
        };
        let (Ok(offset), Ok(len)) = (i64::try_from(span.start), i64::try_from(span.len())) else {
            return false;
        };
        // SAFETY: a plain system call on an open descriptor; it reads no memory of ours.
        let evicted = unsafe {
            libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_DONTNEED)
        };
        if unmapped.is_err() || evicted != 0 {
            return false;
        }
        fault(map, span);
        true
    }

    /// At least 90% of `wanted` bytes of `map` mapped in 2 MiB pages. (A few pages may
    /// stay small, e.g. ones another process maps, which eviction leaves alone.)
    fn mostly_huge(map: &Mmap, wanted: usize) -> bool {
        pmd_mapped_bytes(map).is_some_and(|bytes| bytes >= wanted / 10 * 9)
    }

    /// `FilePmdMapped` of the memory area holding `map`, from /proc/self/smaps.
    fn pmd_mapped_bytes(map: &Mmap) -> Option<usize> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        pmd_mapped_in_smaps(&smaps, map.as_ptr() as usize)
    }

    /// `FilePmdMapped` in bytes of the area of `smaps` (the text of /proc/PID/smaps) that
    /// contains `address`.
    pub(super) fn pmd_mapped_in_smaps(smaps: &str, address: usize) -> Option<usize> {
        let mut inside = false;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((start, end)) = first.split_once('-') {
                if let (Ok(start), Ok(end)) = (
                    usize::from_str_radix(start, 16),
                    usize::from_str_radix(end, 16),
                ) {
                    inside = (start..end).contains(&address);
                    continue;
                }
            }
            if inside {
                if let Some(value) = line.strip_prefix("FilePmdMapped:") {
                    let kib: usize = value.trim().trim_end_matches("kB").trim().parse().ok()?;
                    return kib.checked_mul(1024);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn smaps_areas_are_told_apart_by_address() {
        let smaps = "\
7f0000000000-7f0000400000 r--s 00000000 fe:00 12 /models/a.gguf
Size:               4096 kB
FilePmdMapped:      2048 kB
Locked:                0 kB
7f0000400000-7f0000600000 rw-p 00000000 00:00 0
Size:               2048 kB
FilePmdMapped:         0 kB
";
        let in_area = |address| huge_file_mapping::pmd_mapped_in_smaps(smaps, address);
        assert_eq!(in_area(0x7f00_0000_0000), Some(2 << 20));
        assert_eq!(in_area(0x7f00_003f_ffff), Some(2 << 20));
        assert_eq!(in_area(0x7f00_0040_0000), Some(0));
        assert_eq!(in_area(0x7f00_0060_0000), None);
    }

    /// Whatever way the file's pages end up (huge file pages, a copy, or neither where the
    /// system has no huge pages), the bytes the forward pass reads are the file's.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_weights_read_are_the_files_bytes_whichever_way_they_are_paged() {
        let dir = std::env::temp_dir().join(format!("resident-map-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("weights.bin");
        let content: Vec<u8> = (0..5 * HUGE_PAGE + 77).map(|i| (i % 241) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: the test's own file, not modified while mapped.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        let data_start = 4096;
        let copy = ResidentBytes::load(&path, Some(&map), data_start, content.len()).unwrap();
        let bytes = copy.as_ref().map_or(&map[..], ResidentBytes::bytes);
        assert_eq!(&bytes[data_start..], &content[data_start..]);
        assert_eq!(&map[..], &content[..]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

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
        assert!(ResidentBytes::load(&path, None, content.len() + 1, content.len()).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
