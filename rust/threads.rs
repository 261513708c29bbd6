//! A persistent pool of worker threads for the forward pass.
//!
//! A decode step of a small model runs about 150 parallel regions (matrix products and
//! attention of every layer), each lasting tens of microseconds, so starting threads per
//! region or queueing boxed tasks would cost as much as the work. The pool instead keeps
//! `n - 1` threads waiting for a new *region*: the calling thread publishes one borrowed
//! closure and starts on it at once; workers join as they notice it. Waiting threads spin
//! briefly, then yield, then sleep on a condition variable, so back-to-back regions cost
//! well under a microsecond while an idle pool costs no CPU.
//!
//! **Work sharing.** [`ThreadPool::parallel_for`] cuts the items into chunks (multiples of
//! a grain) that threads claim from a shared counter. When the machine is busy and a worker
//! is not running, the caller simply takes its chunks: a region never waits for a thread
//! that has not started (the region is *closed* once every chunk is claimed, and a worker
//! arriving later leaves without touching it). A fixed split would instead stall every
//! region until the descheduled thread got a time slice.
//!
//! **Determinism.** Kernels built on the pool compute every output (a row of a matrix
//! product, an attention head of one token) entirely within one chunk, the same way
//! whichever thread claims it, so results are bit-identical for any thread count.
//!
//! **Concurrency policy.** One region runs at a time per pool: regions take a lock, so
//! several sequences generating on their own threads share the pool region by region, and
//! at most `n_threads` threads compute at any moment (no oversubscription). Pools are
//! shared process-wide by thread count ([`ThreadPool::shared`]), so two models loaded with
//! the same thread count do not double the number of busy threads either. A region started
//! from inside a region runs serially on the calling thread instead of deadlocking.

use std::cell::{Cell, UnsafeCell};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::ops::Range;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{EngineError, Result};

/// Overrides the default thread count (physical cores) for every pool created without an
/// explicit count, e.g. by benchmarks that cannot pass one through an API.
pub const THREADS_ENV: &str = "SAMPLER_SDK_THREADS";

/// Upper bound on the thread count, so a typo cannot spawn thousands of threads.
pub const MAX_THREADS: usize = 256;

/// How long a waiting thread spins (checking about every 100 ns) before it starts yielding:
/// longer than the serial work between two regions of one decode step (norms, RoPE,
/// activation quantisation: a few microseconds), so a busy pool never sleeps.
const SPIN_FOR: Duration = Duration::from_micros(50);
/// How long it then yields the CPU before sleeping: covers the gap between two tokens
/// (sampling, a Python callback) without a futex round trip, while letting other processes
/// on a loaded machine run.
const YIELD_FOR: Duration = Duration::from_millis(2);

/// Logical CPUs sharing a physical core count once: the number of distinct
/// ("physical id", "core id") pairs in /proc/cpuinfo on Linux, falling back to
/// `available_parallelism` (logical CPUs) elsewhere or when the file says nothing.
pub fn physical_cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| {
        let logical = std::thread::available_parallelism().map_or(1, usize::from);
        let from_cpuinfo = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| count_physical_cores(&text));
        // A process restricted to fewer CPUs (taskset, cgroups) should not use more threads.
        from_cpuinfo
            .map_or(logical, |cores| cores.min(logical))
            .max(1)
    })
}

/// Distinct (physical id, core id) pairs in the text of /proc/cpuinfo; `None` when the
/// file does not list them (some ARM kernels, containers that hide topology).
fn count_physical_cores(cpuinfo: &str) -> Option<usize> {
    let mut cores = std::collections::HashSet::new();
    let mut package = None;
    for line in cpuinfo.lines() {
        let Some((key, value)) = line.split_once(':') else {
            // A blank line ends one processor's stanza.
            package = None;
            continue;
        };
        match key.trim() {
            "physical id" => package = value.trim().parse::<u64>().ok(),
            "core id" => {
                let core = value.trim().parse::<u64>().ok()?;
                cores.insert((package.unwrap_or(0), core));
            }
            _ => {}
        }
    }
    (!cores.is_empty()).then_some(cores.len())
}

/// The thread count used when none is given: `SAMPLER_SDK_THREADS` if set to a positive
/// integer, else the number of physical cores.
pub fn default_thread_count() -> Result<usize> {
    match std::env::var(THREADS_ENV) {
        Ok(text) => parse_thread_count(THREADS_ENV, &text),
        Err(_) => Ok(physical_cores()),
    }
}

fn parse_thread_count(what: &str, text: &str) -> Result<usize> {
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_THREADS).contains(&n) => Ok(n),
        _ => Err(EngineError::invalid(
            what,
            format!("expected a thread count from 1 to {MAX_THREADS}, got {text:?}"),
        )),
    }
}

/// A borrowed closure with its lifetime erased, as the workers see it.
#[derive(Clone, Copy)]
struct Job {
    data: *const (),
    call: unsafe fn(*const (), usize),
}

/// Calls the closure behind `data`, which `ThreadPool::region` created from a `&F`.
unsafe fn call_job<F: Fn(usize) + Sync>(data: *const (), slot: usize) {
    // SAFETY: `data` came from `&F` in `ThreadPool::region`, which does not return (nor
    // unwind) while a worker that joined the region is still inside it.
    let work = unsafe { &*data.cast::<F>() };
    work(slot);
}

/// `Shared::state` packs the region's tag (low 32 bits of its epoch), a closed flag and the
/// number of workers inside it, so joining is one compare-and-swap that fails for a closed
/// or already-replaced region.
const TAG_SHIFT: u32 = 32;
const CLOSED: u64 = 1 << 31;
const ACTIVE_MASK: u64 = CLOSED - 1;

fn tag_of(epoch: u64) -> u64 {
    (epoch & 0xFFFF_FFFF) << TAG_SHIFT
}

/// State shared between the caller of a region and the workers.
struct Shared {
    /// Bumped once per region (and once at shutdown); workers wait for it to change.
    epoch: CachePadded<AtomicU64>,
    /// Tag | CLOSED | workers inside the current region (see `TAG_SHIFT`).
    state: CachePadded<AtomicU64>,
    /// Written only by the thread holding `ThreadPool::region`, while no worker is inside.
    job: UnsafeCell<Job>,
    shutdown: AtomicBool,
    worker_panicked: AtomicBool,
    /// Sleeping is the slow path: workers waiting for a region, or the caller waiting for
    /// workers to leave one, announce themselves here before blocking on `sleep`.
    sleep: Mutex<()>,
    workers_sleeping: AtomicUsize,
    wake_workers: Condvar,
    caller_sleeping: AtomicBool,
    wake_caller: Condvar,
}

// SAFETY: `job` is the only non-Sync field. The caller writes it before publishing the
// region's state and epoch (SeqCst); a worker reads it only after joining that region
// (a successful compare-and-swap on `state` with the region's tag, not closed), and the
// caller writes it again only after closing the region and seeing no worker inside.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

#[repr(align(128))]
struct CachePadded<T>(T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

fn lock(mutex: &Mutex<()>) -> MutexGuard<'_, ()> {
    // Nothing can panic while the lock is held, but a poisoned lock still guards nothing.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Spins, then yields, until `ready()` holds or the spin and yield budgets are spent;
/// returns whether it holds.
fn wait_briefly(ready: impl Fn() -> bool) -> bool {
    let start = Instant::now();
    loop {
        for _ in 0..64 {
            if ready() {
                return true;
            }
            std::hint::spin_loop();
        }
        if start.elapsed() > SPIN_FOR {
            break;
        }
    }
    while start.elapsed() < SPIN_FOR + YIELD_FOR {
        if ready() {
            return true;
        }
        std::thread::yield_now();
    }
    ready()
}

impl Shared {
    /// Blocks until the epoch differs from `seen`; returns the new epoch.
    fn wait_for_region(&self, seen: u64) -> u64 {
        let fresh = || self.epoch.load(Ordering::Acquire) != seen;
        if !wait_briefly(fresh) {
            let mut guard = lock(&self.sleep);
            // SeqCst pairs with `publish`: either it sees this sleeper and notifies under the
            // lock, or this load sees its new epoch.
            self.workers_sleeping.fetch_add(1, Ordering::SeqCst);
            while self.epoch.load(Ordering::SeqCst) == seen {
                guard = self
                    .wake_workers
                    .wait(guard)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            self.workers_sleeping.fetch_sub(1, Ordering::SeqCst);
        }
        self.epoch.load(Ordering::Acquire)
    }

    /// Opens a new region running `job`; the caller holds the region lock and the previous
    /// region is closed with no worker inside.
    fn publish(&self, job: Job) {
        // SAFETY: see `Shared`: no worker is inside a region, so nobody reads `job` now.
        unsafe { *self.job.get() = job };
        let epoch = self.epoch.load(Ordering::Relaxed) + 1;
        self.state.store(tag_of(epoch), Ordering::SeqCst);
        self.epoch.store(epoch, Ordering::SeqCst);
        if self.workers_sleeping.load(Ordering::SeqCst) > 0 {
            let _guard = lock(&self.sleep);
            self.wake_workers.notify_all();
        }
    }

    /// Enters the region of `epoch` if it is still open; false if it closed or moved on.
    fn try_join(&self, epoch: u64) -> bool {
        let mut state = self.state.load(Ordering::Acquire);
        loop {
            if state & !(CLOSED | ACTIVE_MASK) != tag_of(epoch) || state & CLOSED != 0 {
                return false;
            }
            match self.state.compare_exchange_weak(
                state,
                state + 1,
                Ordering::SeqCst,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => state = now,
            }
        }
    }

    fn leave(&self) {
        let before = self.state.fetch_sub(1, Ordering::SeqCst);
        if before & ACTIVE_MASK == 1
            && before & CLOSED != 0
            && self.caller_sleeping.load(Ordering::SeqCst)
        {
            let _guard = lock(&self.sleep);
            self.wake_caller.notify_one();
        }
    }

    /// Closes the current region to late workers and waits for those inside to leave.
    fn close_and_wait(&self) {
        let before = self.state.fetch_or(CLOSED, Ordering::SeqCst);
        if before & ACTIVE_MASK == 0 {
            return;
        }
        let empty = || self.state.load(Ordering::Acquire) & ACTIVE_MASK == 0;
        if wait_briefly(empty) {
            return;
        }
        let mut guard = lock(&self.sleep);
        self.caller_sleeping.store(true, Ordering::SeqCst);
        while self.state.load(Ordering::SeqCst) & ACTIVE_MASK != 0 {
            guard = self
                .wake_caller
                .wait(guard)
                .unwrap_or_else(PoisonError::into_inner);
        }
        self.caller_sleeping.store(false, Ordering::SeqCst);
    }
}

fn worker_loop(shared: &Shared, slot: usize) {
    // A worker only ever runs parts of regions: a region it starts must run inline.
    IN_REGION.with(|flag| flag.set(true));
    let mut seen = 0;
    loop {
        seen = shared.wait_for_region(seen);
        if shared.shutdown.load(Ordering::Acquire) {
            return;
        }
        if !shared.try_join(seen) {
            continue;
        }
        // SAFETY: see `Shared`: this worker joined the region whose job this is.
        let job = unsafe { *shared.job.get() };
        // SAFETY: `job` was built by `ThreadPool::region` for a closure that outlives it.
        let outcome = catch_unwind(|| unsafe { (job.call)(job.data, slot) });
        if outcome.is_err() {
            shared.worker_panicked.store(true, Ordering::Relaxed);
        }
        shared.leave();
    }
}

thread_local! {
    /// Set while this thread is running part of a region, so a nested region runs inline.
    static IN_REGION: Cell<bool> = const { Cell::new(false) };
}

struct InRegion;

impl InRegion {
    fn enter() -> Option<Self> {
        // Lazily: an eagerly built guard would be dropped on the nested path and clear the
        // flag of the region this thread is in.
        IN_REGION.with(|flag| (!flag.replace(true)).then(|| Self))
    }
}

impl Drop for InRegion {
    fn drop(&mut self) {
        IN_REGION.with(|flag| flag.set(false));
    }
}

/// Chunks per thread a region is cut into: enough that a thread finishing early (or
/// joining late) finds work left, few enough that claiming them costs nothing.
const CHUNKS_PER_THREAD: usize = 4;

/// A fixed set of threads that run parallel regions; see the module documentation.
pub struct ThreadPool {
    n_threads: usize,
    shared: Arc<Shared>,
    /// Serialises regions (the concurrency policy) and guards `job`.
    region: Mutex<()>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("n_threads", &self.n_threads)
            .finish_non_exhaustive()
    }
}

impl ThreadPool {
    /// A pool of `n_threads` threads in all: the caller of each region plus `n_threads - 1`
    /// workers started now.
    pub fn new(n_threads: usize) -> Result<Self> {
        if !(1..=MAX_THREADS).contains(&n_threads) {
            return Err(EngineError::invalid(
                "threads",
                format!("expected a thread count from 1 to {MAX_THREADS}, got {n_threads}"),
            ));
        }
        let shared = Arc::new(Shared {
            epoch: CachePadded(AtomicU64::new(0)),
            state: CachePadded(AtomicU64::new(CLOSED)),
            job: UnsafeCell::new(Job {
                data: std::ptr::null(),
                call: call_job::<fn(usize)>,
            }),
            shutdown: AtomicBool::new(false),
            worker_panicked: AtomicBool::new(false),
            sleep: Mutex::new(()),
            workers_sleeping: AtomicUsize::new(0),
            wake_workers: Condvar::new(),
            caller_sleeping: AtomicBool::new(false),
            wake_caller: Condvar::new(),
        });
        let mut pool = Self {
            n_threads,
            shared,
            region: Mutex::new(()),
            workers: Vec::with_capacity(n_threads - 1),
        };
        for slot in 1..n_threads {
            let shared = Arc::clone(&pool.shared);
            let handle = std::thread::Builder::new()
                .name(format!("sampler-sdk-worker-{slot}"))
                .spawn(move || worker_loop(&shared, slot))
                .map_err(|e| {
                    EngineError::Internal(format!("cannot start worker thread {slot}: {e}"))
                })?;
            // On an error above, dropping `pool` stops the workers started so far.
            pool.workers.push(handle);
        }
        Ok(pool)
    }

    /// The process-wide pool of `n_threads` threads, created on first use and kept while
    /// anything holds it.
    pub fn shared(n_threads: usize) -> Result<Arc<Self>> {
        static POOLS: OnceLock<Mutex<HashMap<usize, Weak<ThreadPool>>>> = OnceLock::new();
        let pools = POOLS.get_or_init(|| Mutex::new(HashMap::new()));
        let mut pools = pools.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(pool) = pools.get(&n_threads).and_then(Weak::upgrade) {
            return Ok(pool);
        }
        let pool = Arc::new(Self::new(n_threads)?);
        pools.insert(n_threads, Arc::downgrade(&pool));
        Ok(pool)
    }

    /// The shared pool with the default thread count ([`default_thread_count`]).
    pub fn shared_default() -> Result<Arc<Self>> {
        Self::shared(default_thread_count()?)
    }

    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Runs `work(slot)` on the calling thread (slot 0) and on every worker that joins
    /// before the caller's own call returns; returns once all of them have finished.
    /// `work` must itself share out the region's items (see `parallel_for_slots`).
    fn region<F: Fn(usize) + Sync>(&self, work: F) {
        let _region = lock(&self.region);
        self.shared.publish(Job {
            data: std::ptr::from_ref(&work).cast(),
            call: call_job::<F>,
        });
        // Workers that joined borrow `work` until they leave: close and wait even if the
        // caller's part panics.
        let own = catch_unwind(AssertUnwindSafe(|| work(0)));
        self.shared.close_and_wait();
        if let Err(panic) = own {
            resume_unwind(panic);
        }
        if self.shared.worker_panicked.swap(false, Ordering::Relaxed) {
            // Reaching this is a bug in a kernel; the binding turns it into an error.
            panic!("a worker thread panicked during a parallel region");
        }
    }

    /// Runs `work(slot, range)` over chunks of `0..n_items` (multiples of `grain`, except
    /// the last) in parallel, each chunk exactly once. `slot` identifies the thread
    /// (`0..n_threads()`): no two threads run with the same slot at the same time, so it
    /// can index per-thread scratch buffers. Work too small to fill two grains runs on the
    /// calling thread alone.
    ///
    /// A panic in `work` is re-raised here once no thread is running `work` any more.
    pub fn parallel_for_slots<F: Fn(usize, Range<usize>) + Sync>(
        &self,
        n_items: usize,
        grain: usize,
        work: F,
    ) {
        let grain = grain.max(1);
        if n_items == 0 {
            return;
        }
        let guard = (self.n_threads > 1 && n_items > grain)
            .then(InRegion::enter)
            .flatten();
        if guard.is_none() {
            // One thread, little work, or a region nested in a region: all here, in order.
            work(0, 0..n_items);
            return;
        }
        let target = n_items.div_ceil(self.n_threads * CHUNKS_PER_THREAD);
        let chunk = target.div_ceil(grain).max(1) * grain;
        let n_chunks = n_items.div_ceil(chunk);
        let next = AtomicUsize::new(0);
        self.region(|slot| loop {
            let c = next.fetch_add(1, Ordering::Relaxed);
            if c >= n_chunks {
                break;
            }
            work(slot, c * chunk..((c + 1) * chunk).min(n_items));
        });
        drop(guard);
    }

    /// [`Self::parallel_for_slots`] for work that needs no per-thread state.
    pub fn parallel_for<F: Fn(Range<usize>) + Sync>(&self, n_items: usize, grain: usize, work: F) {
        self.parallel_for_slots(n_items, grain, |_, range| work(range));
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        {
            let _guard = lock(&self.shared.sleep);
            self.shared.epoch.fetch_add(1, Ordering::SeqCst);
            self.shared.wake_workers.notify_all();
        }
        for handle in self.workers.drain(..) {
            let _ = handle.join();
        }
    }
}

/// A mutable slice that the threads of a region write in disjoint parts.
///
/// Matrix products write, for every token, the output rows of their own row range; those
/// parts interleave in memory (token-major output), so they cannot be handed out with
/// `split_at_mut`. Each thread instead asks for its own sub-slices here.
pub struct DisjointSlice<'a, T> {
    ptr: *mut T,
    len: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

// SAFETY: it only hands out `&mut [T]` under the disjointness contract of `part`, which
// makes concurrent use from several threads equivalent to owning separate slices.
unsafe impl<T: Send> Sync for DisjointSlice<'_, T> {}
unsafe impl<T: Send> Send for DisjointSlice<'_, T> {}

impl<'a, T> DisjointSlice<'a, T> {
    pub fn new(slice: &'a mut [T]) -> Self {
        Self {
            ptr: slice.as_mut_ptr(),
            len: slice.len(),
            _borrow: PhantomData,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The elements in `range`.
    ///
    /// # Safety
    /// No two parts that are alive at the same time may overlap: the caller guarantees that
    /// ranges requested by different threads (and by one thread while it still uses an
    /// earlier part) are disjoint.
    ///
    /// # Panics
    /// If `range` is not within the slice (a bug in the caller's split).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn part(&self, range: Range<usize>) -> &mut [T] {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "part {range:?} of a slice of {}",
            self.len
        );
        // SAFETY: in bounds (checked above) and, by the caller's contract, not aliased.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    /// Runs `parallel_for_slots` and checks every item is handled exactly once, in chunks
    /// on grain boundaries, with no slot used by two threads at once.
    fn check_cover(pool: &ThreadPool, n_items: usize, grain: usize) {
        let hits: Vec<AtomicU32> = (0..n_items).map(|_| AtomicU32::new(0)).collect();
        let busy: Vec<AtomicBool> = (0..pool.n_threads())
            .map(|_| AtomicBool::new(false))
            .collect();
        pool.parallel_for_slots(n_items, grain, |slot, range| {
            assert!(
                !busy[slot].swap(true, Ordering::SeqCst),
                "slot {slot} shared"
            );
            assert!(range.start % grain.max(1) == 0 && !range.is_empty());
            for i in range {
                hits[i].fetch_add(1, Ordering::Relaxed);
            }
            busy[slot].store(false, Ordering::SeqCst);
        });
        assert!(
            hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
            "{n_items} / {grain}"
        );
    }

    #[test]
    fn every_item_is_handled_once_for_any_thread_count() {
        for n in [1, 2, 3, 4] {
            let pool = ThreadPool::new(n).unwrap();
            for n_items in [0, 1, 5, 16, 17, 100, 961, 49152] {
                for grain in [1, 4, 16] {
                    check_cover(&pool, n_items, grain);
                }
            }
            for _ in 0..2000 {
                check_cover(&pool, 37, 1);
            }
        }
    }

    #[test]
    fn counts_physical_cores_from_cpuinfo() {
        let two_cores_four_threads = "processor\t: 0\nphysical id\t: 0\ncore id\t\t: 0\n\n\
            processor\t: 1\nphysical id\t: 0\ncore id\t\t: 1\n\n\
            processor\t: 2\nphysical id\t: 0\ncore id\t\t: 0\n\n\
            processor\t: 3\nphysical id\t: 0\ncore id\t\t: 1\n";
        assert_eq!(count_physical_cores(two_cores_four_threads), Some(2));
        let two_sockets = "physical id : 0\ncore id : 0\n\nphysical id : 1\ncore id : 0\n";
        assert_eq!(count_physical_cores(two_sockets), Some(2));
        assert_eq!(count_physical_cores("processor : 0\nBogoMIPS : 50\n"), None);
        assert!(physical_cores() >= 1);
    }

    #[test]
    fn thread_counts_are_validated() {
        assert_eq!(parse_thread_count("t", " 3 ").ok(), Some(3));
        let err = parse_thread_count("SAMPLER_SDK_THREADS", "0").err();
        assert_eq!(
            err.map(|e| e.to_string()).as_deref(),
            Some("SAMPLER_SDK_THREADS: expected a thread count from 1 to 256, got \"0\"")
        );
        assert!(parse_thread_count("t", "lots").is_err());
        assert!(ThreadPool::new(0).is_err());
        assert!(ThreadPool::new(MAX_THREADS + 1).is_err());
    }

    #[test]
    fn parallel_for_writes_disjoint_parts() {
        let pool = ThreadPool::new(3).unwrap();
        let mut out = vec![0usize; 1000];
        let shared = DisjointSlice::new(&mut out);
        pool.parallel_for(1000, 16, |range| {
            // SAFETY: parallel_for hands out disjoint ranges.
            let part = unsafe { shared.part(range.clone()) };
            for (o, i) in part.iter_mut().zip(range) {
                *o = i * 2;
            }
        });
        assert!(out.iter().enumerate().all(|(i, &v)| v == 2 * i));
    }

    #[test]
    fn workers_join_and_sleeping_workers_wake_up() {
        let pool = ThreadPool::new(2).unwrap();
        // Chunks slow enough that the worker joins before the caller has taken them all.
        let slots_seen: Vec<AtomicU32> = (0..2).map(|_| AtomicU32::new(0)).collect();
        for round in 0..3 {
            if round > 0 {
                std::thread::sleep(SPIN_FOR + YIELD_FOR + Duration::from_millis(20));
            }
            pool.parallel_for_slots(64, 1, |slot, _| {
                slots_seen[slot].fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            });
        }
        assert!(
            slots_seen[1].load(Ordering::Relaxed) > 0,
            "the worker never joined"
        );
        let total: u32 = slots_seen.iter().map(|s| s.load(Ordering::Relaxed)).sum();
        assert_eq!(
            total as usize,
            3 * 64usize.div_ceil(64usize.div_ceil(2 * CHUNKS_PER_THREAD))
        );
    }

    #[test]
    fn concurrent_callers_share_one_pool() {
        let pool = Arc::new(ThreadPool::new(2).unwrap());
        let total = Arc::new(AtomicU32::new(0));
        let callers: Vec<_> = (0..4)
            .map(|_| {
                let (pool, total) = (Arc::clone(&pool), Arc::clone(&total));
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        pool.parallel_for(64, 1, |range| {
                            total.fetch_add(range.len() as u32, Ordering::Relaxed);
                        });
                    }
                })
            })
            .collect();
        for caller in callers {
            caller.join().unwrap();
        }
        assert_eq!(total.load(Ordering::Relaxed), 4 * 500 * 64);
    }

    #[test]
    fn nested_regions_run_inline() {
        let pool = ThreadPool::new(2).unwrap();
        let hits = AtomicU32::new(0);
        pool.parallel_for(8, 1, |outer| {
            for _ in outer {
                pool.parallel_for(10, 1, |inner| {
                    hits.fetch_add(inner.len() as u32, Ordering::Relaxed);
                });
            }
        });
        assert_eq!(hits.load(Ordering::Relaxed), 80);
    }

    #[test]
    fn a_panicking_chunk_is_reported_and_the_pool_survives() {
        let pool = ThreadPool::new(2).unwrap();
        for bad in [0, 63] {
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                pool.parallel_for(64, 1, |range| assert!(!range.contains(&bad), "item {bad}"));
            }));
            assert!(outcome.is_err(), "item {bad}");
        }
        check_cover(&pool, 100, 1);
    }

    #[test]
    fn shared_pools_are_reused_by_thread_count() {
        let a = ThreadPool::shared(3).unwrap();
        let b = ThreadPool::shared(3).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(ThreadPool::shared(1).unwrap().n_threads(), 1);
    }
}
