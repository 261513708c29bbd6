//! A loaded model: the mapped GGUF file, its hyperparameters, typed weights that point
//! into the mapping (nothing is dequantized at load), and its tokenizer.

pub mod config;
mod ffn;
pub mod moe;
pub mod trace;
pub mod transformer;
pub mod weights;

use std::path::Path;
use std::sync::Arc;

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::kernels::resident::ResidentBytes;
use crate::kv_cache::KvType;
use crate::threads::ThreadPool;
use crate::tokenizer::Tokenizer;

pub use config::{Architecture, ModelConfig};
pub use transformer::SequenceState;
pub use weights::ModelWeights;

pub struct Model {
    pub(crate) file: GgufFile,
    pub config: ModelConfig,
    pub weights: ModelWeights,
    pub tokenizer: Tokenizer,
    /// The threads the forward pass splits its work over, shared with every model loaded
    /// with the same thread count (see `threads` for the concurrency policy).
    pub(crate) pool: Arc<ThreadPool>,
    /// A copy of the tensor data in huge pages, when loaded from a path on a system that
    /// has them but could not map the file in them (see `kernels::resident`); otherwise the
    /// forward pass reads the file mapping.
    resident: Option<ResidentBytes>,
    /// How new sequences cache keys and values.
    kv_type: KvType,
}

impl Model {
    /// Loads a model that runs on the default number of threads
    /// ([`crate::threads::default_thread_count`]: physical cores, or `SAMPLER_SDK_THREADS`).
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, None, None)
    }

    /// Loads a model whose forward pass runs on `n_threads` threads (1 to
    /// [`crate::threads::MAX_THREADS`]). Results do not depend on the thread count.
    pub fn load_with_threads(path: &Path, n_threads: usize) -> Result<Self> {
        Self::load_with(path, Some(n_threads), None)
    }

    /// Loads the model with `tokenizer` in place of the file's vocabulary (e.g. a
    /// SentencePiece `.model` for a GGUF without one); `None` reads the file's.
    pub fn load_with_tokenizer(path: &Path, tokenizer: Option<Tokenizer>) -> Result<Self> {
        Self::load_with(path, None, tokenizer)
    }

    /// [`Model::load_with_threads`] and [`Model::load_with_tokenizer`] together; `None`
    /// takes the default for either.
    pub fn load_with(
        path: &Path,
        n_threads: Option<usize>,
        tokenizer: Option<Tokenizer>,
    ) -> Result<Self> {
        let pool = match n_threads {
            Some(n) => ThreadPool::shared(n)?,
            None => ThreadPool::shared_default()?,
        };
        Self::from_gguf_with(GgufFile::open(path)?, pool, tokenizer)?.with_resident_weights(path)
    }

    /// Puts the tensor data of the file at `path` (this model's file) in huge pages: its
    /// mapping's, or a copy (see `kernels::resident`).
    fn with_resident_weights(mut self, path: &Path) -> Result<Self> {
        let data = self.file.data();
        let data_start = self
            .file
            .tensors()
            .iter()
            .filter_map(|t| usize::try_from(t.offset).ok())
            .min()
            .unwrap_or(data.len());
        self.resident =
            ResidentBytes::load(path, self.file.file_mapping(), data_start, data.len())?;
        Ok(self)
    }

    /// The bytes weight matrices are read from: the file's, at file offsets.
    pub fn weight_bytes(&self) -> &[u8] {
        match &self.resident {
            Some(resident) => resident.bytes(),
            None => self.file.data(),
        }
    }

    pub fn from_gguf(file: GgufFile) -> Result<Self> {
        Self::from_gguf_with_pool(file, ThreadPool::shared_default()?)
    }

    /// The threads the forward pass splits its work over.
    pub fn pool(&self) -> &ThreadPool {
        &self.pool
    }

    /// Threads the forward pass uses.
    pub fn n_threads(&self) -> usize {
        self.pool.n_threads()
    }

    /// How sequences created from now on cache keys and values (f16 unless set).
    pub fn kv_type(&self) -> KvType {
        self.kv_type
    }

    /// The model, its new sequences caching keys and values as `kv_type`.
    pub fn with_kv_type(mut self, kv_type: KvType) -> Self {
        self.kv_type = kv_type;
        self
    }

    pub fn from_gguf_with_pool(file: GgufFile, pool: Arc<ThreadPool>) -> Result<Self> {
        Self::from_gguf_with(file, pool, None)
    }

    pub fn from_gguf_with(
        file: GgufFile,
        pool: Arc<ThreadPool>,
        tokenizer: Option<Tokenizer>,
    ) -> Result<Self> {
        let md = file.metadata();
        let embd = file
            .tensor("token_embd.weight")
            .ok_or_else(|| EngineError::MissingTensor {
                name: "token_embd.weight".into(),
            })?;
        let n_vocab = usize::try_from(embd.n_rows())
            .map_err(|_| EngineError::malformed("tensor token_embd.weight", "too many rows"))?;
        let config = ModelConfig::from_metadata(md, n_vocab)?;
        let (tokenizer, vocab_source) = match tokenizer {
            Some(tokenizer) => (tokenizer, "the tokenizer file"),
            None => (file_tokenizer(md)?, "tokenizer.ggml.tokens"),
        };
        if tokenizer.n_vocab() > n_vocab {
            return Err(EngineError::malformed(
                vocab_source,
                format!(
                    "{} tokens but the embedding has only {n_vocab} rows",
                    tokenizer.n_vocab()
                ),
            ));
        }
        let weights = ModelWeights::load(&file, &config)?;
        Ok(Self {
            file,
            config,
            weights,
            tokenizer,
            pool,
            resident: None,
            kv_type: KvType::default(),
        })
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    /// Greedy continuation of `prompt`: up to `max_tokens` argmax tokens, stopping after an
    /// end-of-generation token (which is included).
    pub fn generate_greedy(&self, prompt: &[u32], max_tokens: usize) -> Result<Vec<u32>> {
        let mut seq = self.new_sequence(prompt.len() + max_tokens);
        let mut next = argmax(&self.prefill(&mut seq, prompt, 1)?);
        let mut out = Vec::with_capacity(max_tokens);
        for i in 0..max_tokens {
            out.push(next);
            if self.tokenizer.end_of_generation_ids().contains(&next) || i + 1 == max_tokens {
                break;
            }
            next = argmax(self.forward_logits(&mut seq, &[next], 1)?);
        }
        Ok(out)
    }
}

/// The tokenizer the file's metadata describes; a file without a vocabulary (Grok-1 GGUFs
/// may have none) gets an error that says how to supply one.
fn file_tokenizer(md: &crate::gguf::Metadata) -> Result<Tokenizer> {
    let model = md.get_str("tokenizer.ggml.model")?;
    let no_vocab = matches!(model, Some("no_vocab" | "none"));
    if no_vocab || md.get("tokenizer.ggml.tokens").is_none() {
        return Err(EngineError::malformed(
            "tokenizer.ggml.tokens",
            "the model file has no vocabulary; pass a tokenizer file \
             (a SentencePiece .model, e.g. Model(path, tokenizer=PATH))",
        ));
    }
    Tokenizer::from_gguf_metadata(md)
}

/// Index of the largest value; the lowest index wins ties, as llama.cpp's greedy sampler.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod arm_generation_tests;

#[cfg(test)]
mod thread_count_tests {
    use super::*;
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    /// Counts the allocations of the current thread, so a test can assert that a stretch of
    /// code allocates nothing while other tests run concurrently.
    struct CountingAllocator;

    thread_local! {
        static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
    }

    // SAFETY: forwards to the system allocator; the counter is a thread-local `Cell` that
    // never allocates.
    unsafe impl GlobalAlloc for CountingAllocator {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
            // SAFETY: same contract as ours.
            unsafe { System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: same contract as ours.
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
            // SAFETY: same contract as ours.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static ALLOCATOR: CountingAllocator = CountingAllocator;

    use crate::test_models::{self, GEMMA3, SMOLLM2};

    /// Logits of a prefill (two chunks) and two decode steps, all concatenated.
    fn logits_trace(model: &Model, prompt: &[u32]) -> Vec<f32> {
        let mut seq = model.new_sequence(prompt.len() + 2);
        let (head, tail) = prompt.split_at(prompt.len() / 2);
        let mut trace = model.forward(&mut seq, head, 2).unwrap();
        let mut last = model.forward(&mut seq, tail, 1).unwrap();
        for _ in 0..2 {
            trace.extend_from_slice(&last);
            let next = argmax(&last);
            last = model.forward(&mut seq, &[next], 1).unwrap();
        }
        trace.extend_from_slice(&last);
        trace
    }

    #[test]
    fn logits_are_bit_identical_for_any_thread_count() {
        let Some(path) = test_models::path(SMOLLM2) else {
            return;
        };
        let path = path.as_path();
        let prompt: Vec<u32> = (0..37).map(|i| 1 + (i * 7919) % 40_000).collect();
        let reference = logits_trace(&Model::load_with_threads(path, 1).unwrap(), &prompt);
        assert!(reference.iter().all(|v| v.is_finite()));
        for threads in [2, 3, 4] {
            let model = Model::load_with_threads(path, threads).unwrap();
            assert_eq!(model.n_threads(), threads);
            let logits = logits_trace(&model, &prompt);
            let same = logits
                .iter()
                .zip(&reference)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same && logits.len() == reference.len(), "{threads} threads");
        }
    }

    #[test]
    fn chunked_prefill_equals_one_forward_call() {
        for model in [SMOLLM2, GEMMA3] {
            chunked_prefill_equals_one_forward_call_of(model);
        }
    }

    /// Also where only some of a chunk's neighbours' logits are wanted: llama.cpp runs the
    /// last layer and the output projection on the wanted rows of the whole batch at once,
    /// and Gemma's Q6_K output matrix rounds by batch size.
    fn chunked_prefill_equals_one_forward_call_of(which: (&str, &str)) {
        let Some(path) = test_models::path(which) else {
            return;
        };
        let model = Model::load_with_threads(&path, 2).unwrap();
        let prompt: Vec<u32> = (0..150).map(|i| 1 + (i * 7919) % 40_000).collect();
        for n_logits in [1, 3, 90, 100, 150] {
            let mut whole = model.new_sequence(prompt.len());
            let mut chunked = model.new_sequence(prompt.len());
            let expected = model.forward(&mut whole, &prompt, n_logits).unwrap();
            let got = model.prefill(&mut chunked, &prompt, n_logits).unwrap();
            assert_eq!(got.len(), expected.len());
            let same = got
                .iter()
                .zip(&expected)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{}: {n_logits} logits differ between chunked and whole prefill",
                which.0
            );
            assert_eq!(chunked.len(), prompt.len());
        }
    }

    #[test]
    fn concurrent_sequences_on_one_model_get_their_own_results() {
        let Some(path) = test_models::path(SMOLLM2) else {
            return;
        };
        let path = path.as_path();
        let model = Arc::new(Model::load_with_threads(path, 2).unwrap());
        let prompts: Vec<Vec<u32>> = (0..3)
            .map(|s| {
                (0..20)
                    .map(|i| 1 + (i * 7919 + s * 104_729) % 40_000)
                    .collect()
            })
            .collect();
        let alone: Vec<Vec<f32>> = prompts.iter().map(|p| logits_trace(&model, p)).collect();
        let together: Vec<Vec<f32>> = std::thread::scope(|scope| {
            let handles: Vec<_> = prompts
                .iter()
                .map(|p| {
                    let model = Arc::clone(&model);
                    scope.spawn(move || logits_trace(&model, p))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(together == alone);
    }

    #[test]
    fn decode_steps_do_not_allocate() {
        let Some(path) = test_models::path(SMOLLM2) else {
            return;
        };
        let path = path.as_path();
        // One thread: all the work happens on this thread, where allocations are counted.
        let model = Model::load_with_threads(path, 1).unwrap();
        let prompt: Vec<u32> = (0..20).map(|i| 1 + (i * 7919) % 40_000).collect();
        let mut seq = model.new_sequence(64);
        let mut next = argmax(model.forward_logits(&mut seq, &prompt, 1).unwrap());
        next = argmax(model.forward_logits(&mut seq, &[next], 1).unwrap());
        let before = ALLOCATIONS.with(Cell::get);
        for _ in 0..5 {
            next = argmax(model.forward_logits(&mut seq, &[next], 1).unwrap());
        }
        assert_eq!(ALLOCATIONS.with(Cell::get) - before, 0);
    }
}
