//! Continuous batching: every generation running on a model is advanced by one shared
//! forward call per step, so each weight block is read once per step for all of them.
//!
//! One scheduler thread per model owns the running sequences. Between steps it admits
//! newly submitted requests and retires finished or cancelled ones; a joining sequence
//! prefills its prompt a chunk per step alongside the others' decode tokens. Each sequence
//! takes exactly the steps it would take alone ([`SequenceRun`]) and a batched forward
//! computes every token as a solo call would, so a fixed seed gives the same tokens and
//! probabilities whether a request ran alone or among others.
//!
//! Sampling happens on the scheduler thread without any lock held by consumers; events are
//! then handed out in one [`Delivery`] section per step, which lets a binding take its
//! interpreter lock once per step rather than once per token.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use crate::error::{panic_message, EngineError, Result};
use crate::generate::{
    GenerateRequest, GeneratedToken, Outcome, SequenceRun, StepOutput, StopReason,
};
use crate::model::transformer::BatchScratch;
use crate::model::Model;
use crate::threads::DisjointSlice;

/// Sequences decoded together at most; later requests wait for a place. Bounds the step
/// time (and so every stream's token latency) and the scratch memory of one step.
pub const DEFAULT_MAX_BATCH: usize = 32;

/// Where one generation's events go.
pub trait TokenSink: Send {
    /// A sampled token; returns false when the consumer went away, which ends the
    /// generation as `Cancelled`.
    fn token(&mut self, token: GeneratedToken) -> bool;
    /// The last event of every generation, exactly once.
    fn finish(&mut self, result: Result<Outcome>);
}

/// Runs a step's event deliveries: a binding wraps them in its interpreter lock. Gets the
/// deliveries as a closure to call exactly once.
pub type Delivery = Box<dyn Fn(&mut dyn FnMut()) + Send>;

/// Runs the scheduler thread's whole loop, given as a closure to call exactly once: a
/// binding can hold per-thread state around it (an interpreter's thread state, so that each
/// step's delivery need not create and destroy one).
pub type ThreadScope = Box<dyn FnOnce(Box<dyn FnOnce() + Send>) + Send>;

struct Running {
    run: SequenceRun,
    cancel: Arc<AtomicBool>,
    sink: Box<dyn TokenSink>,
}

/// Counters of a batcher's work since it started, for monitoring and tests.
#[derive(Default)]
pub struct BatchStats {
    /// Forward calls made.
    pub steps: AtomicU64,
    /// Sequence-steps taken: the sum over steps of the sequences in each.
    pub sequence_steps: AtomicU64,
    /// Most sequences decoded together in one step.
    pub peak_batch: AtomicU64,
}

impl BatchStats {
    fn record_step(&self, batch: usize) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.sequence_steps
            .fetch_add(batch as u64, Ordering::Relaxed);
        self.peak_batch.fetch_max(batch as u64, Ordering::Relaxed);
    }
}

/// The handle to a model's scheduler thread. Dropping it lets the thread finish the
/// generations it holds and then exit; it never blocks the dropping thread.
pub struct Batcher {
    model: Arc<Model>,
    queue: Mutex<Sender<Running>>,
    stats: Arc<BatchStats>,
}

impl Batcher {
    /// Starts the scheduler thread of `model`.
    pub fn start(model: Arc<Model>, max_batch: usize, delivery: Delivery) -> Result<Self> {
        Self::start_in(model, max_batch, delivery, Box::new(|run| run()))
    }

    /// [`Self::start`] with the scheduler loop run inside `scope` on its thread.
    pub fn start_in(
        model: Arc<Model>,
        max_batch: usize,
        delivery: Delivery,
        scope: ThreadScope,
    ) -> Result<Self> {
        if max_batch == 0 {
            return Err(EngineError::invalid("max_batch", "must be at least 1"));
        }
        let (queue, jobs) = mpsc::channel();
        let stats = Arc::new(BatchStats::default());
        let scheduler = Scheduler {
            stats: Arc::clone(&stats),
            model: Arc::clone(&model),
            jobs,
            max_batch,
            delivery,
            waiting: VecDeque::new(),
            running: Vec::new(),
            scratch: BatchScratch::default(),
        };
        std::thread::Builder::new()
            .name("sampler-sdk-batcher".into())
            .spawn(move || scope(Box::new(move || scheduler.run())))
            .map_err(|e| EngineError::Internal(format!("cannot start the batcher thread: {e}")))?;
        Ok(Self {
            model,
            queue: Mutex::new(queue),
            stats,
        })
    }

    pub fn stats(&self) -> &BatchStats {
        &self.stats
    }

    /// Queues a generation. Bad requests are rejected here, before anything runs; after a
    /// successful submit the sink hears exactly one `finish`.
    pub fn submit(
        &self,
        request: GenerateRequest,
        cancel: Arc<AtomicBool>,
        sink: Box<dyn TokenSink>,
    ) -> Result<()> {
        // Built here, so a bad request is rejected on the caller's thread.
        let run = SequenceRun::new(&self.model, request)?;
        let queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        queue
            .send(Running { run, cancel, sink })
            .map_err(|_| EngineError::Internal("the batcher thread has stopped".into()))
    }
}

struct Scheduler {
    model: Arc<Model>,
    stats: Arc<BatchStats>,
    jobs: Receiver<Running>,
    max_batch: usize,
    delivery: Delivery,
    waiting: VecDeque<Running>,
    running: Vec<Running>,
    scratch: BatchScratch,
}

impl Scheduler {
    fn run(mut self) {
        while self.receive() {
            // Cancelled sequences leave first, so they free their places for waiting ones.
            self.retire_cancelled();
            self.admit();
            if !self.running.is_empty() {
                self.step();
            }
        }
    }

    /// Takes newly submitted jobs; blocks while there is nothing to do. False once the
    /// handle is gone and every job is done.
    fn receive(&mut self) -> bool {
        if self.running.is_empty() && self.waiting.is_empty() {
            match self.jobs.recv() {
                Ok(job) => self.waiting.push_back(job),
                Err(_) => return false,
            }
        }
        while let Ok(job) = self.jobs.try_recv() {
            self.waiting.push_back(job);
        }
        true
    }

    fn admit(&mut self) {
        while self.running.len() < self.max_batch {
            let Some(next) = self.waiting.pop_front() else {
                break;
            };
            self.running.push(next);
        }
    }

    /// Ends the sequences whose consumer cancelled them, waiting or running.
    fn retire_cancelled(&mut self) {
        let cancelled = |r: &Running| r.cancel.load(Ordering::Relaxed);
        if !self.running.iter().chain(&self.waiting).any(cancelled) {
            return;
        }
        let (mut gone, running): (Vec<Running>, Vec<Running>) =
            self.running.drain(..).partition(cancelled);
        let (waited, waiting): (Vec<Running>, Vec<Running>) =
            self.waiting.drain(..).partition(cancelled);
        (self.running, self.waiting) = (running, waiting.into());
        gone.extend(waited);
        (self.delivery)(&mut || {
            for Running { run, mut sink, .. } in gone.drain(..) {
                sink.finish(Ok(run.finish(StopReason::Cancelled)));
            }
        });
    }

    /// One batched forward call, then sampling for every sequence that got logits, then
    /// delivery of the step's events.
    fn step(&mut self) {
        let model = &*self.model;
        self.stats.record_step(self.running.len());
        let running = &mut self.running;
        let scratch = &mut self.scratch;
        let computed = catch_unwind(AssertUnwindSafe(|| -> Result<Vec<Result<StepOutput>>> {
            let mut entries: Vec<_> = running.iter_mut().map(|r| r.run.next_entry()).collect();
            let rows: Vec<usize> = entries.iter().map(|e| e.n_logits).collect();
            let logits = model.forward_batch(scratch, &mut entries)?;
            drop(entries);
            // Each sequence samples from its own rows with its own generator, so the
            // sequences can sample in parallel (a vocabulary-wide pass each) and still get
            // what they would alone.
            let n_vocab = model.config.n_vocab;
            let first_rows: Vec<usize> = rows
                .iter()
                .scan(0, |at, &n| {
                    let first = *at;
                    *at += n;
                    Some(first)
                })
                .collect();
            let mut outputs: Vec<Option<Result<StepOutput>>> = std::iter::repeat_with(|| None)
                .take(running.len())
                .collect();
            let runs = DisjointSlice::new(running.as_mut_slice());
            let results = DisjointSlice::new(outputs.as_mut_slice());
            model.pool.parallel_for(runs.len(), 1, |range| {
                // SAFETY: parallel_for hands each thread its own range of sequences.
                let (runs, results) =
                    unsafe { (runs.part(range.clone()), results.part(range.clone())) };
                for ((r, result), i) in runs.iter_mut().zip(results).zip(range) {
                    let own = &logits[first_rows[i] * n_vocab..(first_rows[i] + rows[i]) * n_vocab];
                    *result = Some(r.run.after_forward(model, own));
                }
            });
            Ok(outputs
                .into_iter()
                .map(|o| {
                    o.unwrap_or_else(|| {
                        Err(EngineError::Internal("a sequence was not sampled".into()))
                    })
                })
                .collect())
        }));
        let outputs = match computed {
            Ok(Ok(outputs)) => outputs,
            Ok(Err(e)) => {
                self.fail_all(&e);
                return;
            }
            Err(panic) => {
                self.fail_all(&EngineError::Internal(format!(
                    "the batched forward pass panicked: {}",
                    panic_message(&*panic)
                )));
                return;
            }
        };

        let mut outputs = outputs;
        let running = &mut self.running;
        (self.delivery)(&mut || {
            let mut kept = Vec::with_capacity(running.len());
            for (r, output) in running.drain(..).zip(outputs.drain(..)) {
                let Running {
                    run,
                    cancel,
                    mut sink,
                } = r;
                let stop = match output {
                    Err(e) => {
                        sink.finish(Err(e));
                        continue;
                    }
                    Ok(StepOutput { token, stop }) => {
                        // A consumer that went away cancels its generation.
                        match token.is_none_or(|t| sink.token(t)) {
                            true => stop,
                            false => Some(StopReason::Cancelled),
                        }
                    }
                };
                match stop {
                    Some(reason) => sink.finish(Ok(run.finish(reason))),
                    None => kept.push(Running { run, cancel, sink }),
                }
            }
            *running = kept;
        });
    }

    /// Ends every running sequence with `error` (a failure of the shared forward call).
    fn fail_all(&mut self, error: &EngineError) {
        let message = error.to_string();
        let mut failed: Vec<Running> = self.running.drain(..).collect();
        (self.delivery)(&mut || {
            for r in failed.iter_mut() {
                r.sink.finish(Err(EngineError::Internal(message.clone())));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::generate;
    use crate::sampling::SamplingParams;
    use crate::test_models::{self, SMOLLM2};

    /// (token id, probability bits) of each emitted token.
    type Emitted = Vec<(u32, u32)>;

    struct Collect {
        tokens: Emitted,
        done: std::sync::mpsc::Sender<(Emitted, Result<Outcome>)>,
    }

    impl TokenSink for Collect {
        fn token(&mut self, token: GeneratedToken) -> bool {
            self.tokens.push((token.id, token.prob.to_bits()));
            true
        }
        fn finish(&mut self, result: Result<Outcome>) {
            let _ = self.done.send((std::mem::take(&mut self.tokens), result));
        }
    }

    fn request(i: u32) -> GenerateRequest {
        GenerateRequest {
            // The longest prompt takes two prefill chunks, overlapping others' decoding.
            prompt: (0..(5 + 40 * i))
                .map(|t| 1 + (t * 7919 + i) % 40_000)
                .collect(),
            max_len: 6 + i as usize,
            sampling: SamplingParams {
                temperature: 0.9,
                nucleus_p: 0.95,
                mask: None,
            },
            seed: u64::from(i),
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            return_attention: false,
            context_limit: None,
        }
    }

    #[test]
    fn batched_runs_match_solo_runs_bit_for_bit() {
        let Some(path) = test_models::path(SMOLLM2) else {
            return;
        };
        let model = Arc::new(Model::load_with_threads(&path, 2).unwrap());
        let never = AtomicBool::new(false);
        let solo: Vec<Vec<(u32, u32)>> = (0..3)
            .map(|i| {
                let mut tokens = Vec::new();
                generate(&model, &request(i), &never, |t| {
                    tokens.push((t.id, t.prob.to_bits()));
                    true
                })
                .unwrap();
                tokens
            })
            .collect();

        let batcher = Batcher::start(Arc::clone(&model), 8, Box::new(|deliver| deliver())).unwrap();
        let (done, results) = std::sync::mpsc::channel();
        for i in 0..3 {
            let sink = Collect {
                tokens: Vec::new(),
                done: done.clone(),
            };
            let cancel = Arc::new(AtomicBool::new(false));
            batcher.submit(request(i), cancel, Box::new(sink)).unwrap();
        }
        let mut batched: Vec<Vec<(u32, u32)>> = (0..3)
            .map(|_| {
                let (tokens, outcome) = results.recv().unwrap();
                assert_eq!(outcome.unwrap().stop_reason, StopReason::MaxLen);
                tokens
            })
            .collect();
        // Finishing order is by max_len, which grows with the request index.
        batched.sort_by_key(Vec::len);
        assert_eq!(batched, solo);
        assert!(batcher.stats().peak_batch.load(Ordering::Relaxed) >= 2);
    }

    #[test]
    fn a_rejected_request_never_reaches_the_scheduler() {
        let Some(path) = test_models::path(SMOLLM2) else {
            return;
        };
        let model = Arc::new(Model::load_with_threads(&path, 1).unwrap());
        let batcher = Batcher::start(Arc::clone(&model), 1, Box::new(|deliver| deliver())).unwrap();
        let (done, _results) = std::sync::mpsc::channel();
        let mut bad = request(0);
        bad.max_len = 0;
        let sink = Box::new(Collect {
            tokens: Vec::new(),
            done,
        });
        let err = batcher.submit(bad, Arc::new(AtomicBool::new(false)), sink);
        assert!(matches!(err, Err(EngineError::InvalidArgument { .. })));
        assert!(Batcher::start(model, 0, Box::new(|deliver| deliver())).is_err());
    }
}
