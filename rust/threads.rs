//! A persistent pool of worker threads for the forward pass.
//!
//! A decode step of a small model runs about 150 parallel regions (matrix products and
//! attention of every layer), each lasting tens of microseconds, so starting threads per
//! region or queueing boxed tasks would cost as much as the work. The pool instead keeps
//! `n - 1` threads waiting for a new *region*: the calling thread publishes one borrowed
//! closure, every thread (the caller included, as thread 0) runs it with its own index, and
//! the caller returns once all have finished. Waiting threads spin briefly, then yield,
//! then sleep on a condition variable, so back-to-back regions cost well under a
//! microsecond while an idle pool costs no CPU.
//!
//! **Determinism.** Work is split statically ([`split_range`]): which thread computes an
//! output depends on the thread count, but how it is computed does not, so every kernel
//! built on the pool gives bit-identical results for any thread count.
//!
//! **Concurrency policy.** One region runs at a time per pool: [`ThreadPool::run`] takes a
//! lock, so several sequences generating on their own threads share the pool region by
//! region, and at most `n_threads` threads compute at any moment (no oversubscription).
//! Pools are shared process-wide by thread count ([`ThreadPool::shared`]), so two models
//! loaded with the same thread count do not double the number of busy threads either.
//! A region started from inside another region of the same pool runs serially on the
//! calling thread instead of deadlocking.

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

/// The part of `0..n_items` that part `part` of `n_parts` handles: contiguous, in order,
/// boundaries on multiples of `grain` (except the end), sizes differing by at most one
/// grain. The same arguments always give the same range.
pub fn split_range(n_items: usize, grain: usize, n_parts: usize, part: usize) -> Range<usize> {
    let grain = grain.max(1);
    let n_parts = n_parts.max(1);
    let chunks = n_items.div_ceil(grain);
    let first = chunks * part / n_parts;
    let last = chunks * (part + 1) / n_parts;
    (first * grain).min(n_items)..(last * grain).min(n_items)
}

/// A borrowed closure with its lifetime erased, as the workers see it.
#[derive(Clone, Copy)]
struct Job {
    data: *const (),
    call: unsafe fn(*const (), usize),
}

/// Calls the closure behind `data`, which `publish` created from a `&F`.
unsafe fn call_job<F: Fn(usize) + Sync>(data: *const (), thread: usize) {
    // SAFETY: `data` came from `&F` in `ThreadPool::run`, which does not return (nor unwind)
    // before every worker has finished calling it.
    let work = unsafe { &*data.cast::<F>() };
    work(thread);
}

/// State shared between the caller of a region and the workers.
struct Shared {
    /// Bumped once per region (and once at shutdown); a worker runs the job when it sees a
    /// value it has not run yet.
    epoch: CachePadded<AtomicU64>,
    /// Workers that have not finished the current region.
    remaining: CachePadded<AtomicUsize>,
    /// Written only by the thread holding `ThreadPool::region`, while no worker is running.
    job: UnsafeCell<Job>,
    shutdown: AtomicBool,
    worker_panicked: AtomicBool,
    /// Sleeping is the slow path: workers waiting for a region, or the caller waiting for
    /// workers, announce themselves here before blocking on `sleep`.
    sleep: Mutex<()>,
    workers_sleeping: AtomicUsize,
    wake_workers: Condvar,
    caller_sleeping: AtomicBool,
    wake_caller: Condvar,
}

// SAFETY: `job` is the only non-Sync field. It is written by the region's caller before the
// epoch is published (Release) and read by workers after they observe it (Acquire); no
// worker reads it after decrementing `remaining`, and the caller writes it again only after
// seeing `remaining == 0` (Acquire). The pointer inside is only dereferenced by `call_job`.
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

    fn publish(&self, job: Job, workers: usize) {
        // SAFETY: the caller holds the region lock and every worker has finished the
        // previous region (remaining == 0 was observed), so nobody reads `job` now.
        unsafe { *self.job.get() = job };
        self.remaining.store(workers, Ordering::Relaxed);
        self.epoch.fetch_add(1, Ordering::SeqCst);
        if self.workers_sleeping.load(Ordering::SeqCst) > 0 {
            let _guard = lock(&self.sleep);
            self.wake_workers.notify_all();
        }
    }

    fn finish_one(&self) {
        if self.remaining.fetch_sub(1, Ordering::SeqCst) == 1
            && self.caller_sleeping.load(Ordering::SeqCst)
        {
            let _guard = lock(&self.sleep);
            self.wake_caller.notify_one();
        }
    }

    fn wait_for_workers(&self) {
        let done = || self.remaining.load(Ordering::Acquire) == 0;
        if wait_briefly(done) {
            return;
        }
        let mut guard = lock(&self.sleep);
        self.caller_sleeping.store(true, Ordering::SeqCst);
        while self.remaining.load(Ordering::SeqCst) != 0 {
            guard = self
                .wake_caller
                .wait(guard)
                .unwrap_or_else(PoisonError::into_inner);
        }
        self.caller_sleeping.store(false, Ordering::SeqCst);
    }
}

fn worker_loop(shared: &Shared, index: usize) {
    // A worker only ever runs parts of regions: a region it starts must run inline.
    IN_REGION.with(|flag| flag.set(true));
    let mut seen = 0;
    loop {
        seen = shared.wait_for_region(seen);
        if shared.shutdown.load(Ordering::Acquire) {
            return;
        }
        // SAFETY: see `Shared`; the epoch was observed with Acquire after the write.
        let job = unsafe { *shared.job.get() };
        // SAFETY: `job` was built by `ThreadPool::run` for a closure that outlives the region.
        let outcome = catch_unwind(|| unsafe { (job.call)(job.data, index) });
        if outcome.is_err() {
            shared.worker_panicked.store(true, Ordering::Relaxed);
        }
        shared.finish_one();
    }
}

thread_local! {
    /// Set while this thread is running part of a region, so a nested region runs inline.
    static IN_REGION: Cell<bool> = const { Cell::new(false) };
}

struct InRegion;

impl InRegion {
    fn enter() -> Option<Self> {
        IN_REGION.with(|flag| (!flag.replace(true)).then_some(Self))
    }
}

impl Drop for InRegion {
    fn drop(&mut self) {
        IN_REGION.with(|flag| flag.set(false));
    }
}

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
            remaining: CachePadded(AtomicUsize::new(0)),
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
        for index in 1..n_threads {
            let shared = Arc::clone(&pool.shared);
            let handle = std::thread::Builder::new()
                .name(format!("sampler-sdk-worker-{index}"))
                .spawn(move || worker_loop(&shared, index))
                .map_err(|e| {
                    EngineError::Internal(format!("cannot start worker thread {index}: {e}"))
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

    /// Runs `work(thread)` once for every `thread` in `0..n_threads()`, in parallel, and
    /// returns when all have finished. Thread 0 is the calling thread.
    ///
    /// A panic in `work` on any thread is re-raised here after every thread has finished.
    pub fn run<F: Fn(usize) + Sync>(&self, work: F) {
        let Some(_in_region) = (self.n_threads > 1).then(InRegion::enter).flatten() else {
            // One thread, or a region nested in a region: run every part here, in order.
            (0..self.n_threads).for_each(&work);
            return;
        };
        let _region = lock(&self.region);
        let job = Job {
            data: std::ptr::from_ref(&work).cast(),
            call: call_job::<F>,
        };
        self.shared.publish(job, self.n_threads - 1);
        // Workers borrow `work` until they finish: wait for them even if part 0 panics.
        let own = catch_unwind(AssertUnwindSafe(|| work(0)));
        self.shared.wait_for_workers();
        if let Err(panic) = own {
            resume_unwind(panic);
        }
        if self.shared.worker_panicked.swap(false, Ordering::Relaxed) {
            // Reaching this is a bug in a kernel; the binding turns it into an error.
            panic!("a worker thread panicked during a parallel region");
        }
    }

    /// Splits `0..n_items` into one contiguous range per thread ([`split_range`] with
    /// `grain`) and runs `work(range)` on each non-empty one in parallel. Work too small to
    /// fill two grains runs on the calling thread alone.
    pub fn parallel_for<F: Fn(Range<usize>) + Sync>(&self, n_items: usize, grain: usize, work: F) {
        if n_items == 0 {
            return;
        }
        if n_items <= grain.max(1) || self.n_threads == 1 {
            work(0..n_items);
            return;
        }
        let n_parts = self.n_threads;
        self.run(|thread| {
            let range = split_range(n_items, grain, n_parts, thread);
            if !range.is_empty() {
                work(range);
            }
        });
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

    #[test]
    fn split_covers_everything_once_in_order_on_grain_boundaries() {
        for n_items in [0, 1, 5, 16, 17, 100, 961, 49152] {
            for grain in [1, 4, 16] {
                for n_parts in 1..=7 {
                    let mut next = 0;
                    for part in 0..n_parts {
                        let r = split_range(n_items, grain, n_parts, part);
                        assert_eq!(r.start, next, "{n_items} {grain} {n_parts} {part}");
                        assert!(r.start % grain == 0 || r.start == n_items);
                        next = r.end;
                    }
                    assert_eq!(next, n_items);
                    let sizes: Vec<usize> = (0..n_parts)
                        .map(|p| split_range(n_items, grain, n_parts, p).len())
                        .collect();
                    let (min, max) = (sizes.iter().min(), sizes.iter().max());
                    assert!(max.zip(min).is_some_and(|(a, b)| a - b <= grain));
                }
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
    fn every_thread_runs_each_region_once() {
        for n in [1, 2, 3, 4] {
            let pool = ThreadPool::new(n).unwrap();
            let counts: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
            for _ in 0..1000 {
                pool.run(|t| {
                    counts[t].fetch_add(1, Ordering::Relaxed);
                });
            }
            assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1000));
        }
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
    fn workers_that_slept_wake_up() {
        let pool = ThreadPool::new(2).unwrap();
        let hits = AtomicU32::new(0);
        pool.run(|_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        std::thread::sleep(SPIN_FOR + YIELD_FOR + Duration::from_millis(20));
        pool.run(|_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 4);
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
        pool.run(|_| {
            pool.run(|_| {
                hits.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(hits.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn a_panicking_part_is_reported_and_the_pool_survives() {
        let pool = ThreadPool::new(2).unwrap();
        for bad in [0, 1] {
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                pool.run(|t| assert_ne!(t, bad, "part {t} fails"));
            }));
            assert!(outcome.is_err(), "part {bad}");
        }
        let hits = AtomicU32::new(0);
        pool.run(|_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn shared_pools_are_reused_by_thread_count() {
        let a = ThreadPool::shared(3).unwrap();
        let b = ThreadPool::shared(3).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(ThreadPool::shared(1).unwrap().n_threads(), 1);
    }
}
